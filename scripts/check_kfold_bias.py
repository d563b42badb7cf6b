"""How far pooled k-fold AUROC sits from 0.5 when the features carry nothing.

A probe on features without signal should score AUROC 0.5. Pooled out-of-fold predictions of
a regularised probe fall back to each fold's training prevalence, and a fold that holds more
positives trains on fewer: on tens of patients the pooled predictions come out anti-correlated
with the truth. Stratified folds (``split.stratify``, the default) share the classes out
evenly. This draws pure-noise features many times and prints the mean AUROC of the two.

    python scripts/check_kfold_bias.py [--draws 30] [--patients 20] [--positives 7] [--k 5]
"""

from __future__ import annotations

import argparse

import numpy as np

from foundation.evaluation.linear_probe import fit_linear_probe
from foundation.evaluation.metrics import binary_auroc
from foundation.evaluation.splits import kfold_patients
from foundation.models.heads import TaskSpec
from foundation.progress import print_summary


def pooled_auroc(x: np.ndarray, y: np.ndarray, k: int, seed: int, stratify: bool) -> float:
    """AUROC of pooled out-of-fold predictions of a logistic probe (one study per patient)."""
    patients = [f"p{i:03d}" for i in range(len(y))]
    strata = dict(zip(patients, y.tolist(), strict=True)) if stratify else None
    task = TaskSpec(name="label", type="binary", column="label")
    pred = np.zeros(len(y))
    for fold in kfold_patients(patients, k, seed, strata):
        test = np.array([patients.index(p) for p in fold])
        train = np.setdiff1d(np.arange(len(y)), test)
        predict, _ = fit_linear_probe(x[train], y[train, None], [patients[i] for i in train], task)
        pred[test] = predict(x[test])[:, 0]
    return binary_auroc(y, pred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=30)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--positives", type=int, default=7)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    scores: dict[bool, list[float]] = {False: [], True: []}
    for draw in range(args.draws):
        rng = np.random.default_rng(draw)
        y = np.zeros(args.patients)
        y[: args.positives] = 1.0
        rng.shuffle(y)
        x = rng.normal(size=(args.patients, args.features))  # no signal at all
        for stratify in scores:
            scores[stratify].append(pooled_auroc(x, y, args.k, draw, stratify))
    rows = [
        (
            "stratified" if stratify else "plain",
            f"{np.mean(v):.3f} ± {np.std(v):.3f}",
            f"{np.mean(v) - 0.5:+.3f}",
        )
        for stratify, v in scores.items()
    ]
    print_summary(
        f"pooled {args.k}-fold AUROC on noise ({args.draws} draws, {args.patients} patients, "
        f"{args.positives} positive)",
        rows,
        columns=("folds", "AUROC mean ± sd", "vs 0.5"),
    )


if __name__ == "__main__":
    main()
