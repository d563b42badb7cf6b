"""Biomarker heads end to end on CPU: tiny checkpoint -> labels -> split -> probe/fine-tune.

The cohort is made here: XR studies whose bright "heart" box width is the cardiothoracic ratio
(cardiomegaly when > 0.5), and CT volumes whose count of bright voxels grows with the calcium
score; written to real shards with a manifest. The label table is keyed by raw accession
numbers and also holds raw patient IDs, so every output can be grepped for them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from foundation.data.labels import LabelTableError, load_label_table
from foundation.evaluation.probe import run_probe_suite
from foundation.evaluation.retrieval import evaluate_retrieval
from foundation.models.export import (
    CheckpointError,
    check_preprocessing,
    load_encoder,
    load_state_into,
    load_vision_encoder,
)
from foundation.models.heads import MultiTaskHead, TaskSpec
from foundation.models.vision import VisionConfig, VisionTransformer
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.privacy.pseudonym import PseudonymKey
from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest
from foundation.shards.writer import ShardWriter
from foundation.training.finetune import (
    FinetuneConfig,
    FinetuneModule,
    TrainConfig,
    run_finetune,
    train_module,
)
from foundation.training.pretrain import PretrainModule

SECRET = b"test-only-secret-key-0123456789abcdef"
N_PATIENTS = 30
XR_SIDE, CT_SIDE = 32, 16
PREPROCESSING = {"version": "p1", "policy": {"xr_size": 32}}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def _key() -> PseudonymKey:
    return PseudonymKey(SECRET)


def _transform(dims: int):
    """The data stage's evaluation transform when it exists; else a plain float conversion."""
    size = (XR_SIDE,) * 2 if dims == 2 else (CT_SIDE,) * 3
    try:
        from foundation.data.transforms import eval_transform

        return eval_transform(dims, size)
    except ImportError:

        def standin(image: np.ndarray, meta: dict) -> torch.Tensor:
            x = image.astype(np.float32)
            if meta["modality"] == "CT":
                x = np.clip((x + 1024.0) / 4095.0, 0.0, 1.0)
            return torch.from_numpy(x)[None]

        return standin


def _xr(rng: np.random.Generator, ctr: float) -> np.ndarray:
    img = rng.normal(0.1, 0.03, (XR_SIDE, XR_SIDE))
    w = round(ctr * XR_SIDE)
    x0 = (XR_SIDE - w) // 2
    img[10:24, x0 : x0 + w] += 0.6
    return np.clip(img, 0, 1).astype(np.float16)


def _ct(rng: np.random.Generator, calcium: float) -> np.ndarray:
    vol = rng.normal(-900, 20, (CT_SIDE,) * 3)
    n = round(4 * math.log1p(calcium))
    idx = rng.choice(CT_SIDE**3, size=n, replace=False)
    vol.reshape(-1)[idx] = 900
    return vol.astype(np.int16)


