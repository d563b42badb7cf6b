"""Evaluation and fine-tuning feed an encoder the input channels it was pretrained on.

Tiny PretrainModule checkpoints with 3 input channels (``data.multi_window``: one per CT window,
windows recorded in the lineage) and with 1, run through zero-shot retrieval, the linear probe
on cached embeddings and a few fine-tuning steps on the synthetic cohort of ``conftest``. A spy
on the vision encoder records the shape of every image batch it receives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures_cluster import TINY_CONFIG, cpu_trainer, tiny_dataset, tiny_overrides  # noqa: F401
from torch.utils.data import DataLoader, Dataset

from foundation.data.datamodule import ShardDataModule
from foundation.data.encoder_input import LINEAGE_KEY, input_windows, recorded_windows
from foundation.data.transforms import DEFAULT_CT_WINDOWS, EvalTransform
from foundation.models.export import export_encoder, load_vision_encoder
from foundation.models.vision import VisionTransformer
from foundation.privacy.pseudonym import load_key
from foundation.training.finetune import build_transform, run_finetune
from foundation.training.pretrain import PretrainModule

# Windows other than the defaults, so a transform that fell back to them would show.
RECORDED = ((50.0, 350.0), (-500.0, 1400.0), (500.0, 2000.0))
SIDE_2D, SIDE_3D, PATCH = 32, 16, 8


class _Pairs(Dataset):
    """Random 2D images of ``channels`` channels with random token ids (two steps' worth)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "image": torch.rand(self.channels, SIDE_2D, SIDE_2D, generator=g),
            "modality": torch.tensor(2),
            "input_ids": torch.randint(5, 60, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
        }


def _checkpoint(root: Path, channels: int, lineage: dict) -> Path:
    """A Lightning checkpoint of a tiny PretrainModule after two steps, with the data-module
    hyperparameters a real pretraining run records (small crops, every patient held out)."""
    torch.manual_seed(0)
    module = PretrainModule(
        vision={"preset": "tiny", "patch_size_2d": PATCH, "patch_size_3d": PATCH,
                "in_channels": channels},
        text={"preset": "tiny", "vocab_size": 512, "max_length": 16},
        embed_dim=32, decoder_dim=32, decoder_depth=1, decoder_heads=2, warmup_steps=1,
        lineage=lineage,
    )  # fmt: skip
    trainer = cpu_trainer(2, root)
    trainer.fit(module, DataLoader(_Pairs(channels), batch_size=2))
    path = root / f"c{channels}.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["datamodule_hyper_parameters"] = {
        "crop_size_3d": [SIDE_3D] * 3, "crop_size_2d": [SIDE_2D] * 2,
        "val_fraction": 1.0, "max_report_tokens": 16,
    }  # fmt: skip
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """3 channels with recorded windows; 1 channel from before windows were recorded."""
    root = tmp_path_factory.mktemp("ckpt_channels")
    return {
        3: _checkpoint(root, 3, {"dataset": "synthetic", LINEAGE_KEY: [list(w) for w in RECORDED]}),
        1: _checkpoint(root, 1, {"dataset": "synthetic"}),
    }


