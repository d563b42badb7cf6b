"""The configuration of a fine-tuning / probing job: one dataclass per YAML section.

``FinetuneConfig.from_yaml`` reads ``configs/finetune/*.yaml``; unknown keys, top level or in a
section, are errors rather than silently ignored options. The job itself is
``foundation.training.finetune.run_finetune``; docs/configuration.md is generated from the
field comments here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from foundation.models.heads import TaskSpec

FREEZE_MODES = ("linear_probe", "mlp_probe", "frozen", "last_k", "full")
DEFAULT_SIZE = {2: [224, 224], 3: [96, 96, 96]}


@dataclass
class DataConfig:
    manifest: str = ""
    modality: str = "XR"
    dims: int | None = None  # None: the dims of the first matching sample
    image_size: list[int] | None = None  # None: DEFAULT_SIZE[dims]
    # opt-out/erasure list (foundation optout): its patients are read by no head or probe
    exclusion_list: str | None = None


@dataclass
class LabelsConfig:
    path: str = ""
    key_column: str = "study"  # study | accession | patient | accession_number | patient_id
    join_on: str | None = None
    namespace: str | None = None
    key_file: str | None = None  # for raw identifiers; else $FOUNDATION_PSEUDONYM_KEY


@dataclass
class EncoderConfig:
    init: str = "pretrained"  # pretrained | random
    checkpoint: str | None = None  # .ckpt or exported directory
    vision: dict | None = None  # VisionConfig fields (random init, foreign checkpoints)
    pooling: str = "auto"  # auto (the encoder's own pooling) | cls | mean | attention
    freeze: str = "linear_probe"  # see FREEZE_MODES
    unfreeze_last_k: int = 1
    layer_decay: float = 0.75  # full fine-tune: lr * decay ** (depth + 1 - layer)
    probe_hidden: int = 256  # mlp_probe width


@dataclass
class SplitConfig:
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    kfold: int = 0  # >1: run fold `fold` of a k-fold split
    fold: int = 0  # -1: every fold, metrics on pooled out-of-fold predictions (probes only)
    seed: int = 0
    stratify: bool = True  # k folds balanced on the first task's label (not multilabel)


@dataclass
class TrainConfig:
    # Which path reads what: linear_probe fits ridge/logistic with a cross-validated penalty
    # (none of the optimiser fields); mlp_probe reads probe_steps, lr, weight_decay; the
    # Lightning path (frozen with attention pooling, last_k, full) reads epochs, lr,
    # weight_decay, batch_size and the tasks' hidden/dropout/weight.
    epochs: int = 20  # Lightning path only
    lr: float = 1e-3  # mlp_probe and the Lightning path
    weight_decay: float = 1e-4  # mlp_probe and the Lightning path
    batch_size: int = 16  # the encoder pass (every path) and Lightning training
    seed: int = 0
    probe_steps: int = 300  # mlp_probe only


@dataclass
class EvalConfig:
    n_bootstrap: int = 1000
    seed: int = 0
    level: float = 0.95


_SECTIONS = {
    "data": DataConfig,
    "labels": LabelsConfig,
    "encoder": EncoderConfig,
    "split": SplitConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass
class FinetuneConfig:
    """One fine-tuning / probing job (see configs/finetune/*.yaml)."""

    name: str = "finetune"
    tasks: list[TaskSpec] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/finetune"
    cache_dir: str | None = None  # embedding cache; default out_dir/../embedding_cache

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown finetune config keys: {sorted(unknown)}")
        kw: dict[str, Any] = {k: v for k, v in d.items() if k not in _SECTIONS and k != "tasks"}
        for name, section in _SECTIONS.items():
            value = d.get(name) or {}
            bad = set(value) - {f.name for f in fields(section)}
            if bad:
                raise ValueError(f"unknown keys in finetune config section {name!r}: {sorted(bad)}")
            kw[name] = section(**value)
        kw["tasks"] = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in d.get("tasks", [])]
        if not kw["tasks"]:
            raise ValueError("a finetune config needs at least one task")
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> FinetuneConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})

    @classmethod
    def from_any(cls, value: FinetuneConfig | dict | str | Path) -> FinetuneConfig:
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        return cls.from_yaml(value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
