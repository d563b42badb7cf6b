"""Smoke test of `foundation demo`: every stage end to end, on a small cohort, in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foundation.cli import main
from foundation.privacy.exclusion import ExclusionList
from foundation.shards.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_its_summary(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo_out"  # the shipped finetune configs read demo_out/ (below)
    assert main(["demo", "--out", str(out), "--patients", "10", "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    stages = summary["stages"]
    assert {"ingest", "optout", "pretrain", "finetune"} <= set(stages)

    ingest = stages["ingest"]
    assert ingest["samples"] == sum(ingest["by_modality"].values()) > 0
    assert ingest["skipped"] == sum(ingest["skipped_by_reason"].values()) >= 3

    assert stages["scrubbing"]["leaks"] == 0 and stages["scrubbing"]["recall"] == 1.0
    assert stages["optout"]["excluded_patients"] >= 1
    assert stages["optout"]["excluded_samples"] >= stages["optout"]["excluded_patients"]

    erasure = stages["erasure"]
    assert erasure["verified"] and erasure["dataset_version"] >= 1
    assert erasure["samples_removed"] <= stages["optout"]["excluded_samples"]

    tokens = stages["tokenizer"]  # report lengths measured with the demo's own tokenizer
    assert 0 < tokens["reports"] <= ingest["samples"]
    assert 0 < tokens["tokens_median"] <= tokens["tokens_p90"]
    assert 0.0 <= tokens["share_over_256_tokens"] <= 1.0

    pretrain = stages["pretrain"]
    assert pretrain["steps"] > 0 and (out / "runs" / "pretrain" / "final.ckpt").is_file()
    n = stages["evaluate"]["heldout_studies"]
    # identical reports (findings and conclusion only) count as one: chance is at least 1/n
    assert 1.0 / n - 1e-9 <= pretrain["chance_r1"] <= 1.0
    assert pretrain["retrieval_r1_over_chance"] == pytest.approx(
        pretrain["retrieval_r1"] / pretrain["chance_r1"]
    )
    for key in ("retrieval_r1", "retrieval_r1_random_init"):
        assert 0.0 <= pretrain[key] <= 1.0

    assert set(stages["finetune"]) == {"calcium_score", "cardiothoracic_ratio", "cardiomegaly"}
    headline = {
        "calcium_score": "mae_log1p",
        "cardiothoracic_ratio": "mae",
        "cardiomegaly": "auroc",
    }
    assert {name: task["metric"] for name, task in stages["finetune"].items()} == headline
    assert (out / "finetune" / "results.md").is_file()

    printed = capsys.readouterr().out
    assert "foundation demo" in printed and "retrieval_r1" in printed
    # the throw-away key never reaches the summary or the console
    secret = (out / "keys" / "demo.key").read_text().strip()
    assert secret not in printed and secret not in json.dumps(summary)

    # A shipped config runs as a user types it after the demo, from the folder holding demo_out/
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "finetune" / "cardiothoracic_ratio.yaml"
    assert main(["finetune", "--config", str(config), "--set", "eval.n_bootstrap=50"]) == 0
    run = tmp_path / "demo_out" / "finetune-runs" / "cardiothoracic_ratio"
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["tasks"]["cardiothoracic_ratio"]["n_test"] > 0
    listed = ExclusionList.load(out / "dataset" / "exclusion_list.json")
    in_dataset = listed.among(
        Manifest.load(out / "dataset/data_manifests/synthetic.json").patients()
    )
    assert metrics["exclusion"] == {"version": listed.version, "excluded_patients": len(in_dataset)}
    assert secret not in capsys.readouterr().out
