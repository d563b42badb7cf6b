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

The config dataclasses live in ``finetune_config`` and the Lightning module in
``finetune_module``; both are re-exported here.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from foundation.data.encoder_input import encoder_eval_transform, input_lineage, input_windows
from foundation.data.exclusion_filter import load_exclusion
from foundation.data.labels import (
    LabelledSamples,
    LabelTable,
    join_labels,
    load_label_table,
    source_samples,
)
from foundation.evaluation.baseline import constant_predictions
from foundation.evaluation.metrics import evaluate_predictions
from foundation.evaluation.report import json_clean
from foundation.evaluation.splits import Split, make_kfold, make_split, patient_strata
from foundation.models.export import (
    LoadedEncoder,
    check_preprocessing,
    load_vision_encoder,
    read_manifest,
)
from foundation.models.heads import TaskSpec
from foundation.privacy.pseudonym import PseudonymKey, load_key
from foundation.sample import MODALITIES, Sample

# The config and the Lightning module live in their own modules; their names stay importable
# from here (configs, docs/configuration.md, tests and scripts name them through this module).
from foundation.training.finetune_config import (
    DEFAULT_SIZE,
    FREEZE_MODES,
    DataConfig,
    EncoderConfig,
    EvalConfig,
    FinetuneConfig,
    LabelsConfig,
    SplitConfig,
    TrainConfig,
)
from foundation.training.finetune_module import (
    FinetuneModule,
    predict_studies,
    series_items,
    train_module,
)

__all__ = [
    "DEFAULT_SIZE",
    "FREEZE_MODES",
    "DataConfig",
    "EncoderConfig",
    "EvalConfig",
    "FinetuneConfig",
    "FinetuneModule",
    "LabelsConfig",
    "SplitConfig",
    "TaskSpec",
    "TrainConfig",
    "build_transform",
    "fit_classes",
    "labels_for",
    "load_encoder_for",
    "load_task_data",
    "make_run_split",
    "predict_studies",
    "run_finetune",
    "split_strata",
    "train_module",
]

log = logging.getLogger(__name__)


# ---- data -------------------------------------------------------------------------------------
def build_transform(
    dims: int, size: list[int], encoder: LoadedEncoder | None = None
) -> Callable[[np.ndarray, dict], Tensor]:
    """The deterministic evaluation transform of the data stage, giving ``encoder`` the input it
    was pretrained on: its ``in_channels`` (all CT windows, or the first) and the CT windows its
    lineage records (``foundation.data.encoder_input``). No encoder: one channel, defaults."""
    if encoder is None:
        return encoder_eval_transform(dims, tuple(size), 1)
    return encoder_eval_transform(
        dims, tuple(size), encoder.model.cfg.in_channels, encoder.lineage, encoder.source
    )


def load_task_data(
    cfg: FinetuneConfig,
    table: LabelTable,
    samples: Iterable[Sample],
    transform: Callable[[np.ndarray, dict], Tensor] | None = None,
    encoder: LoadedEncoder | None = None,
) -> LabelledSamples:
    """The config's labelled samples with their images transformed by ``transform``, else by
    the evaluation transform that fits ``encoder`` (see ``build_transform``)."""

    def make(dims: int) -> Callable[[np.ndarray, dict], Tensor]:
        size = cfg.data.image_size or DEFAULT_SIZE[dims]
        return transform or build_transform(dims, size, encoder)

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
        # same shape and inputs (channels, CT windows), new weights
        source = load_vision_encoder(enc.checkpoint)
        random = load_vision_encoder(None, asdict(source.model.cfg), seed=cfg.train.seed)
        random.lineage = input_lineage(source.lineage)
        random.source = f"random init of {source.source}"
        return random
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
    kind = {"regression": "number", "binary": "binary", "multilabel": "binary"}
    kinds = {c: kind.get(t.type, "class") for t in cfg.tasks for c in t.label_columns}
    return load_label_table(
        lab.path,
        lab.key_column,
        columns,
        key,
        join_on=lab.join_on,
        namespace=lab.namespace,
        kinds=kinds,
    )


