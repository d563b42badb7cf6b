"""The benchmarks run (smoke, at their smallest sizes): a benchmark that no longer starts is
found here, not on the cluster. Their figures are ratios against a baseline of the same run;
nothing here asserts a speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(*args: str, timeout: int = 240) -> str:
    r = subprocess.run(
        [sys.executable, str(SCRIPTS / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_bench_train_tiny_reports_mfu_and_the_masking_ratio() -> None:
    out = _run("bench_train.py", "--tiny")
    rows = [line for line in out.splitlines() if re.match(r"\s*0\.\d+\s+(True|False)\s", line)]
    assert len(rows) >= 2  # masked and unmasked
    assert all(line.split()[6].endswith("%") for line in rows)  # the MFU column
    assert re.search(r"speed-up of mask 0\.75 vs unmasked .*: \d+\.\d+x", out)


def test_bench_erasure_rewrites_only_the_shards_that_hold_the_patient() -> None:
    out = _run("bench_erasure.py", "--patients", "200")
    assert re.search(r"ratio erasure / full rewrite: \d+\.\d+", out)
    assert "untouched shards byte-identical: True" in out


def test_bench_stream_small() -> None:
    out = _run("bench_stream.py", "--small")
    assert re.search(r"x\d+\.\d+", out)  # ratios against the same run's baseline


@pytest.mark.slow
def test_bench_ingest_on_a_small_synthetic_export() -> None:
    out = _run("bench_ingest.py", "--patients", "3")
    assert "share of time: preprocess" in out


def test_check_calcium_learnability_trains_both_encoders_on_held_out_phantoms() -> None:
    out = _run("check_calcium_learnability.py", "--train", "24", "--test", "12", "--steps", "4",
               "--every", "2")  # fmt: skip
    for name in ("max16", "vit"):
        assert re.search(rf"{name}\s+step\s+4\s+train loss \d+\.\d+\s+test corr [+-]\d", out)
    assert re.search(r"constant\s.*\s1\.00\s", out)  # the baseline row of the same run
