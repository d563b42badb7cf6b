"""Shared fixtures: one small synthetic cohort and its ingest, built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from foundation.ingest.config import load_ingest_config
from foundation.ingest.pipeline import IngestResult, run_ingest
from foundation.synthetic import generate_cohort

REPO = Path(__file__).resolve().parents[1]


@dataclass
class IngestedCohort:
    cohort: object  # foundation.synthetic.CohortSummary
    key_file: Path
    out: Path
    result: IngestResult


TEST_SECRET = "test-only-secret-0123456789abcdef"  # fixed: outputs are reproducible


def write_test_key(path: Path, secret: str = TEST_SECRET) -> Path:
    """A key file with a fixed secret (tests only; real keys come from generate_key_file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def demo_ingest_config(**overrides):
    config = load_ingest_config(REPO / "configs" / "ingest" / "demo.yaml")
    config.workers = 1
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def ingest_argv(ingested, out: Path, *extra: str) -> list[str]:
    """``foundation ingest`` arguments for an ``ingested`` cohort (export, reports, key) into
    ``out`` with the demo's ingest config, then ``extra``."""
    return [
        "ingest",
        "--input", str(ingested.cohort.export_dir),
        "--reports", str(ingested.cohort.reports_csv),
        "--out", str(out),
        "--config", str(REPO / "configs" / "ingest" / "demo.yaml"),
        "--key-file", str(ingested.key_file),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """Six synthetic patients (CT, X-ray, MR, NIfTI, compressed series, planted identifiers)."""
    root = tmp_path_factory.mktemp("cohort")
    return generate_cohort(root, n_patients=6, seed=3, ct_matrix=64)


@pytest.fixture(scope="session")
def ingested(small_cohort, tmp_path_factory) -> IngestedCohort:
    """The small cohort ingested once with the demo config and a fresh key."""
    base = tmp_path_factory.mktemp("ingest")
    key_file = write_test_key(base / "keys" / "test.key")
    out = base / "dataset"
    result = run_ingest(
        small_cohort.export_dir,
        out,
        reports_csv=small_cohort.reports_csv,
        config=demo_ingest_config(shard_max_samples=4),
        key_file=key_file,
    )
    return IngestedCohort(small_cohort, key_file, out, result)
