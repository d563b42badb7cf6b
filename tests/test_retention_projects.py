"""Retention deadlines and purge, project approvals (purpose limitation), ingest-part merge."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest

from foundation.governance import audit, projects, retention
from foundation.governance.cli import add_parsers
from foundation.governance.erase import RevokedManifestError, apply_erasure
from foundation.governance.merge import merge
from foundation.governance.toy import ToyDataset, build_toy_dataset
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.shards.manifest import Manifest
from foundation.shards.reader import iter_samples

TODAY = dt.date(2026, 6, 1)


@pytest.fixture
def toy(tmp_path: Path) -> ToyDataset:
    return build_toy_dataset(tmp_path / "ds", n_patients=4, shard_max_samples=4)


def test_retention_set_check_and_states(toy: ToyDataset, tmp_path: Path) -> None:
    rec = retention.set_retention(toy.manifest, dt.date(2024, 1, 1))
    assert rec["deadline"] == "2025-12-31" and rec["period_days"] == 730
    assert Manifest.load(toy.manifest).extra["retention"] == rec
    other = build_toy_dataset(tmp_path / "other", n_patients=2, dataset="other")
    retention.set_retention(other.manifest, dt.date(2026, 1, 1), period_days=200)  # 2026-07-20
    third = build_toy_dataset(tmp_path / "third", n_patients=2, dataset="third")
    states = retention.check(
        [toy.manifest, other.manifest.parent, third.manifest], today=TODAY, warn_days=90
    )
    assert {s.dataset: s.state for s in states} == {
        "toy": "past",
        "other": "near",
        "third": "unset",
    }
    assert {s.dataset: s.days_left for s in states}["toy"] == -152


def test_purge_deletes_shards_marks_and_audits(toy: ToyDataset) -> None:
    retention.set_retention(toy.manifest, dt.date(2020, 1, 1), period_days=10)
    lst = ExclusionList(
        [ExclusionEntry(toy.key.patient(toy.patient_ids[0]), "erasure", "2025-01-01")],
        key_id=toy.key.key_id,
    )
    apply_erasure(toy.manifest, [lst])  # leaves an archived v1 beside the current v2
    shards = Manifest.load(toy.manifest).shard_paths()
    dry = retention.purge(toy.manifest, today=TODAY)
    assert dry.dry_run and dry.shards == len(shards) and all(p.exists() for p in shards)
    done = retention.purge(toy.manifest, today=TODAY, yes=True)
    assert not done.dry_run and not any(p.exists() for p in shards)
    assert not list((toy.root / "shards").glob("*.tar"))
    m = Manifest.load(toy.manifest)
    assert m.extra["retention"]["purged"] == TODAY.isoformat() and not m.patients()
    with pytest.raises(RevokedManifestError, match="purged"):
        projects.check_usable(m)
    old = Manifest.load(toy.manifest.with_name("toy.v1.json"))
    assert old.extra["retention"]["purged"] and not old.patients()
    for pid in toy.patient_ids:  # no pseudonym left in manifests or ledger
        for f in [*toy.root.rglob("*.json"), toy.root / "ledger.jsonl"]:
            assert toy.key.patient(pid) not in f.read_text(), f
    assert audit.read(audit.default_log_path(toy.manifest))[-1]["action"] == "retention purge"
    assert retention.purge(toy.manifest, today=TODAY, yes=True).shards == 0  # idempotent


def test_purge_refused_before_the_deadline(toy: ToyDataset) -> None:
    retention.set_retention(toy.manifest, TODAY, period_days=30)
    with pytest.raises(ValueError, match="not passed"):
        retention.purge(toy.manifest, today=TODAY, yes=True)
    assert all(p.exists() for p in Manifest.load(toy.manifest).shard_paths())


def test_projects_approve_expire_revoke(toy: ToyDataset) -> None:
    projects.approve(toy.manifest, "P1", "CSE-2026-12", dt.date(2026, 12, 31), today=TODAY)
    m = Manifest.load(toy.manifest)
    assert projects.check_project(m, "P1", today=TODAY)["approval"] == "CSE-2026-12"
    assert projects.check_usable(m, "P1", today=dt.date(2026, 12, 31))
    with pytest.raises(projects.ProjectNotApprovedError, match="expired on 2026-12-31"):
        projects.check_project(m, "P1", today=dt.date(2027, 1, 1))
    with pytest.raises(projects.ProjectNotApprovedError, match="not approved for project P2"):
        projects.check_project(m, "P2", today=TODAY)
    with pytest.raises(projects.ProjectNotApprovedError, match="no project"):
        projects.check_project(m, None, today=TODAY)
    # approvals survive an erasure (carried to the new version)
    lst = ExclusionList(
        [ExclusionEntry(toy.key.patient(toy.patient_ids[1]), "erasure", "2025-01-01")],
        key_id=toy.key.key_id,
    )
    apply_erasure(toy.manifest, [lst])
    assert projects.check_project(Manifest.load(toy.manifest), "P1", today=TODAY)
    projects.revoke(toy.manifest, "P1", today=TODAY)
    with pytest.raises(projects.ProjectNotApprovedError, match="revoked"):
        projects.check_project(Manifest.load(toy.manifest), "P1", today=TODAY)
    actions = [e["action"] for e in audit.read(audit.default_log_path(toy.manifest))]
    assert actions == ["project approve", "optout apply", "project revoke"]


def test_merging_ingest_parts_gives_all_samples(tmp_path: Path) -> None:
    # parts of one ingest share a key; their samples are disjoint
    full = build_toy_dataset(tmp_path / "full", n_patients=6)
    keys = sorted(s.key for s in iter_samples(full.manifest, decode_image=False))
    ids = full.patient_ids
    a = build_toy_dataset(tmp_path / "p0", dataset="toy.part000of002", patient_ids=ids[:3])
    b = build_toy_dataset(tmp_path / "p1", dataset="toy.part001of002", patient_ids=ids[3:])
    out = tmp_path / "p0" / "data_manifests" / "toy.json"
    m = merge([a.manifest, b.manifest], out, name="toy")
    assert m.key_id == a.key.key_id and m.dataset == "toy" and m.num_samples == 24
    assert all(not Path(r.path).is_absolute() for r in m.shards)
    merged_keys = sorted(s.key for s in iter_samples(out, decode_image=False))
    assert merged_keys == keys and len(keys) == 24
    with pytest.raises(Exception, match="merged into"):
        merge([a.manifest], tmp_path / "again.json")


def test_cli_round_trip(toy: ToyDataset, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    log = tmp_path / "log.jsonl"

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.handler(args)

    m = str(toy.manifest)
    assert (
        run(
            "retention",
            "set",
            "--manifest",
            m,
            "--last-publication",
            "2020-01-01",
            "--audit-log",
            str(log),
        )
        == 0
    )
    assert run("retention", "check", m) == 1  # past its deadline
    assert (
        run(
            "project",
            "approve",
            "--manifest",
            m,
            "--id",
            "P9",
            "--approval",
            "A-1",
            "--expires",
            "2099-01-01",
            "--audit-log",
            str(log),
        )
        == 0
    )
    assert run("audit", "verify", str(log)) == 0
    assert "chain intact" in capsys.readouterr().out
