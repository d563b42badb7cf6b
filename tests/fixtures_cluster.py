"""Session fixtures for the cluster and inspection tests: a tiny synthetic dataset, a tokenizer,
and a few-step tiny pretraining run on it (the demo's stages, at the smallest useful size).

Import the fixtures into a test module (``from fixtures_cluster import tiny_dataset``); the
build is cached per session, so modules that both import them share one dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "pretrain" / "tiny.yaml"
_CACHE: dict[str, object] = {}


@dataclass
class TinyDataset:
    root: Path
    manifest: Path
    tokenizer_dir: Path
    key_file: Path


def tiny_overrides(ds: TinyDataset) -> list[str]:
    """The smallest training that still runs the real path: 16^3 crops, 2-sample batches."""
    return [
        f"--data.manifest={ds.manifest}",
        f"--data.tokenizer_dir={ds.tokenizer_dir}",
        "--data.batch_size=2",
        "--data.num_workers=0",
        "--data.crop_size_3d=[16,16,16]",
        "--model.vision.patch_size_3d=8",
        "--data.crop_size_2d=[32,32]",
        "--data.val_fraction=0",
        "--data.max_report_tokens=32",
        "--model.text.vocab_size=512",
        "--model.text.max_length=32",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
    ]


def _build_dataset(root: Path) -> TinyDataset:
    from foundation.data.report_corpus import train_tokenizer_from_manifest
    from foundation.ingest.config import load_ingest_config
    from foundation.ingest.pipeline import run_ingest
    from foundation.privacy.pseudonym import generate_key_file
    from foundation.synthetic import generate_cohort

    cohort = generate_cohort(root / "cohort", n_patients=4, seed=5, ct_matrix=48)
    key_file = root / "keys" / "test.key"
    generate_key_file(key_file)
    config = load_ingest_config(REPO / "configs" / "ingest" / "demo.yaml")
    config.workers = 1
    config.shard_max_samples = 4
    result = run_ingest(
        cohort.export_dir,
        root / "dataset",
        reports_csv=cohort.reports_csv,
        config=config,
        key_file=key_file,
    )
    tok = root / "tokenizer"
    train_tokenizer_from_manifest(result.manifest_path, tok, vocab_size=500)
    return TinyDataset(root, result.manifest_path, tok, key_file)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """4 synthetic patients (CT, MR, XR) ingested into shards, with a report tokenizer."""
    if "dataset" not in _CACHE:
        _CACHE["dataset"] = _build_dataset(tmp_path_factory.mktemp("cluster_ds"))
    return _CACHE["dataset"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """A 6-step tiny pretraining run folder (logs/version_0/metrics.csv, checkpoints/)."""
    if "run" not in _CACHE:
        from foundation.training.launch import main

        run_dir = tmp_path_factory.mktemp("cluster_run") / "tiny-run"
        cwd = os.getcwd()
        os.chdir(run_dir.parent)  # nothing lands in the repository
        try:
            main(
                [
                    "--config",
                    str(TINY_CONFIG),
                    *tiny_overrides(tiny_dataset),
                    f"--run_dir={run_dir}",
                    "--trainer.max_steps=6",
                    "--model.max_steps=20",
                    "--model.warmup_steps=3",
                ]
            )
        finally:
            os.chdir(cwd)
        _CACHE["run"] = run_dir
    return _CACHE["run"]  # type: ignore[return-value]


def cpu_trainer(max_steps: int, root: Path | None = None, **kwargs):
    """A quiet one-process CPU Trainer (no logger, checkpointing or progress bar)."""
    import lightning as L

    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )
