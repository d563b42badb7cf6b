"""Biomarker heads on a pretrained vision encoder, driven by a YAML config.

``run_finetune(config)`` is the whole job: load the encoder (pretraining ``.ckpt``, exported
directory, or random init for baselines), read the label table (raw identifiers hashed on
load), join labels to the manifest's samples of one modality and dimensionality, split by
patient (``split.json``), train, evaluate on the test split (probes with ``split.fold: -1``:
on the pooled out-of-fold predictions of a k-fold split) with bootstrap intervals, write
``metrics.json`` and ``predictions.csv`` (study pseudonyms only) and return the results.

Two training paths:
- probes (``freeze: linear_probe`` or ``mlp_probe`` with CLS/mean pooling): embeddings are
  computed once per (encoder, manifest, transform) and cached, then a head is fitted on them
  (``foundation.evaluation.probe``; the linear probe is ridge / logistic regression with a
  penalty chosen by cross-validation over the training patients). Unit: the study (mean of
  its series' embeddings).
- everything else (``frozen`` with attention pooling, ``last_k``, ``full``): :class:`FinetuneModule`
  trains through the encoder with Lightning. Unit of training: the series (each carries its
  study's label); evaluation averages a study's series predictions into one per study.
The second path holds the transformed images of the labelled series in memory: it suits
label sets of thousands of studies, not the whole archive.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from torch import Tensor

from foundation.data.labels import (
    LabelledSamples,
    LabelTable,
    join_labels,
    load_label_table,
    source_samples,
)
from foundation.evaluation.metrics import evaluate_predictions
from foundation.evaluation.splits import Split, make_kfold, make_split, patient_strata
from foundation.models.export import (
    LoadedEncoder,
    check_preprocessing,
    load_vision_encoder,
    read_manifest,
)
from foundation.models.heads import MultiTaskHead, TaskSpec
from foundation.models.vision import VisionTransformer
from foundation.privacy.pseudonym import PseudonymKey, load_key
from foundation.sample import MODALITIES, Sample

FREEZE_MODES = ("linear_probe", "mlp_probe", "frozen", "last_k", "full")
DEFAULT_SIZE = {2: [224, 224], 3: [96, 96, 96]}


# ---- config -----------------------------------------------------------------------------------
@dataclass
class DataConfig:
    manifest: str = ""
    modality: str = "XR"
    dims: int | None = None  # None: the dims of the first matching sample
    image_size: list[int] | None = None  # None: DEFAULT_SIZE[dims]


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
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    probe_steps: int = 300


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


# ---- data -------------------------------------------------------------------------------------
def build_transform(dims: int, size: list[int]) -> Callable[[np.ndarray, dict], Tensor]:
    """The deterministic evaluation transform of the data stage."""
    from foundation.data.transforms import eval_transform

    return eval_transform(dims, tuple(size))


def load_task_data(
    cfg: FinetuneConfig,
    table: LabelTable,
    samples: Iterable[Sample],
    transform: Callable[[np.ndarray, dict], Tensor] | None = None,
) -> LabelledSamples:
    """The config's labelled samples with their transformed images."""

    def make(dims: int) -> Callable[[np.ndarray, dict], Tensor]:
        return transform or build_transform(dims, cfg.data.image_size or DEFAULT_SIZE[dims])

    data = join_labels(table, samples, cfg.data.modality, cfg.data.dims, make)
    if not data.keys:
        raise ValueError(
            f"{cfg.data.manifest}: no {cfg.data.modality} sample joins the label table "
            f"({table.source}, {len(table)} rows); check key_column and the pseudonymisation key"
        )
    return data


def fit_classes(tasks: list[TaskSpec], rows: Iterable[dict[str, Any]]) -> None:
    """Multi-class tasks without ``classes``: sorted distinct values of the column."""
    rows = list(rows)
    for t in tasks:
        if t.type == "multiclass" and not t.classes:
            values = {r[t.column] for r in rows if not _nan(r[t.column])}
            t.classes = sorted(values, key=str)


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---- the module -------------------------------------------------------------------------------
class FinetuneModule(L.LightningModule):
    """Vision encoder + pooled multi-task head, with frozen / last-k / full (LLRD) training."""

    def __init__(
        self,
        vision: VisionTransformer,
        tasks: list[TaskSpec],
        pooling: str = "cls",
        freeze: str = "frozen",
        unfreeze_last_k: int = 1,
        layer_decay: float = 0.75,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ):
        super().__init__()
        if freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, not {freeze!r}")
        self.vision = vision
        self.tasks = tasks
        self.head = MultiTaskHead(vision.embed_dim, tasks, pooling)
        self.freeze, self.layer_decay = freeze, layer_decay
        self.lr, self.weight_decay = lr, weight_decay
        self.losses: list[float] = []  # training loss per step (for tests and reports)
        self.vision.requires_grad_(freeze == "full")
        if freeze == "last_k":
            k = max(1, unfreeze_last_k)
            for block in list(vision.blocks)[-k:]:
                block.requires_grad_(True)
            vision.norm.requires_grad_(True)

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision.parameters())

    def train(self, mode: bool = True) -> FinetuneModule:
        super().train(mode)
        if self.encoder_frozen:
            self.vision.eval()  # a frozen encoder keeps eval behaviour (no dropout)
        return self

    def forward(self, image: Tensor, modality: Tensor) -> dict[str, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            tokens = self.vision(image, modality).tokens  # (B, 1 + N, D)
        return self.head(tokens).outputs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _ = self.head.loss(self(batch["image"], batch["modality"]), batch["targets"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, _ = self.head.loss(self(batch["image"], batch["modality"]), batch["targets"])
        self.log("val/loss", loss, batch_size=batch["image"].shape[0])

    def layer_id(self, name: str) -> int:
        """0 for embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
        depth = len(self.vision.blocks)
        if name.startswith("vision.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("vision.") and not name.startswith("vision.norm"):
            return 0
        return depth + 1

    def param_groups(self) -> list[dict]:
        """AdamW groups with layer-wise lr decay (full fine-tune) and no decay on 1-d params."""
        depth = len(self.vision.blocks)
        groups: dict[tuple[int, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            lid = self.layer_id(name)
            scale = self.layer_decay ** (depth + 1 - lid) if self.freeze == "full" else 1.0
            no_decay = p.ndim <= 1 or "cls_token" in name or "modality_embed" in name
            g = groups.setdefault(
                (lid, no_decay),
                {
                    "params": [],
                    "lr": self.lr * scale,
                    "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else self.weight_decay,
                },
            )
            g["params"].append(p)
        return list(groups.values())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(), lr=self.lr)


def _collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "modality": torch.stack([i["modality"] for i in items]),
        "targets": {n: torch.stack([i["targets"][n] for i in items]) for n in items[0]["targets"]},
        "study": [i["study"] for i in items],
    }


def _items(
    data: LabelledSamples, tasks: list[TaskSpec], studies: set[str], modality: int
) -> list[dict]:
    items = []
    for i, study in enumerate(data.sample_study):
        if study in studies:
            row = data.rows[study]
            items.append(
                {
                    "image": data.images[i],  # type: ignore[index]
                    "modality": torch.tensor(modality, dtype=torch.long),
                    "targets": {
                        t.name: torch.tensor(t.encode(row), dtype=torch.float32) for t in tasks
                    },
                    "study": study,
                }
            )
    return items


def train_module(
    module: FinetuneModule, train_items: list[dict], val_items: list[dict], cfg: TrainConfig
) -> FinetuneModule:
    """Fit ``module`` with a CPU/GPU Lightning trainer (no logger, no checkpoints)."""
    from torch.utils.data import DataLoader

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loader = DataLoader(train_items, batch_size=cfg.batch_size, shuffle=True, collate_fn=_collate)
    val = (
        DataLoader(val_items, batch_size=cfg.batch_size, collate_fn=_collate) if val_items else None
    )
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader, val)
    return module


@torch.no_grad()
def predict_studies(module: FinetuneModule, items: list[dict], batch_size: int) -> dict[str, dict]:
    """``{task: {study: prediction}}``: the mean of each study's series predictions."""
    module.eval()
    sums: dict[str, dict[str, Tensor]] = {t.name: {} for t in module.tasks}
    counts: dict[str, int] = {}
    for i in range(0, len(items), batch_size):
        batch = _collate(items[i : i + batch_size])
        outputs = module(batch["image"], batch["modality"])
        for t in module.tasks:
            pred = t.decode(outputs[t.name]).reshape(len(batch["study"]), -1)
            for study, p in zip(batch["study"], pred, strict=True):
                sums[t.name][study] = sums[t.name].get(study, 0) + p
        for study in batch["study"]:
            counts[study] = counts.get(study, 0) + 1
    return {n: {s: (v / counts[s]).tolist() for s, v in d.items()} for n, d in sums.items()}


# ---- the job ----------------------------------------------------------------------------------
def load_encoder_for(cfg: FinetuneConfig) -> LoadedEncoder:
    """The encoder the config asks for: checkpoint weights, or random init of the same shape."""
    enc = cfg.encoder
    if enc.init == "pretrained":
        if not enc.checkpoint:
            raise ValueError(f"{cfg.name}: encoder.init is 'pretrained' but no encoder.checkpoint")
        return load_vision_encoder(enc.checkpoint, enc.vision)
    if enc.init != "random":
        raise ValueError(f"{cfg.name}: encoder.init must be 'pretrained' or 'random'")
    vision = enc.vision
    if vision is None and enc.checkpoint:
        vision = asdict(load_vision_encoder(enc.checkpoint).model.cfg)  # same shape, new weights
    return load_vision_encoder(None, vision, seed=cfg.train.seed)


def labels_for(
    cfg: FinetuneConfig, key: PseudonymKey | None, manifest: dict[str, Any]
) -> LabelTable:
    """The label table; raw identifiers are hashed with the key the data was built under."""
    columns = sorted({c for t in cfg.tasks for c in t.label_columns})
    lab = cfg.labels
    raw = lab.namespace is not None or lab.key_column in ("accession_number", "patient_id")
    if raw and key is None:
        key = load_key(lab.key_file)
    if raw and manifest.get("key_id") and manifest["key_id"] != key.key_id:  # type: ignore[union-attr]
        raise ValueError(f"{cfg.data.manifest}: data built under another pseudonymisation key")
    return load_label_table(
        lab.path, lab.key_column, columns, key, join_on=lab.join_on, namespace=lab.namespace
    )


def split_strata(
    cfg: FinetuneConfig, study_patient: dict[str, str], rows: dict[str, dict] | None = None
) -> dict[str, float] | None:
    """Per-patient values of the first task's label to stratify k folds by (None: off).

    ``rows``: label rows per study; without them the strata are not known (None)."""
    task = cfg.tasks[0]
    if not cfg.split.stratify or task.type == "multilabel" or rows is None:
        return None
    return patient_strata(study_patient, {s: rows[s].get(task.column) for s in study_patient})


def make_run_split(
    cfg: FinetuneConfig, study_patient: dict[str, str], rows: dict[str, dict] | None = None
) -> Split:
    s = cfg.split
    if s.kfold and s.kfold > 1:
        if not 0 <= s.fold < s.kfold:
            raise ValueError(
                f"{cfg.name}: split.fold must be in [0, {s.kfold}) for this job "
                "(fold -1, pooled k-fold, is for linear_probe / mlp_probe with cls/mean pooling)"
            )
        return make_kfold(
            study_patient, s.kfold, s.seed, strata=split_strata(cfg, study_patient, rows)
        )[s.fold]
    return make_split(study_patient, tuple(s.fractions), s.seed)  # type: ignore[arg-type]


def run_finetune(
    config: FinetuneConfig | dict | str | Path,
    key: PseudonymKey | None = None,
    *,
    samples: Iterable[Sample] | None = None,
    transform: Callable[[np.ndarray, dict], Tensor] | None = None,
) -> dict[str, Any]:
    """Train and evaluate the config's heads; write split/metrics/predictions to ``out_dir``.

    ``samples`` and ``transform`` default to the manifest's shards and the evaluation
    transform; they are parameters so tests and notebooks can feed their own.
    """
    cfg = FinetuneConfig.from_any(config)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.data.manifest)
    loaded = load_encoder_for(cfg)
    if cfg.encoder.pooling == "auto":  # the embedding pretraining shaped: CLS or patch mean
        cfg.encoder.pooling = loaded.model.cfg.pool
    check_preprocessing(loaded.lineage, manifest, cfg.data.manifest)
    table = labels_for(cfg, key, manifest)
    samples = (
        samples
        if samples is not None
        else source_samples(cfg.data.manifest, cfg.data.modality, cfg.data.dims)
    )
    probe = (
        cfg.encoder.freeze in ("linear_probe", "mlp_probe") and cfg.encoder.pooling != "attention"
    )

    if probe:
        from foundation.evaluation.probe import run_probe_job

        result = run_probe_job(cfg, loaded, table, samples, transform, manifest)
    else:
        result = _run_module_job(cfg, loaded, table, samples, transform)
    result["split"].save(out / "split.json")
    return _finish(cfg, loaded, result, out)


def _run_module_job(cfg, loaded, table, samples, transform) -> dict[str, Any]:
    data = load_task_data(cfg, table, samples, transform)
    split = make_run_split(cfg, data.study_patient, data.rows)
    train_rows = [data.rows[s] for s in split.of("train")]
    fit_classes(cfg.tasks, data.rows.values())
    for t in cfg.tasks:
        t.fit_normalisation([r[t.column] for r in train_rows] if t.type == "regression" else [])
    enc = cfg.encoder
    freeze = "frozen" if enc.freeze in ("linear_probe", "mlp_probe") else enc.freeze
    module = FinetuneModule(
        loaded.model,
        cfg.tasks,
        enc.pooling,
        freeze,
        enc.unfreeze_last_k,
        enc.layer_decay,
        cfg.train.lr,
        cfg.train.weight_decay,
    )
    modality = MODALITIES.index(cfg.data.modality)
    items = {n: _items(data, cfg.tasks, split.of(n), modality) for n in ("train", "val", "test")}
    train_module(module, items["train"], items["val"], cfg.train)
    preds = predict_studies(module, items["test"], cfg.train.batch_size)
    return {"split": split, "predictions": preds, "rows": data.rows, "losses": module.losses}


def _finish(cfg: FinetuneConfig, loaded: LoadedEncoder, result: dict, out: Path) -> dict[str, Any]:
    """Metrics with bootstrap CIs per task on the test split; metrics.json, predictions.csv."""
    split: Split = result["split"]
    tasks_out: dict[str, Any] = {}
    pred_out: dict[str, dict[str, list]] = {}
    for t in cfg.tasks:
        by_study = result["predictions"][t.name]
        studies = [
            s
            for s in sorted(by_study)
            if not any(_nan(result["rows"][s][c]) for c in t.label_columns)
        ]
        y_true = np.array([t.true_values(result["rows"][s]) for s in studies], float)
        y_pred = np.array([by_study[s] for s in studies], float)
        if t.type in ("regression", "binary"):
            y_pred = y_pred.reshape(len(studies))
        ev = cfg.eval
        metrics = evaluate_predictions(
            t.type, y_true, y_pred, n_bootstrap=ev.n_bootstrap, seed=ev.seed, level=ev.level
        )
        tasks_out[t.name] = {
            "type": t.type,
            "metric": t.metric,
            "target_transform": t.target_transform,
            "n_test": len(studies),
            "metrics": metrics,
        }
        pred_out[t.name] = {"study": studies, "y_true": y_true.tolist(), "y_pred": y_pred.tolist()}
    results = {
        "name": cfg.name,
        "unit": "study",
        "encoder": {
            "init": cfg.encoder.init,
            "identity": loaded.identity,
            "freeze": cfg.encoder.freeze,
            "pooling": cfg.encoder.pooling,
            "load_report": str(loaded.report) if loaded.report else None,
        },
        "evaluation": split.method,
        "n_studies": {n: len(v) for n, v in split.studies.items()},
        "tasks": tasks_out,
    }
    if result.get("probe"):
        results["probe"] = result["probe"]  # e.g. the CV-chosen ridge penalty of each fold
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task", "study", "y_true", "y_pred"])
        for name, p in pred_out.items():
            for s, yt, yp in zip(p["study"], p["y_true"], p["y_pred"], strict=True):
                w.writerow([name, s, json.dumps(yt), json.dumps(yp)])
    results["predictions"] = pred_out
    results["split"] = split.to_json()
    results["losses"] = result.get("losses", [])
    results["out_dir"] = str(out)
    return results
