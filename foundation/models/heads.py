"""Biomarker heads: token pooling plus one small head per task, with their losses.

A task is data (:class:`TaskSpec`): which label column, which type (regression, binary,
multi-class, multi-label), which target transform. :class:`MultiTaskHead` pools the encoder's
tokens once (CLS, mean of patch tokens, or a learned attention query) and feeds every task's
head, so several biomarkers train at once on one encoder. Missing labels (NaN) are masked out
of the loss per task, so a study labelled for one biomarker only still trains that one.

Regression targets are standardised (after the optional ``log1p``) with the training-set mean
and standard deviation; ``TaskSpec.decode`` maps predictions back to the original units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.evaluation.metrics import PRIMARY_METRIC, TASK_TYPES, task_metrics

POOLINGS: tuple[str, ...] = ("cls", "mean", "attention")
TARGET_TRANSFORMS: tuple[str | None, ...] = (None, "none", "log1p")


@dataclass
class TaskSpec:
    """One biomarker: label column(s), task type, head shape and target normalisation."""

    name: str
    type: str = "regression"  # regression | binary | multiclass | multilabel
    column: str | None = None  # label-table column (defaults to name)
    columns: list[str] | None = None  # multilabel: one 0/1 column per label
    classes: list[Any] | None = None  # multiclass: class values in index order
    target_transform: str | None = None  # None | "log1p" (regression only)
    # compared between encoders; log1p tasks also have mae_log1p, rmse_log1p, r2_log1p, ...
    metric: str | None = None  # headline metric (default mae / auroc by type)
    # the Lightning path only (frozen + attention pooling, last_k, full); probes ignore them
    hidden: int = 0  # 0: linear head; >0: MLP with one hidden layer of this width
    dropout: float = 0.0
    weight: float = 1.0  # share of this task in the multi-task loss
    mean: float = 0.0  # regression standardisation, fitted on the training split
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type must be one of {TASK_TYPES}")
        if self.target_transform not in TARGET_TRANSFORMS:
            raise ValueError(
                f"task {self.name!r}: target_transform must be one of {TARGET_TRANSFORMS}"
            )
        if self.type == "multilabel" and not self.columns:
            raise ValueError(f"task {self.name!r}: a multilabel task needs 'columns'")
        self.column = self.column or self.name
        self.metric = self.metric or PRIMARY_METRIC[self.type]
        allowed = task_metrics(self.type, self.target_transform)
        if self.metric not in allowed:
            raise ValueError(f"task {self.name!r}: metric must be one of {allowed}")

    @property
    def label_columns(self) -> list[str]:
        return list(self.columns) if self.type == "multilabel" else [self.column]  # type: ignore[list-item]

    @property
    def out_features(self) -> int:
        if self.type == "regression" or self.type == "binary":
            return 1
        if self.type == "multiclass":
            if not self.classes:
                raise ValueError(f"task {self.name!r}: classes are not known yet")
            return len(self.classes)
        return len(self.columns or [])

    # ---- targets: table values <-> training tensors ------------------------------------------
    def encode(self, row: dict[str, Any]) -> list[float]:
        """Training targets from a label row; NaN where missing. Length 1 except multilabel."""
        if self.type == "multilabel":
            values = [float(row.get(c, math.nan)) for c in self.columns or []]
            if any(v not in (0.0, 1.0) for v in values if not math.isnan(v)):
                raise ValueError(f"task {self.name!r}: multi-label targets must be 0 or 1")
            return values
        value = row.get(self.column, math.nan)  # type: ignore[arg-type]
        if isinstance(value, float) and math.isnan(value):
            return [math.nan]
        if self.type == "multiclass":
            if self.classes is None or value not in self.classes:
                raise ValueError(f"task {self.name!r}: class {value!r} not in {self.classes}")
            return [float(self.classes.index(value))]
        if self.type == "regression":
            y = float(value)
            if self.target_transform == "log1p":
                y = math.log1p(max(y, 0.0))
            return [(y - self.mean) / self.std]
        if self.type == "binary" and value not in (0.0, 1.0):
            raise ValueError(f"task {self.name!r}: binary targets must be 0 or 1")
        return [float(value)]

    def fit_normalisation(self, values: list[float]) -> None:
        """Set mean/std of regression targets (original units) from the training split."""
        if self.type != "regression":
            return
        ys = [v for v in values if not math.isnan(v)]
        if self.target_transform == "log1p":
            ys = [math.log1p(max(v, 0.0)) for v in ys]
        if not ys:
            raise ValueError(f"task {self.name!r}: no training targets")
        t = torch.tensor(ys, dtype=torch.float64)
        self.mean = float(t.mean())
        self.std = float(t.std(unbiased=False)) or 1.0

    def decode(self, output: Tensor) -> Tensor:
        """Head output ``(B, out)`` -> predictions: original units, or probabilities."""
        if self.type == "regression":
            y = output[:, 0] * self.std + self.mean
            return torch.expm1(y).clamp_min(0.0) if self.target_transform == "log1p" else y
        if self.type == "binary":
            return torch.sigmoid(output[:, 0])
        if self.type == "multiclass":
            return torch.softmax(output, dim=-1)
        return torch.sigmoid(output)

    def true_values(self, row: dict[str, Any]) -> Any:
        """Ground truth in evaluation form (original units, class index, 0/1 vector)."""
        if self.type == "regression":
            return float(row[self.column])  # type: ignore[index]
        if self.type == "multiclass":
            return self.classes.index(row[self.column])  # type: ignore[union-attr,index]
        if self.type == "multilabel":
            return [float(row[c]) for c in self.columns or []]
        return float(row[self.column])  # type: ignore[index]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Masked loss: ``output`` (B, out), ``target`` (B, 1 or L) with NaN = missing."""
        valid = ~torch.isnan(target)
        if self.type == "multiclass":
            keep = valid[:, 0]
            if not keep.any():
                return output.sum() * 0.0
            return F.cross_entropy(output[keep], target[keep, 0].long())
        if not valid.any():
            return output.sum() * 0.0
        out, tgt = output[valid], target[valid]
        if self.type == "regression":
            return F.mse_loss(out, tgt)
        return F.binary_cross_entropy_with_logits(out, tgt)


