"""Linear and MLP probes on frozen encoders, over cached embeddings (the probe path of
``run_finetune``).

A probe suite over many biomarkers should cost one encoder pass per (encoder, data): the
embeddings of every sample of a modality/dims (CLS and mean-pooled, both) are computed once
and cached under a key made of the encoder's content hash (or its random-init seed and
config), the manifest version and the transform (modality, dims, size, CT windows fed). Each
biomarker then fits a small head on study embeddings (the mean of the study's series) in
milliseconds: per task and per fold, a ridge / logistic probe (``linear_probe``) or an MLP.

The suite over tasks, pretrained vs random init, lives in ``probe_suite``; its names stay
importable from here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from foundation.data.encoder_input import input_windows, windows_record
from foundation.data.labels import LabelTable, select_samples
from foundation.evaluation.linear_probe import fit_linear_probe, target_range

# The suite lives in its own module; its names stay importable from here (the CLI, the demo,
# tests). probe_suite does not import this module, so there is no cycle.
from foundation.evaluation.probe_suite import evaluation_mode, run_probe_suite
from foundation.evaluation.splits import POOLED, SPLIT_NAMES, Split, make_kfold
from foundation.models.export import LoadedEncoder, manifest_version
from foundation.models.heads import TaskSpec, make_head
from foundation.sample import MODALITIES, Sample

__all__ = [
    "CACHE_FORMAT",
    "POOLED",
    "cache_key",
    "cached_embeddings",
    "embed_samples",
    "evaluation_mode",
    "fit_probe",
    "fit_probes",
    "run_probe_job",
    "run_probe_suite",
    "study_embeddings",
]

CACHE_FORMAT = 2  # 2: keys <entry>-<data>, embeddings without excluded patients


# ---- embedding cache --------------------------------------------------------------------------
def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def cache_key(
    identity: str,
    vision_cfg: dict,
    manifest_version: str,
    transform: dict,
    *,
    dataset: str = "",
    exclusion_version: str | None = None,
) -> str:
    """``<entry>-<data>`` naming a cache file. The entry hashes the encoder weights, its config,
    the transform spec and the dataset (e.g. the manifest's path); the data part hashes the
    manifest version and the exclusion list applied, which change with every erasure or new
    opt-out (``cached_embeddings`` then drops the entry's older files)."""
    entry = {
        "format": CACHE_FORMAT,
        "encoder": identity,
        "vision": vision_cfg,
        "transform": transform,
        "dataset": dataset,
    }
    data = {"manifest": manifest_version, "exclusion": exclusion_version}
    return f"{_digest(entry)}-{_digest(data)}"


@torch.no_grad()
def embed_samples(
    model: torch.nn.Module,
    samples: Iterable[Sample],
    transform: Callable[[np.ndarray, dict], Tensor],
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """One encoder pass: per sample ``cls`` and ``mean`` (patch-token mean) embeddings (n, D)."""
    model.eval()
    ids: dict[str, list[str]] = {"key": [], "study": [], "patient": [], "accession": []}
    cls, mean = [], []
    images: list[Tensor] = []
    mods: list[int] = []

    def flush() -> None:
        if images:
            tokens = model(torch.stack(images), torch.tensor(mods)).tokens  # (B, 1 + N, D)
            cls.append(tokens[:, 0].float().numpy())
            mean.append(tokens[:, 1:].mean(dim=1).float().numpy())
            images.clear()
            mods.clear()

    for s in samples:
        images.append(transform(s.image, s.meta))
        mods.append(MODALITIES.index(s.meta["modality"]))
        ids["key"].append(s.key)
        for name in ("study", "patient", "accession"):
            ids[name].append(str(s.meta.get(name) or ""))
        if len(images) == batch_size:
            flush()
    flush()
    if not cls:
        raise ValueError("no sample to embed (modality/dims filter left none)")
    out = {k: np.array(v) for k, v in ids.items()}
    out["cls"], out["mean"] = np.concatenate(cls), np.concatenate(mean)
    return out


def cached_embeddings(
    cache_dir: Path, key: str, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load ``cache_dir/<key>.npz`` or compute and store it (written atomically).

    Storing it removes the files of the same entry made from an older dataset version or
    exclusion list (``cache_key``), and the files of the older key format, which named no
    version: they may hold the embeddings and pseudonyms of patients erased or opted out
    since, which neither erasure nor the stream's filter reaches. Other entries (another
    encoder, transform or dataset path) are left as they are."""
    path = cache_dir / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    arrays = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".partial")
    with os.fdopen(fd, "wb") as f:  # a name of its own: jobs sharing the folder never collide
        np.savez(f, **arrays)
    Path(tmp_name).replace(path)
    entry = key.split("-", 1)[0]
    stale = re.compile(rf"^(?:{entry}-[0-9a-f]{{32}}|[0-9a-f]{{32}})\.npz$")
    for older in cache_dir.iterdir():
        if older != path and stale.match(older.name):
            older.unlink(missing_ok=True)
    return arrays


def study_embeddings(
    arrays: dict[str, np.ndarray], pooling: str, table: LabelTable
) -> tuple[list[str], np.ndarray, dict[str, str], dict[str, dict]]:
    """Studies with a label row, their embeddings (mean over series), patients and rows."""
    emb = arrays[pooling]
    by_study: dict[str, list[int]] = {}
    study_patient: dict[str, str] = {}
    rows: dict[str, dict] = {}
    for i, study in enumerate(arrays["study"].tolist()):
        meta = {
            "study": study,
            "patient": str(arrays["patient"][i]),
            "accession": str(arrays["accession"][i]),
        }
        row = table.lookup(meta)
        if row is None:
            continue
        by_study.setdefault(study, []).append(i)
        study_patient[study] = meta["patient"]
        rows[study] = row
    studies = sorted(by_study)
    x = (
        np.stack([emb[by_study[s]].mean(axis=0) for s in studies])
        if studies
        else np.zeros((0, emb.shape[1]))
    )
    return studies, x, study_patient, rows


# ---- probes -----------------------------------------------------------------------------------
def fit_probe(
    x_train: np.ndarray,
    t_train: np.ndarray,
    x_val: np.ndarray,
    t_val: np.ndarray,
    task: TaskSpec,
    hidden: int = 0,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[Callable[[np.ndarray], np.ndarray], list[float]]:
    """Full-batch AdamW probe on standardised features; keeps the best-validation weights.

    ``t_*``: encoded targets (n, 1 or L), NaN = missing. Returns ``predict(x) -> decoded``
    predictions (regression: clipped to the range of ``t_train``, as the ridge probe does) and
    the training-loss curve.
    """
    torch.manual_seed(seed)
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    xt = torch.tensor((x_train - mu) / sd, dtype=torch.float32)
    tt = torch.tensor(t_train, dtype=torch.float32)
    xv = torch.tensor((x_val - mu) / sd, dtype=torch.float32) if len(x_val) else None
    tv = torch.tensor(t_val, dtype=torch.float32) if len(x_val) else None
    head = make_head(xt.shape[1], task.out_features, hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, losses = float("inf"), copy.deepcopy(head.state_dict()), []
    for step in range(steps):
        head.train()
        loss = task.loss(head(xt), tt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if xv is not None and (step % 5 == 4 or step == steps - 1):
            head.eval()
            with torch.no_grad():
                v = float(task.loss(head(xv), tv))
            if v < best:
                best, best_state = v, copy.deepcopy(head.state_dict())
    if xv is not None:
        head.load_state_dict(best_state)
    head.eval()
    # As the ridge probe: a ReLU head extrapolates linearly too, and under a log1p target one
    # study far outside the training features would decode to an absurd score.
    bounds = (
        tuple(torch.tensor(b, dtype=torch.float32) for b in target_range(t_train))
        if task.type == "regression"
        else None
    )

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = head(torch.tensor((x - mu) / sd, dtype=torch.float32))
            if bounds is not None:
                out = torch.clamp(out, *bounds)
            return task.decode(out).reshape(len(x), -1).numpy()

    return predict, losses


def run_probe_job(
    cfg: Any,
    loaded: LoadedEncoder,
    table: LabelTable,
    samples: Iterable[Sample],
    transform: Callable[[np.ndarray, dict], Tensor] | None,
    manifest: dict,
    exclusion_version: str | None = None,
) -> dict[str, Any]:
    """The probe path of ``run_finetune`` (cfg: a FinetuneConfig); ``samples`` come without
    the excluded patients of ``exclusion_version``, which names the cache too."""
    from foundation.training import finetune as ft

    d = cfg.data
    spec = {"modality": d.modality, "dims": d.dims, "size": d.image_size, "transform": "eval"}
    if transform is None:  # the CT windows fed to the encoder (from its lineage) name the cache too
        fed = input_windows(loaded.model.cfg.in_channels, loaded.lineage, loaded.source)
        spec["ct_windows"] = windows_record(fed)
    vision = asdict(loaded.model.cfg)
    key = cache_key(
        loaded.identity,
        vision,
        manifest_version(manifest, d.manifest),
        spec,
        dataset=str(Path(d.manifest).resolve()) if d.manifest else "",
        exclusion_version=exclusion_version,
    )
    cache_dir = (
        Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir).parent / "embedding_cache"
    )

    def compute() -> dict[str, np.ndarray]:
        selected = select_samples(samples, d.modality, d.dims)
        first = next(selected, None)
        if first is None:
            raise ValueError(f"{d.manifest}: no {d.modality} sample of the requested dims")
        dims = int(first.meta["dims"])
        tf = transform or ft.build_transform(dims, d.image_size or ft.DEFAULT_SIZE[dims], loaded)

        def chain() -> Iterable[Sample]:
            yield first
            yield from selected

        return embed_samples(loaded.model, chain(), tf, cfg.train.batch_size)

    arrays = cached_embeddings(cache_dir, key, compute)
    studies, x, study_patient, rows = study_embeddings(arrays, cfg.encoder.pooling, table)
    if not studies:
        raise ValueError(
            f"{d.manifest}: no {d.modality} study joins the label table ({table.source})"
        )
    return fit_probes(cfg, studies, x, study_patient, rows)


def fit_probes(
    cfg: Any,
    studies: list[str],
    x: np.ndarray,
    study_patient: dict[str, str],
    rows: dict[str, dict],
) -> dict[str, Any]:
    """Fit the config's probes on study embeddings ``x`` (n, D) and predict held-out studies.

    ``split.kfold > 1`` with ``split.fold == POOLED``: one probe per fold, fitted on the other
    folds' patients, predicts its fold, so every study gets one out-of-fold prediction; else
    the test studies of the config's split. Returns ``{"split", "predictions", "rows",
    "losses", "probe", "study_patient"}`` (predictions: ``{task: {study: decoded prediction}}``).
    """
    from foundation.training import finetune as ft

    ft.fit_classes(cfg.tasks, rows.values())
    groups = np.array([study_patient[s] for s in studies])
    k = cfg.split.kfold
    if k and k > 1 and cfg.split.fold == POOLED:
        # Every study is predicted once, by a probe fitted on the other folds' patients.
        strata = ft.split_strata(cfg, study_patient, rows)
        folds = make_kfold(study_patient, k, cfg.split.seed, strata=strata)
        split = Split(
            studies={f"fold{i}": f.studies["test"] for i, f in enumerate(folds)},
            patients={f"fold{i}": f.patients["test"] for i, f in enumerate(folds)},
            seed=cfg.split.seed,
            method=f"kfold:{k}:pooled" + (":stratified" if strata is not None else ""),
        )
    else:
        folds = [ft.make_run_split(cfg, study_patient, rows)]
        split = folds[0]
    index = {s: i for i, s in enumerate(studies)}
    predictions: dict[str, dict[str, list]] = {t.name: {} for t in cfg.tasks}
    losses: dict[str, list] = {t.name: [] for t in cfg.tasks}
    chosen: dict[str, list] = {t.name: [] for t in cfg.tasks}
    for fold in folds:
        part = {n: np.array([index[s] for s in sorted(fold.of(n))], int) for n in SPLIT_NAMES}
        for t in cfg.tasks:
            pred, info = _fit_predict(cfg, t, x, groups, rows, studies, part)
            predictions[t.name].update(pred)
            losses[t.name].append(info.get("losses") or info.get("cv_loss"))
            if "lambda" in info:
                chosen[t.name].append(info["lambda"])
    if len(folds) == 1:
        losses = {n: v[0] for n, v in losses.items()}
    probe = {"kind": cfg.encoder.freeze, "lambda": chosen} if any(chosen.values()) else None
    return {
        "split": split,
        "predictions": predictions,
        "rows": rows,
        "losses": losses,
        "probe": probe,
        "study_patient": study_patient,
    }


def _fit_predict(
    cfg: Any,
    t: TaskSpec,
    x: np.ndarray,
    groups: np.ndarray,
    rows: dict[str, dict],
    studies: list[str],
    part: dict[str, np.ndarray],
) -> tuple[dict[str, list], dict]:
    """One probe on one split (``part``: row indices per split name) -> test predictions.

    Linear probes fit on train + val with the penalty chosen by inner patient-grouped CV;
    MLP probes fit on train and keep the weights of the best validation loss.
    """
    linear = cfg.encoder.freeze == "linear_probe"
    fit = np.concatenate([part["train"], part["val"]]) if linear else part["train"]
    # Regression targets are standardised on the rows the probe is fitted on (this fold's).
    t.fit_normalisation([rows[studies[i]][t.column] for i in fit] if t.type == "regression" else [])
    targets = np.array([t.encode(rows[s]) for s in studies], float)  # NaN = missing
    if linear:
        predict, info = fit_linear_probe(
            x[fit], targets[fit], groups[fit].tolist(), t, seed=cfg.train.seed
        )
    else:
        va = part["val"]
        predict, curve = fit_probe(
            x[fit],
            targets[fit],
            x[va],
            targets[va],
            t,
            cfg.encoder.probe_hidden,
            cfg.train.probe_steps,
            cfg.train.lr,
            cfg.train.weight_decay,
            cfg.train.seed,
        )
        info = {"losses": curve}
    te = part["test"]
    pred = predict(x[te]) if len(te) else np.zeros((0, t.out_features))
    return {studies[i]: p.tolist() for i, p in zip(te, pred, strict=True)}, info