def _sample(study: str, j: int, image: np.ndarray, modality: str, ids: dict) -> Sample:
    meta = {
        **ids,
        "study": study,
        "series_index": j,
        "modality": modality,
        "dims": image.ndim,
        "spacing": [1.0] * image.ndim,
        "shape": list(image.shape),
        "preprocessing": PREPROCESSING,
    }
    return Sample(sample_key(study, j), image, meta, report=f"rapport {modality} {study[:6]}")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards + manifest + a raw-keyed label CSV; returns paths and the raw identifiers."""
    root = tmp_path_factory.mktemp("cohort")
    key, rng = _key(), np.random.default_rng(0)
    raw_ids: list[str] = []
    rows = []
    with ShardWriter(root / "shards", max_samples=50) as writer:
        for i in range(N_PATIENTS):
            pid, acc_xr, acc_ct = f"PID{i:05d}", f"ACCX{i:05d}", f"ACCC{i:05d}"
            raw_ids += [pid, acc_xr, acc_ct]
            ids = {"patient": key.patient(pid)}
            ctr = float(rng.uniform(0.35, 0.65))
            calcium = float(rng.choice([0.0, 5.0, 60.0, 400.0]) * rng.uniform(0.8, 1.2))
            study = key.pseudonym("study", f"1.2.250.{i}.1")
            for j in range(1 + (i % 3 == 0)):  # some XR studies have two series
                ids_x = {**ids, "accession": key.pseudonym("accession", acc_xr)}
                writer.write(_sample(study, j, _xr(rng, ctr), "XR", ids_x))
            study_ct = key.pseudonym("study", f"1.2.250.{i}.2")
            ids_c = {**ids, "accession": key.pseudonym("accession", acc_ct)}
            writer.write(_sample(study_ct, 0, _ct(rng, calcium), "CT", ids_c))
            rows.append([acc_xr, pid, "", f"{ctr:.4f}", int(ctr > 0.5)])
            rows.append([acc_ct, pid, f"{calcium:.1f}", "", ""])
        records = writer.close()
    manifest = Manifest(
        dataset="unit", key_id=key.key_id, shards=records, shard_root="shards",
        preprocessing=PREPROCESSING, exclusion_version="excl-1",
    )  # fmt: skip
    manifest.save(root / "manifest.json")
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "accession_number",
                "patient_id",
                "calcium_score",
                "cardiothoracic_ratio",
                "cardiomegaly",
            ]
        )
        w.writerows(rows)
    return {"root": root, "manifest": root / "manifest.json", "labels": labels, "raw_ids": raw_ids}


class _Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "image": torch.rand(1, XR_SIDE, XR_SIDE, generator=g),
            "modality": torch.tensor(2),
            "input_ids": torch.randint(5, 60, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
        }


def tiny_pretrain_module() -> PretrainModule:
    return PretrainModule(
        vision={"preset": "tiny", "patch_size_2d": 8, "patch_size_3d": 8},
        text={"preset": "tiny", "vocab_size": 64, "max_length": 16},
        embed_dim=32, decoder_dim=32, decoder_depth=1, decoder_heads=2, warmup_steps=1,
        lineage={"dataset": "unit", "manifest_version": "unit-v1", "exclusion_version": "excl-1",
                 "preprocessing": PREPROCESSING},
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Lightning checkpoint of a tiny PretrainModule after two training steps."""
    root = tmp_path_factory.mktemp("ckpt")
    L.seed_everything(0)
    module = tiny_pretrain_module()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, DataLoader(_Pairs(), batch_size=2))
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _config(cohort: dict, checkpoint: Path, out: Path, **encoder) -> dict:
    return {
        "name": "heart",
        "tasks": [
            {"name": "cardiothoracic_ratio", "type": "regression"},
            {"name": "cardiomegaly", "type": "binary"},
        ],
        "data": {"manifest": str(cohort["manifest"]), "modality": "XR", "dims": 2,
                 "image_size": [XR_SIDE, XR_SIDE]},
        "labels": {"path": str(cohort["labels"]), "key_column": "accession_number"},
        "encoder": {"checkpoint": str(checkpoint), **encoder},
        "split": {"fractions": [0.6, 0.2, 0.2], "seed": 3},
        "train": {"epochs": 2, "batch_size": 8, "probe_steps": 60},
        "eval": {"n_bootstrap": 50},
        "out_dir": str(out),
    }  # fmt: skip


def _all_bytes(directory: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in directory.rglob("*") if p.is_file()]


# ---- tests ------------------------------------------------------------------------------------
def test_head_trains_from_a_tiny_checkpoint_and_the_loss_falls(checkpoint: Path) -> None:
    loaded = load_vision_encoder(checkpoint)
    assert loaded.report is not None and loaded.report.prefix == "vision."
    assert not loaded.report.missing and not loaded.report.unexpected
    assert loaded.lineage["preprocessing"] == PREPROCESSING
    task = TaskSpec("width", "regression")
    g = torch.Generator().manual_seed(0)
    widths = torch.rand(32, generator=g) * 0.5 + 0.25
    items = []
    for w in widths:
        img = torch.full((1, XR_SIDE, XR_SIDE), 0.1)
        img[:, 8:24, : int(w * XR_SIDE)] = 0.8
        t = torch.tensor([(float(w) - 0.5) / 0.15])
        items.append(
            {"image": img, "modality": torch.tensor(2), "targets": {"width": t}, "study": "s"}
        )
    module = FinetuneModule(loaded.model, [task], pooling="mean", freeze="last_k", lr=3e-3)
    train_module(module, items, [], TrainConfig(epochs=8, batch_size=8, seed=0))
    first, last = np.mean(module.losses[:4]), np.mean(module.losses[-4:])
    assert last < 0.5 * first