# what each encoder must be fed: all recorded windows, or the first default one
EXPECTED = {3: RECORDED, 1: DEFAULT_CT_WINDOWS[:1]}


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Records the image shape of every vision-encoder call and the windows of every
    evaluation transform applied."""
    record: dict[str, list] = {"shapes": [], "windows": []}
    forward, call = VisionTransformer.forward, EvalTransform.__call__

    def spy_forward(self, image, *args, **kwargs):
        record["shapes"].append(tuple(image.shape))
        return forward(self, image, *args, **kwargs)

    def spy_call(self, image, meta):
        record["windows"].append(self.windows)
        return call(self, image, meta)

    monkeypatch.setattr(VisionTransformer, "forward", spy_forward)
    monkeypatch.setattr(EvalTransform, "__call__", spy_call)
    return record


def _assert_fed(seen: dict[str, list], channels: int) -> None:
    assert seen["shapes"], "the encoder was never called"
    assert {s[1] for s in seen["shapes"]} == {channels}
    assert seen["windows"] and set(seen["windows"]) == {EXPECTED[channels]}


def _calcium_config(ingested, checkpoint: Path, out: Path, **encoder) -> dict:
    return {
        "name": "calcium",
        "tasks": [{"name": "calcium_score", "type": "regression", "target_transform": "log1p"}],
        "data": {"manifest": str(ingested.result.manifest_path), "modality": "CT", "dims": 3,
                 "image_size": [SIDE_3D] * 3},
        "labels": {"path": str(ingested.cohort.labels_csv), "key_column": "accession_number"},
        "encoder": {"checkpoint": str(checkpoint), **encoder},
        "split": {"fractions": [0.5, 0.17, 0.33], "seed": 0},
        "train": {"epochs": 1, "batch_size": 4, "probe_steps": 20},
        "eval": {"n_bootstrap": 20},
        "out_dir": str(out),
        "cache_dir": str(out.parent / "cache"),
    }  # fmt: skip


# ---- the rule ---------------------------------------------------------------------------------
def test_input_windows_follow_the_encoder_channels() -> None:
    lineage = {LINEAGE_KEY: [list(w) for w in RECORDED]}
    assert input_windows(3, lineage) == RECORDED
    assert input_windows(1, lineage) == RECORDED[:1]
    assert input_windows(3) == DEFAULT_CT_WINDOWS  # no record: the defaults
    assert input_windows(1, {"dataset": "x"}) == DEFAULT_CT_WINDOWS[:1]
    with pytest.raises(ValueError, match=r"runs/a\.ckpt.*in_channels=2.*3 CT windows"):
        input_windows(2, lineage, "runs/a.ckpt")
    with pytest.raises(ValueError, match=r"in_channels=3.*2 CT windows"):
        input_windows(3, {LINEAGE_KEY: [[40, 400], [-600, 1500]]})
    for bad in ([[40, 0]], [[40]], [], "lung"):
        with pytest.raises(ValueError, match=LINEAGE_KEY):
            recorded_windows({LINEAGE_KEY: bad}, "enc")


def test_datamodule_records_its_windows(ingested) -> None:
    manifest = str(ingested.result.manifest_path)
    dm = ShardDataModule(manifest, num_workers=0, ct_windows=[list(w) for w in RECORDED])
    assert recorded_windows(dm.lineage) == RECORDED
    assert dm._stream("val").transforms[3].windows == RECORDED[:1]  # eval: the first window
    dm = ShardDataModule(manifest, num_workers=0, multi_window=True)
    assert recorded_windows(dm.lineage) == DEFAULT_CT_WINDOWS
    assert dm._stream("val").transforms[3].windows == DEFAULT_CT_WINDOWS
    with pytest.raises(ValueError, match="widths > 0"):
        ShardDataModule(manifest, ct_windows=[(40.0, 0.0)])


# ---- retrieval, probe and fine-tuning, 3 channels and 1 ---------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
def test_zero_shot_retrieval_feeds_the_checkpoint_channels(
    channels: int, checkpoints: dict[int, Path], ingested, seen, tmp_path: Path
) -> None:
    from foundation.data.report_corpus import train_tokenizer_from_manifest
    from foundation.evaluation.zero_shot import retrieval_vs_random

    manifest = ingested.result.manifest_path
    train_tokenizer_from_manifest(manifest, tmp_path / "tok", vocab_size=500)
    res = retrieval_vs_random(checkpoints[channels], manifest, tmp_path / "tok")
    for name in ("pretrained", "random_init"):
        assert res[name]["n"] > 0 and 0.0 <= res[name]["i2t_r1"] <= 1.0
    _assert_fed(seen, channels)
    assert {len(s) for s in seen["shapes"]} == {4, 5}  # 2D and 3D batches both


@pytest.mark.parametrize("channels", [3, 1])
def test_linear_probe_on_cached_embeddings_feeds_the_checkpoint_channels(
    channels: int, checkpoints: dict[int, Path], ingested, seen, tmp_path: Path
) -> None:
    cfg = _calcium_config(ingested, checkpoints[channels], tmp_path / "probe")
    res = run_finetune(cfg, load_key(ingested.key_file))
    assert res["tasks"]["calcium_score"]["n_test"] > 0
    _assert_fed(seen, channels)
    assert all(s[2:] == (SIDE_3D,) * 3 for s in seen["shapes"])
    # the second run reads the cache: no encoder call
    seen["shapes"].clear()
    cfg["out_dir"] = str(tmp_path / "probe2")
    run_finetune(cfg, load_key(ingested.key_file))
    assert not seen["shapes"]


@pytest.mark.parametrize("channels", [3, 1])
def test_finetune_steps_feed_the_checkpoint_channels(
    channels: int, checkpoints: dict[int, Path], ingested, seen, tmp_path: Path
) -> None:
    cfg = _calcium_config(ingested, checkpoints[channels], tmp_path / "ft", freeze="full")
    res = run_finetune(cfg, load_key(ingested.key_file))
    assert res["losses"] and all(math.isfinite(x) for x in res["losses"])
    _assert_fed(seen, channels)


def test_random_init_baseline_is_fed_like_its_checkpoint(
    checkpoints: dict[int, Path], ingested, seen, tmp_path: Path
) -> None:
    cfg = _calcium_config(ingested, checkpoints[3], tmp_path / "rnd")
    cfg["encoder"]["init"] = "random"
    run_finetune(cfg, load_key(ingested.key_file))
    _assert_fed(seen, 3)


# ---- exported encoders ------------------------------------------------------------------------
def test_exported_encoder_keeps_its_windows_and_a_mismatch_is_named(
    checkpoints: dict[int, Path], ingested, tmp_path: Path
) -> None:
    out = export_encoder(checkpoints[3], tmp_path / "export")
    loaded = load_vision_encoder(out)
    assert build_transform(3, [SIDE_3D] * 3, loaded).windows == RECORDED
    # an export whose lineage records 2 windows cannot feed a 3-channel encoder
    info = json.loads((out / "config.json").read_text())
    info["lineage"][LINEAGE_KEY] = [list(w) for w in RECORDED[:2]]
    (out / "config.json").write_text(json.dumps(info))
    cfg = _calcium_config(ingested, out, tmp_path / "bad")
    with pytest.raises(ValueError, match=rf"{out.name}.*in_channels=3.*2 CT windows"):
        run_finetune(cfg, load_key(ingested.key_file))


# ---- the whole path: a multi-window pretraining run, then its evaluation -----------------------
def test_multi_window_pretraining_run_is_evaluated_on_its_windows(
    tiny_dataset,  # noqa: F811 (the session fixture imported above)
    seen,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LightningCLI pretraining with ``data.multi_window`` and custom windows records them in
    the checkpoint; zero-shot retrieval then feeds both models 3 channels of those windows."""
    from foundation.evaluation.zero_shot import retrieval_vs_random
    from foundation.training.launch import run_pretrain

    windows = ",".join(f"[{lv},{wd}]" for lv, wd in RECORDED)
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    ckpt, _ = run_pretrain(
        TINY_CONFIG,
        [
            *tiny_overrides(tiny_dataset),
            f"--run_dir={tmp_path / 'run'}",
            "--data.multi_window=true",
            f"--data.ct_windows=[{windows}]",
            "--model.vision.in_channels=3",
            "--trainer.max_steps=2",
            "--model.warmup_steps=1",
        ],
    )
    assert {s[1] for s in seen["shapes"]} == {3}  # pretraining itself read 3 channels
    seen["shapes"].clear()
    res = retrieval_vs_random(
        ckpt, tiny_dataset.manifest, tiny_dataset.tokenizer_dir, val_fraction=1.0
    )
    assert res["pretrained"]["n"] > 0
    _assert_fed(seen, 3)
