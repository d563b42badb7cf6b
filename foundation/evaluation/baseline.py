"""The constant predictor: what a head falls back to when the features carry nothing.

A probe's figures mean little without it. On tens of studies a ridge or logistic probe with a
large penalty predicts the mean of the targets it was fitted on, and a pretrained encoder and a
random one can then "differ" by noise while neither is better than the mean. The baseline here
predicts, for every test study, the mean of the targets of the studies the same split fitted on
(train + val; for pooled k-fold, the other folds), in the task's own target space (a log1p
regression falls back to ``expm1(mean(log1p(y)))``), or their class frequencies. Its metrics are
computed on the same studies as the encoders'; for classification they also show how far the
fold structure alone moves a rank metric from 0.5.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from foundation.evaluation.splits import Split
from foundation.models.heads import TaskSpec


def split_pairs(split: Split) -> list[tuple[set[str], set[str]]]:
    """``(fitted on, predicted)`` study sets of a split: one pair per fold for a pooled k-fold
    split (names ``fold0``...), else train + val against test."""
    names = sorted(split.studies)
    if names and all(n.startswith("fold") for n in names):
        return [(set().union(*(split.of(o) for o in names if o != n)), split.of(n)) for n in names]
    return [(split.of("train") | split.of("val"), split.of("test"))]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def constant_predictions(
    task: TaskSpec, rows: dict[str, dict[str, Any]], split: Split
) -> dict[str, list[float]]:
    """Per predicted study, the constant predictor's output in the form the task's head
    predicts (original units, probability, class probabilities or per-label probabilities)."""
    out: dict[str, list[float]] = {}
    for fitted, predicted in split_pairs(split):
        fit_rows = [rows[s] for s in sorted(fitted) if s in rows]
        t = copy.deepcopy(task)
        if t.type == "regression":
            t.fit_normalisation([float(r[t.column]) for r in fit_rows if not _missing(r[t.column])])
            value = t.decode(torch.zeros(1, 1, dtype=torch.float64)).tolist()  # the mean
        elif t.type == "multiclass":
            counts = [0.0] * len(t.classes or [])
            for r in fit_rows:
                if not _missing(r[t.column]):
                    counts[(t.classes or []).index(r[t.column])] += 1.0
            value = [c / max(sum(counts), 1.0) for c in counts]
        else:  # binary, multilabel: the share of positives per label
            value = []
            for c in t.label_columns:
                ys = [float(r[c]) for r in fit_rows if not _missing(r.get(c))]
                value.append(sum(ys) / len(ys) if ys else 0.5)
        for s in predicted:
            out[s] = list(value)
    return out