def test_run_finetune_writes_no_raw_identifier(
    cohort: dict, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = _config(cohort, checkpoint, out)
    cfg["cache_dir"] = str(tmp_path / "cache")
    res = run_finetune(cfg, _key())  # the data stage's eval transform at data.image_size
    for name in ("cardiothoracic_ratio", "cardiomegaly"):
        task = res["tasks"][name]
        assert task["n_test"] > 0
        main = task["metrics"][task["metric"]]
        assert math.isfinite(main["value"])
        assert main["ci"][0] <= main["ci"][1]
    assert res["unit"] == "study"
    split = json.loads((out / "split.json").read_text())
    sets = {k: set(v) for k, v in split["studies"].items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"])
    assert sum(map(len, sets.values())) == N_PATIENTS  # every labelled XR study, once
    # Neither raw accession numbers nor raw patient IDs reach any file written by the run.
    written = _all_bytes(out) + _all_bytes(tmp_path / "cache")
    assert {p.name for p, _ in written} >= {"split.json", "metrics.json", "predictions.csv"}
    for path, data in written:
        for raw in cohort["raw_ids"]:
            assert raw.encode() not in data, f"{path.name} holds a raw identifier"
    assert SECRET not in b"".join(d for _, d in written)


def test_excluded_patients_reach_no_head_and_no_cache(
    cohort: dict, checkpoint: Path, tmp_path: Path
) -> None:
    key, cache = _key(), tmp_path / "cache"

    def run(out: str, exclusion: Path | None = None) -> dict:
        cfg = _config(cohort, checkpoint, tmp_path / out)
        cfg["cache_dir"] = str(cache)
        cfg["data"]["exclusion_list"] = str(exclusion) if exclusion else None
        return run_finetune(cfg, key)

    run("every")
    before = set(cache.glob("*.npz"))
    assert len(before) == 1
    opted_out = {key.patient(f"PID{i:05d}") for i in (0, 4, 7)}
    their_studies = {key.pseudonym("study", f"1.2.250.{i}.1") for i in (0, 4, 7)}  # labelled XR
    excl = ExclusionList([ExclusionEntry(p, "opposition", "2026-01-02") for p in opted_out],
                         key_id=key.key_id)  # fmt: skip
    excl.save(tmp_path / "exclusion.json")
    legacy, other_entry = cache / ("0" * 32 + ".npz"), cache / ("a" * 32 + "-" + "b" * 32 + ".npz")
    for f in (legacy, other_entry):  # a cache of the old key format, one of another encoder
        f.write_bytes(b"x")
    run("opted", tmp_path / "exclusion.json")
    assert not legacy.exists() and other_entry.exists()
    other_entry.unlink()

    split = json.loads((tmp_path / "opted" / "split.json").read_text())
    assert not their_studies & {s for ss in split["studies"].values() for s in ss}
    assert sum(map(len, split["studies"].values())) == N_PATIENTS - len(opted_out)
    metrics = json.loads((tmp_path / "opted" / "metrics.json").read_text())
    assert metrics["exclusion"] == {"version": excl.version, "excluded_patients": 3}
    # the cache made before the opt-out is gone; the new one never held those patients
    after = list(cache.glob("*.npz"))
    assert len(after) == 1 and after[0] not in before
    with np.load(after[0]) as z:
        assert not opted_out & set(z["patient"].tolist())
        assert len(set(z["patient"].tolist())) == N_PATIENTS - len(opted_out)
    # a list made under another key is refused, naming it
    other = ExclusionList(excl.entries, key_id="another-key-id")
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"other\.json: made under another pseudonymisation key"):
        run("other", tmp_path / "other.json")


def test_labels_hashed_under_another_key_are_refused(
    cohort: dict, checkpoint: Path, tmp_path: Path
) -> None:
    cfg = _config(cohort, checkpoint, tmp_path / "other")
    with pytest.raises(ValueError, match="another pseudonymisation key"):
        run_finetune(cfg, PseudonymKey(b"another-key-of-the-right-length"))


def test_split_keeps_patients_on_one_side(cohort: dict, checkpoint: Path, tmp_path: Path) -> None:
    """k-fold: each patient is in the test fold once; the folds share one encoder pass."""
    cfg = _config(cohort, checkpoint, tmp_path / "kf")
    cfg["labels"] = {"path": str(cohort["labels"]), "key_column": "accession_number"}
    tests = set()
    for fold in range(3):
        cfg["split"] = {"kfold": 3, "fold": fold, "seed": 1}
        cfg["out_dir"] = str(tmp_path / f"kf{fold}")
        cfg["cache_dir"] = str(tmp_path / "cache")
        res = run_finetune(cfg, _key(), transform=_transform(2))
        studies = res["split"]["studies"]
        assert not set(studies["test"]) & (set(studies["train"]) | set(studies["val"]))
        assert not tests & set(studies["test"])
        tests |= set(studies["test"])
    assert len(tests) == N_PATIENTS  # each patient's XR study is test exactly once
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # one encoder pass for 3 folds


def test_probe_suite_compares_pretrained_and_random(
    cohort: dict, checkpoint: Path, tmp_path: Path
) -> None:
    tasks = [
        CONFIGS / "cardiothoracic_ratio.yaml",
        CONFIGS / "cardiomegaly.yaml",
        CONFIGS / "calcium_score.yaml",
    ]
    out = tmp_path / "suite"
    calls = []

    def transform(image: np.ndarray, meta: dict) -> torch.Tensor:
        calls.append(meta["study"])
        return _transform(meta["dims"])(image, meta)

    results = run_probe_suite(
        checkpoint, cohort["manifest"], cohort["labels"], tasks, _key(), out,
        n_bootstrap=50, transform=transform,
        # the shipped configs name the demo's exclusion list: this cohort has none
        overrides={"data.image_size": None, "train.probe_steps": 60, "split.fractions": [0.5, 0.2, 0.3],
                   "data.exclusion_list": None},
    )  # fmt: skip
    assert set(results) == {"cardiothoracic_ratio", "cardiomegaly", "calcium_score"}
    headline = {
        "cardiomegaly": "auroc",
        "cardiothoracic_ratio": "mae",
        "calcium_score": "mae_log1p",
    }
    for name, r in results.items():
        assert r["metric"] == headline[name]
        for init in ("pretrained", "random_init"):
            assert math.isfinite(r[init])
            lo, hi = r[f"{init}_ci"]
            assert lo <= hi
    # the calcium headline is the log1p-scale MAE of the predictions in Agatston units
    calcium = results["calcium_score"]["metrics"]["pretrained"]
    assert calcium["mae_log1p"]["value"] == results["calcium_score"]["pretrained"]
    assert calcium["mae"]["value"] > calcium["mae_log1p"]["value"]  # both reported
    # Two encoders x two modalities = four passes; the XR tasks share theirs through the cache.
    n_xr = sum(1 + (i % 3 == 0) for i in range(N_PATIENTS))
    assert len(calls) == 2 * (n_xr + N_PATIENTS)
    assert len(list((out / "embedding_cache").glob("*.npz"))) == 4
    md = (out / "results.md").read_text()
    assert "| cardiomegaly | auroc" in md and "random init" in md
    assert "| calcium_score | mae_log1p (lower is better)" in md and "| mae_log1p |" in md
    assert "| mae_log1p |" not in md.split("## cardiothoracic_ratio")[1].split("##")[0]
    assert json.loads((out / "results.json").read_text())["calcium_score"]["metric"] == "mae_log1p"
    for png in ("cardiothoracic_ratio.png", "cardiomegaly.png", "calcium_score.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for path, data in _all_bytes(out):
        for raw in cohort["raw_ids"]:
            assert raw.encode() not in data, f"{path.name} holds a raw identifier"


@pytest.mark.parametrize("freeze,pooling", [("frozen", "attention"), ("full", "mean")])
def test_run_finetune_through_the_encoder(
    cohort: dict, checkpoint: Path, tmp_path: Path, freeze: str, pooling: str
) -> None:
    cfg = _config(cohort, checkpoint, tmp_path / "ft", freeze=freeze, pooling=pooling)
    res = run_finetune(cfg, _key(), transform=_transform(2))
    assert res["losses"] and all(math.isfinite(x) for x in res["losses"])
    assert res["tasks"]["cardiomegaly"]["n_test"] > 0
    # the test split is predicted by the weights of the best validation epoch
    val = res["training"]["val_losses"]
    assert len(val) == cfg["train"]["epochs"]
    assert res["training"]["best_epoch"] == int(np.argmin(val))


def test_the_weights_of_the_best_validation_epoch_are_kept() -> None:
    from foundation.training.finetune_module import KeepBestWeights

    class Stub(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    module, keep = Stub(), KeepBestWeights()
    trainer = type(
        "T", (), {"sanity_checking": False, "current_epoch": 0, "callback_metrics": {}}
    )()
    for epoch, (w, loss) in enumerate([(0.5, math.nan), (1.0, 0.9), (2.0, 0.4), (3.0, 0.7)]):
        module.w.data.fill_(w)
        trainer.current_epoch, trainer.callback_metrics = epoch, {"val/loss": torch.tensor(loss)}
        keep.on_validation_epoch_end(trainer, module)
    keep.on_fit_end(trainer, module)
    assert keep.best_epoch == 2 and keep.val_losses[1:] == pytest.approx([0.9, 0.4, 0.7])
    assert float(module.w) == 2.0  # epoch 2's weights: not the last, and a NaN never wins


def test_pooling_modes_and_multitask_loss_masks_missing() -> None:
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "multiclass", classes=["x", "y", "z"])]
    tokens = torch.randn(4, 1 + 9, 16)
    for pooling in ("cls", "mean", "attention"):
        out = MultiTaskHead(16, tasks, pooling)(tokens)
        assert out.pooled.shape == (4, 16)
        assert out.outputs["a"].shape == (4, 1) and out.outputs["b"].shape == (4, 3)
    head = MultiTaskHead(16, tasks, "cls")
    outputs = head(tokens).outputs
    targets = {"a": torch.tensor([[0.5], [math.nan], [1.0], [math.nan]]),
               "b": torch.tensor([[math.nan], [math.nan], [math.nan], [math.nan]])}  # fmt: skip
    total, parts = head.loss(outputs, targets)
    assert math.isfinite(float(total)) and float(parts["b"]) == 0.0
    assert torch.isclose(parts["a"], ((outputs["a"][[0, 2]] - targets["a"][[0, 2]]) ** 2).mean())


def test_log1p_targets_round_trip() -> None:
    t = TaskSpec("calcium_score", "regression", target_transform="log1p")
    t.fit_normalisation([0.0, 10.0, 100.0, 1000.0])
    enc = torch.tensor([t.encode({"calcium_score": v}) for v in (0.0, 10.0, 1000.0)])
    assert abs(float(enc.mean())) < 2.0  # standardised in log space
    dec = t.decode(enc)
    assert torch.allclose(dec, torch.tensor([0.0, 10.0, 1000.0]), rtol=1e-4, atol=1e-4)


def test_freezing_modes_and_layer_decay() -> None:
    cfg = VisionConfig.preset("tiny", depth=3)
    task = [TaskSpec("a", "binary")]
    frozen = FinetuneModule(VisionTransformer(cfg), task, freeze="frozen")
    assert all(not p.requires_grad for p in frozen.vision.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())
    last = FinetuneModule(VisionTransformer(cfg), task, freeze="last_k", unfreeze_last_k=1)
    assert all(p.requires_grad for p in last.vision.blocks[2].parameters())
    assert not any(p.requires_grad for p in last.vision.blocks[1].parameters())
    assert not last.vision.patch_embed_2d.weight.requires_grad
    full = FinetuneModule(VisionTransformer(cfg), task, freeze="full", layer_decay=0.5, lr=1.0)
    lr_of = {}
    for g in full.param_groups():
        for p in g["params"]:
            lr_of[id(p)] = g["lr"]
    v = full.vision
    assert lr_of[id(v.patch_embed_2d.weight)] == pytest.approx(
        0.5**4
    )  # embeddings: decay^(depth+1)
    assert lr_of[id(v.blocks[0].attn.qkv.weight)] == pytest.approx(0.5**3)
    assert lr_of[id(v.blocks[2].attn.qkv.weight)] == pytest.approx(0.5)
    assert lr_of[id(next(full.head.parameters()))] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "prefix", ["vision.", "model.vision.", "encoder.", "_orig_mod.", "vision._orig_mod.", "module."]
)
def test_checkpoint_prefixes_are_adapted(prefix: str) -> None:
    cfg = VisionConfig.preset("tiny")
    src, dst = VisionTransformer(cfg), VisionTransformer(cfg)
    state = {prefix + k: v for k, v in src.state_dict().items()}
    state["text.model.embeddings.weight"] = torch.zeros(2)  # another component: ignored
    report = load_state_into(dst, state, "test.ckpt")
    assert not report.missing
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_missing_and_unexpected_keys_are_reported_plainly() -> None:
    cfg = VisionConfig.preset("tiny")
    state = {f"vision.{k}": v for k, v in VisionTransformer(cfg).state_dict().items()}
    state.pop("vision.norm.weight")
    with pytest.raises(CheckpointError, match=r"1 missing.*\n  missing: norm\.weight"):
        load_state_into(VisionTransformer(cfg), state, "broken.ckpt")
    state["vision.norm.weight"] = torch.ones(cfg.dim)
    state["vision.extra_head.weight"] = torch.ones(3)
    with pytest.warns(UserWarning, match="unexpected: extra_head.weight"):
        load_state_into(VisionTransformer(cfg), state, "extra.ckpt")