class AttentionPool(nn.Module):
    """One learned query attends over the patch tokens (multi-head)."""

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        out, _ = self.attn(q, tokens, tokens, need_weights=False)
        return self.norm(out[:, 0])


class Pooling(nn.Module):
    """``(B, 1 + N, D)`` tokens (CLS first) -> ``(B, D)``."""

    def __init__(self, kind: str, dim: int, heads: int = 1):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {kind!r}")
        self.kind = kind
        self.attn = AttentionPool(dim, heads) if kind == "attention" else None

    def forward(self, tokens: Tensor) -> Tensor:
        if self.kind == "cls":
            return tokens[:, 0]
        if self.kind == "mean":
            return tokens[:, 1:].mean(dim=1)  # patch tokens only
        return self.attn(tokens[:, 1:])  # type: ignore[misc]


def pool_tokens(tokens: Tensor, kind: str) -> Tensor:
    """Parameter-free pooling (CLS or mean) for cached embeddings."""
    if kind == "cls":
        return tokens[:, 0]
    if kind == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pooling {kind!r} has parameters; it cannot be cached")


def make_head(in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """Linear head, or a one-hidden-layer MLP when ``hidden > 0``."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


@dataclass
class HeadOutput:
    pooled: Tensor  # (B, D)
    outputs: dict[str, Tensor] = field(default_factory=dict)  # task -> (B, out)


class MultiTaskHead(nn.Module):
    """Pooling shared by every task, then one head per task."""

    def __init__(self, dim: int, tasks: list[TaskSpec], pooling: str = "cls", attn_heads: int = 1):
        super().__init__()
        self.tasks = {t.name: t for t in tasks}
        self.pool = Pooling(pooling, dim, attn_heads)
        self.heads = nn.ModuleDict(
            {t.name: make_head(dim, t.out_features, t.hidden, t.dropout) for t in tasks}
        )

    def forward(self, tokens: Tensor) -> HeadOutput:
        pooled = self.pool(tokens)
        return HeadOutput(pooled, {name: head(pooled) for name, head in self.heads.items()})

    def forward_pooled(self, pooled: Tensor) -> dict[str, Tensor]:
        """Heads only, on already-pooled (cached) embeddings ``(B, D)``."""
        return {name: head(pooled) for name, head in self.heads.items()}

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Weighted sum of the task losses, and each task's loss (for logging)."""
        parts = {n: self.tasks[n].loss(outputs[n], targets[n]) for n in outputs}
        total = sum(self.tasks[n].weight * v for n, v in parts.items())
        return total, parts  # type: ignore[return-value]