def split_strata(
    cfg: FinetuneConfig, study_patient: dict[str, str], rows: dict[str, dict] | None = None
) -> dict[str, float] | None:
    """Per-patient values of the first task's label to stratify k folds by (None: off).

    ``rows``: label rows per study; without them the strata are not known (None)."""
    task = cfg.tasks[0]
    if not cfg.split.stratify or task.type == "multilabel" or rows is None:
        return None
    return patient_strata(
        study_patient, {s: rows[s].get(task.column) for s in study_patient if s in rows}
    )


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
    if transform is None:  # an encoder its data cannot feed fails here, before any image is read
        input_windows(loaded.model.cfg.in_channels, loaded.lineage, loaded.source)
    table = labels_for(cfg, key, manifest)
    exclusion = load_exclusion(cfg.data.manifest, cfg.data.exclusion_list)
    if exclusion.version is None and (loaded.lineage or {}).get("exclusion_version"):
        log.warning(
            "%s: the encoder was pretrained honouring an exclusion list and this run reads "
            "every patient; set data.exclusion_list (--exclusion-list) to the current list",
            cfg.name,
        )
    samples = exclusion.drop(
        samples
        if samples is not None
        else source_samples(cfg.data.manifest, cfg.data.modality, cfg.data.dims)
    )
    probe = (
        cfg.encoder.freeze in ("linear_probe", "mlp_probe") and cfg.encoder.pooling != "attention"
    )

    if probe:
        from foundation.evaluation.probe import run_probe_job

        result = run_probe_job(cfg, loaded, table, samples, transform, manifest, exclusion.version)
    else:
        result = _run_module_job(cfg, loaded, table, samples, transform)
    result["exclusion"] = {
        "version": exclusion.version,
        "excluded_patients": exclusion.in_dataset,  # of this manifest, read by no head
    }
    # label rows that found a study: a table keyed by identifiers the data does not hold (a
    # number that lost its leading zeros, another site's) shows here, not as a smaller cohort
    result["labels"] = {"rows": len(table), "joined": len(table.joined)}
    result["split"].save(out / "split.json")
    return _finish(cfg, loaded, result, out)


def _run_module_job(cfg, loaded, table, samples, transform) -> dict[str, Any]:
    data = load_task_data(cfg, table, samples, transform, loaded)
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
    items = {
        n: series_items(data, cfg.tasks, split.of(n), modality) for n in ("train", "val", "test")
    }
    train_module(module, items["train"], items["val"], cfg.train)
    preds = predict_studies(module, items["test"], cfg.train.batch_size)
    return {
        "split": split,
        "predictions": preds,
        "rows": data.rows,
        "losses": module.losses,
        "study_patient": data.study_patient,
        "training": {"best_epoch": module.best_epoch, "val_losses": module.val_losses},
    }


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
        scoring: dict[str, Any] = {
            "n_bootstrap": ev.n_bootstrap,
            "seed": ev.seed,
            "level": ev.level,
            "target_transform": t.target_transform,
            # intervals resample patients: their studies are not independent draws
            "groups": np.array([result["study_patient"][s] for s in studies]),
        }
        if t.type == "binary" and len(set(y_true.tolist())) < 2:
            log.warning(
                "%s: the test studies of task %s hold one class only (%d studies): AUROC and "
                "AUPRC are undefined (null in metrics.json); use k-fold (split.kfold) or more "
                "patients",
                cfg.name,
                t.name,
                len(studies),
            )
        metrics = evaluate_predictions(t.type, y_true, y_pred, **scoring)
        tasks_out[t.name] = {
            "type": t.type,
            "metric": t.metric,
            "target_transform": t.target_transform,
            "n_test": len(studies),
            "metrics": metrics,
        }
        # the same split's constant predictor (the fitted-on mean): the floor a head must beat
        const = constant_predictions(t, result["rows"], split)
        if studies and all(s in const for s in studies):
            b_pred = np.array([const[s] for s in studies], float).reshape(y_pred.shape)
            tasks_out[t.name]["baseline"] = evaluate_predictions(t.type, y_true, b_pred, **scoring)
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
        "exclusion": result.get("exclusion"),
        "labels": result.get("labels"),
        "n_studies": {n: len(v) for n, v in split.studies.items()},
        "tasks": tasks_out,
    }
    if result.get("training"):  # the epoch whose weights predicted the test split
        results["training"] = result["training"]
    if result.get("probe"):
        results["probe"] = result["probe"]  # e.g. the CV-chosen ridge penalty of each fold
    (out / "metrics.json").write_text(
        json.dumps(json_clean(results), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
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