def test_encoder_with_other_preprocessing_is_refused() -> None:
    lineage = {"preprocessing": {"version": "p1", "policy": {"xr_size": 32}}}
    check_preprocessing(lineage, {"preprocessing": PREPROCESSING}, "m.json")  # same: fine
    check_preprocessing(None, {"preprocessing": PREPROCESSING}, "m.json")  # unknown: allowed
    with pytest.raises(ValueError, match=r"m\.json.*policy\.xr_size"):
        check_preprocessing(
            lineage, {"preprocessing": {"version": "p1", "policy": {"xr_size": 64}}}, "m.json"
        )


def test_label_tables(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("accession_number,patient_id,y\nA1,P1,1.5\nA2,P2,\n", encoding="utf-8")
    key = _key()
    table = load_label_table(path, "accession_number", ["y"], key)
    assert table.join_on == "accession"
    assert set(table.rows) == {key.pseudonym("accession", "A1"), key.pseudonym("accession", "A2")}
    assert "A1" not in repr(table) and "P1" not in repr(table)  # other id columns are dropped
    assert table.lookup({"accession": key.pseudonym("accession", "A1")}) == {"y": 1.5}
    assert math.isnan(table.rows[key.pseudonym("accession", "A2")]["y"])
    by_patient = load_label_table(path, "patient_id", ["y"], key)
    assert by_patient.lookup({"patient": key.patient("P1")}) == {"y": 1.5}
    # naming the join explicitly does not stop a raw column from being hashed
    explicit = load_label_table(path, "accession_number", ["y"], key, join_on="accession")
    assert set(explicit.rows) == set(table.rows)
    assert explicit.lookup({"accession": key.pseudonym("accession", "A1")}) == {"y": 1.5}
    with pytest.raises(LabelTableError, match="pseudonymisation key"):
        load_label_table(path, "accession_number", ["y"], None)
    with pytest.raises(LabelTableError, match="missing columns"):
        load_label_table(path, "accession_number", ["z"], key)
    dup = tmp_path / "dup.csv"
    dup.write_text("accession_number,y\nSECRETACC,1\nSECRETACC,2\n", encoding="utf-8")
    with pytest.raises(LabelTableError, match="row 3 repeats") as err:
        load_label_table(dup, "accession_number", ["y"], key)
    assert "SECRETACC" not in str(err.value)


def test_label_cells_are_checked_by_the_task_that_reads_them(tmp_path: Path) -> None:
    key = _key()
    path = tmp_path / "l.csv"
    path.write_text(
        "accession_number,ratio,flag,grade\nA1,0.5,yes,none\nA2,\"0,52\",1,mild\n"
        "A3,ND,2,\nA4,0.4,0,severe\n",
        encoding="utf-8",
    )  # fmt: skip
    columns = ["ratio", "flag", "grade"]
    kinds = {"ratio": "number", "flag": "binary", "grade": "class"}
    with pytest.raises(LabelTableError) as err:
        load_label_table(path, "accession_number", columns, key, kinds=kinds)
    message = str(err.value)
    assert "column 'ratio': 2 cells are not a finite number, the first in row 3" in message
    assert "decimal comma" in message
    assert (
        "column 'flag': 1 cells are not 0 or 1 (true/false, yes/no), the first in row 4" in message
    )
    assert "A2" not in message and "ND" not in message  # the file and rows only
    fixed = tmp_path / "fixed.csv"
    fixed.write_text("accession_number,flag,grade\nA1,yes,none\nA2,0,mild\nA3,1,\n", "utf-8")
    table = load_label_table(fixed, "accession_number", ["flag", "grade"], key, kinds=kinds)
    rows = [table.rows[key.pseudonym("accession", a)] for a in ("A1", "A2", "A3")]
    assert [r["flag"] for r in rows] == [1.0, 0.0, 1.0]
    assert rows[0]["grade"] == "none" and rows[1]["grade"] == "mild"  # "none" is a class here
    assert math.isnan(rows[2]["grade"])
    assert table.joined == set()
    table.lookup({"accession": key.pseudonym("accession", "A2")})
    assert table.joined == {key.pseudonym("accession", "A2")}


def test_parquet_label_tables_need_text_identifiers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = _key()
    pq.write_table(pa.table({"accession_number": ["0012", "0034"], "patient_id": ["P1", "P2"],
                             "y": [1.5, 2.5]}), tmp_path / "l.parquet")  # fmt: skip
    table = load_label_table(tmp_path / "l.parquet", "accession_number", ["y"], key)
    assert table.lookup({"accession": key.pseudonym("accession", "0012")}) == {"y": 1.5}
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"accession_number": ["7", "7"], "y": [1.0, 2.0]}), dup)
    with pytest.raises(LabelTableError, match="row 2 repeats"):  # Parquet rows count from 1
        load_label_table(dup, "accession_number", ["y"], key)
    as_numbers = tmp_path / "int.parquet"
    pq.write_table(pa.table({"accession_number": [12, 34], "y": [1.5, 2.5]}), as_numbers)
    with pytest.raises(LabelTableError, match=r"stored as int64; identifiers must be text"):
        load_label_table(as_numbers, "accession_number", ["y"], key)
    # a categorical column: dictionary-encoded numbers are refused, dictionary-encoded text read
    for values, ok in (([12, 34], False), (["0012", "0034"], True)):
        coded = pa.array(values).dictionary_encode()
        pq.write_table(pa.table({"accession_number": coded, "y": [1.5, 2.5]}), tmp_path / "d.pq")
        if ok:
            assert len(load_label_table(tmp_path / "d.pq", "accession_number", ["y"], key)) == 2
        else:
            with pytest.raises(LabelTableError, match="identifiers must be text"):
                load_label_table(tmp_path / "d.pq", "accession_number", ["y"], key)
    inf = tmp_path / "inf.parquet"
    pq.write_table(pa.table({"accession_number": ["1", "2"], "y": [1.5, float("inf")]}), inf)
    with pytest.raises(
        LabelTableError, match="1 cells are not a finite number, the first in row 2"
    ):
        load_label_table(inf, "accession_number", ["y"], key, kinds={"y": "number"})


