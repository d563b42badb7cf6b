"""`foundation evaluate` as a user types it: retrieval and the probe suite of a pretraining run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fixtures_cluster import REPO, TINY_CONFIG, tiny_dataset, tiny_overrides, tiny_run  # noqa: F401

from foundation.cli import main
from foundation.data.stream import in_val_split
from foundation.governance import audit
from foundation.governance.projects import ProjectNotApprovedError
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.shards.manifest import Manifest


def _pretrain(dataset, run_dir: Path, val_fraction: float) -> Path:
    from foundation.training.launch import main as pretrain

    pretrain(
        [
            f"--config={TINY_CONFIG}",
            *tiny_overrides(dataset),
            f"--data.val_fraction={val_fraction}",  # after tiny_overrides' 0: this one wins
            f"--run_dir={run_dir}",
            "--trainer.max_steps=2",
            "--model.max_steps=10",
            "--model.warmup_steps=1",
        ]
    )
    checkpoints = sorted(run_dir.rglob("*.ckpt"))
    assert checkpoints, f"the pretraining of {run_dir} (val_fraction {val_fraction}) saved nothing"
    return checkpoints[-1]


def _a_split(manifest: Path) -> float:
    """A validation share that holds out some but not all of the few patients (the split is a
    hash of pseudonyms made under a fresh key each session)."""
    patients = Manifest.load(manifest).patients()
    held = {s: sum(in_val_split(p, s) for p in patients) for s in (i / 20 for i in range(1, 20))}
    usable = [s for s, n in held.items() if 0 < n < len(patients)]
    assert usable, f"no share splits these {len(patients)} patients"
    return min(usable, key=lambda s: abs(held[s] - len(patients) / 2))  # about half each side


def test_retrieval_without_held_out_patients_says_so(tiny_dataset, tiny_run):  # noqa: F811
    from foundation.evaluation.zero_shot import retrieval_vs_random

    checkpoint = sorted(Path(tiny_run).rglob("*.ckpt"))[-1]  # trained with val_fraction 0
    with pytest.raises(ValueError, match=r"no held-out patient .* data\.val_fraction > 0"):
        retrieval_vs_random(checkpoint, tiny_dataset.manifest, tiny_dataset.tokenizer_dir)


def test_the_cli_evaluates_a_pretraining_run(tiny_dataset, tmp_path, capsys):  # noqa: F811
    checkpoint = _pretrain(tiny_dataset, tmp_path / "run", _a_split(tiny_dataset.manifest))
    task = yaml.safe_load((REPO / "configs/finetune/cardiothoracic_ratio.yaml").read_text())
    task["data"]["image_size"] = [32, 32]  # the run's 2D crop
    task_file = tmp_path / "ctr.yaml"
    task_file.write_text(yaml.safe_dump(task), encoding="utf-8")
    out = tmp_path / "eval"
    manifest = Manifest.load(tiny_dataset.manifest)
    opted_out = sorted(manifest.patients())[0]
    exclusion = ExclusionList([ExclusionEntry(opted_out, "opposition", "2026-01-02")],
                              key_id=manifest.key_id)  # fmt: skip
    exclusion.save(tmp_path / "exclusion.json")
    args = [
        "evaluate",
        f"--checkpoint={checkpoint}",
        f"--manifest={tiny_dataset.manifest}",
        f"--tokenizer={tiny_dataset.tokenizer_dir}",
        f"--labels={tiny_dataset.root / 'cohort' / 'labels.csv'}",
        f"--task={task_file}",
        f"--key-file={tiny_dataset.key_file}",
        f"--out={out}",
        f"--exclusion-list={tmp_path / 'exclusion.json'}",
    ]
    with pytest.raises(SystemExit, match="--labels and --task go together"):
        main([a for a in args if not a.startswith("--task")])
    # a dataset not approved for the project named is refused before anything runs
    with pytest.raises(ProjectNotApprovedError, match="not approved for project P9"):
        main([*args, "--project=P9"])
    assert not out.exists()
    assert main(args) == 0
    uses = [e for e in audit.read(audit.default_log_path(tiny_dataset.manifest))]
    assert uses[-1]["action"] == "evaluate" and uses[-1]["checkpoint"] == str(checkpoint)
    retrieval = json.loads((out / "retrieval.json").read_text())
    for init in ("pretrained", "random_init"):
        assert 0.0 <= retrieval[init]["i2t_r1"] <= 1.0 and retrieval[init]["n"] > 0
    assert "zero-shot retrieval" in capsys.readouterr().out
    results = json.loads((out / "probes" / "results.json").read_text())
    assert results["cardiothoracic_ratio"]["metric"] == "mae"
    assert "| cardiothoracic_ratio | mae" in (out / "probes" / "results.md").read_text()
    for init in ("pretrained", "random_init"):  # the probes read no opted-out patient
        run = json.loads(
            (out / "probes" / "cardiothoracic_ratio" / init / "metrics.json").read_text()
        )
        assert run["exclusion"] == {"version": exclusion.version, "excluded_patients": 1}
    # the key never reaches what the command writes
    secret = tiny_dataset.key_file.read_text().strip().encode()
    assert all(secret not in p.read_bytes() for p in out.rglob("*") if p.is_file())