def test_finetune_configs_load() -> None:
    expected = {"calcium_score": ("CT", "regression", "log1p"),
                "cardiothoracic_ratio": ("XR", "regression", None),
                "cardiomegaly": ("XR", "binary", None)}  # fmt: skip
    for name, (modality, kind, transform) in expected.items():
        cfg = FinetuneConfig.from_yaml(CONFIGS / f"{name}.yaml")
        assert cfg.data.modality == modality
        assert cfg.tasks[0].type == kind and cfg.tasks[0].target_transform == transform
        assert cfg.labels.key_column == "accession_number"
    with pytest.raises(ValueError, match="unknown"):
        FinetuneConfig.from_dict({"tasks": [{"name": "a"}], "encodr": {}})


def test_zero_shot_retrieval(cohort: dict, checkpoint: Path, tmp_path: Path) -> None:
    from foundation.data.tokenizer import train_tokenizer
    from foundation.shards.reader import iter_samples

    samples = list(iter_samples(cohort["manifest"]))
    tok = train_tokenizer([s.report for s in samples], tmp_path / "tok", vocab_size=64)
    module = PretrainModule.load_from_checkpoint(checkpoint, map_location="cpu")
    patients = {s.meta["patient"] for s in samples[:12]}
    res = evaluate_retrieval(
        module, str(cohort["manifest"]), tok, patients, samples=samples,
        transform_for=_transform,
    )  # fmt: skip
    n_studies = len({s.meta["study"] for s in samples if s.meta["patient"] in patients})
    assert res["n"] == n_studies
    # whole reports (a header with names and dates): every one unique, chance is 1/n
    assert res["distinct_reports"] == n_studies
    assert res["chance_r1"] == pytest.approx(1 / n_studies)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= res[k] <= 1.0
    assert res["i2t_r1"] <= res["i2t_r5"] <= res["i2t_r10"]


@pytest.mark.parametrize("freeze", ["mlp_probe", "last_k"])
def test_multiclass_and_multilabel_keyed_by_study(
    cohort: dict, checkpoint: Path, tmp_path: Path, freeze: str
) -> None:
    from foundation.shards.reader import iter_samples

    labels = tmp_path / "by_study.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study", "size", "wide", "bright"])
        for s in iter_samples(cohort["manifest"], decode_image=False):
            if s.meta["modality"] == "XR" and s.meta["series_index"] == 0:
                i = int(s.meta["study"], 16) % 3  # arbitrary but fixed classes
                w.writerow([s.meta["study"], ["small", "mid", "large"][i], i > 0, i == 2])
    cfg = _config(cohort, checkpoint, tmp_path / "mc", freeze=freeze)
    cfg["labels"] = {"path": str(labels), "key_column": "study"}
    cfg["tasks"] = [
        {"name": "size", "type": "multiclass"},
        {"name": "flags", "type": "multilabel", "columns": ["wide", "bright"]},
    ]
    res = run_finetune(cfg)  # pseudonym-keyed table: no key needed
    size = res["tasks"]["size"]
    assert size["metric"] == "auroc" and size["n_test"] > 0
    assert 0.0 <= size["metrics"]["accuracy"]["value"] <= 1.0
    probs = np.array(res["predictions"]["size"]["y_pred"])
    assert probs.shape[1] == 3 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.array(res["predictions"]["flags"]["y_pred"]).shape[1] == 2


def test_the_cli_fine_tunes_and_exports(
    cohort: dict, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`foundation finetune` and `foundation export` as a user types them."""
    import yaml

    from foundation.cli import main

    key_file = tmp_path / "pseudonym.key"
    key_file.write_text(SECRET.decode(), encoding="utf-8")
    config = tmp_path / "heart.yaml"
    config.write_text(yaml.safe_dump(_config(cohort, checkpoint, tmp_path / "ft")), "utf-8")
    args = ["finetune", "--config", str(config), "--key-file", str(key_file)]
    assert main([*args, "--set", "train.epochs=1", "--set", "split.seed=5"]) == 0
    printed = capsys.readouterr().out
    assert "cardiothoracic_ratio" in printed and "auroc" in printed
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"cardiothoracic_ratio", "cardiomegaly"}
    assert json.loads((tmp_path / "ft" / "split.json").read_text())["seed"] == 5  # --set applied
    for raw in cohort["raw_ids"]:
        assert raw not in printed
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main([*args, "--set", "train.epochs"])

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["lineage"]["exclusion_version"] == "excl-1"
    encoder = load_encoder(tmp_path / "export")
    assert not encoder.training and encoder.cfg.patch_size_2d == 8  # the tiny module's
