"""The hash-chained audit log, and `audit run` over a checkpoint's lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from foundation.governance import audit
from foundation.governance.erase import apply_erasure
from foundation.governance.lineage import checkpoint_lineage, checkpoint_report
from foundation.governance.toy import build_toy_dataset
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList


def write_log(path: Path, n: int = 4) -> None:
    for i in range(n):
        audit.append(path, "retention set", dataset="d", version=i, deadline="2030-01-01")


def test_chain_is_intact_and_entries_link(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log)
    report = audit.verify(log)
    assert report.ok and report.entries == 4
    entries = audit.read(log)
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev"] == audit.GENESIS and entries[1]["prev"] != entries[2]["prev"]
    assert all(e["actor"] for e in entries)


@pytest.mark.parametrize("line", [0, 2, 3])
def test_an_edited_line_breaks_the_chain(tmp_path: Path, line: int) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log)
    lines = log.read_text().splitlines()
    entry = json.loads(lines[line])
    entry["version"] = 99  # the tampering: a version changed after the fact
    lines[line] = json.dumps(entry, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    report = audit.verify(log)
    assert not report.ok
    assert any(p.startswith(f"line {line + 1}:") for p in report.problems)


def test_deleted_or_inserted_line_is_seen(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_log(log)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert not audit.verify(log).ok
    log.write_text("\n".join([*lines[:2], lines[1], *lines[2:]]) + "\n")
    assert not audit.verify(log).ok


def test_entries_refuse_identifiers(tmp_path: Path) -> None:
    with pytest.raises(audit.AuditError):
        audit.append(tmp_path / "a.jsonl", "optout apply", patients=["abc"])


def _lst(key, ids_dates) -> ExclusionList:
    return ExclusionList(
        [ExclusionEntry(key.patient(i), "erasure", d) for i, d in ids_dates], key_id=key.key_id
    )


def test_audit_run_reports_requests_after_the_checkpoint(tmp_path: Path) -> None:
    ds = build_toy_dataset(tmp_path / "ds", n_patients=6)
    old = _lst(ds.key, [(ds.patient_ids[0], "2024-01-10")])
    ckpt = tmp_path / "run.ckpt"
    # what pretraining writes: foundation.lineage (+ the stream state under the DataModule)
    torch.save(
        {
            "foundation": {
                "code_version": "0",
                "lineage": {"dataset": "toy", "version": 1, "key_id": ds.key.key_id},
            },
            "ShardDataModule": {
                "train": {"format": 1, "manifest_version": 1, "exclusion_version": old.version}
            },
            "state_dict": {},
        },
        ckpt,
    )
    lin = checkpoint_lineage(ckpt)
    assert lin["dataset"] == "toy" and lin["manifest_version"] == 1
    assert lin["exclusion_version"] == old.version
    report = checkpoint_report(ckpt, ds.manifest, [old])
    assert report["exclusion_up_to_date"] and report["requests_after_total"] == 0

    new = _lst(ds.key, [(ds.patient_ids[0], "2024-01-10"), (ds.patient_ids[1], "2999-01-01")])
    apply_erasure(ds.manifest, [new])
    report = checkpoint_report(ckpt, ds.manifest, [new])
    assert not report["exclusion_up_to_date"] and report["current_version"] == 2
    assert report["requests_after"] == {"erasure": 1}
    assert report["requests_after_first"] == "2999-01-01"
    assert [c["version"] for c in report["dataset_changes_after"]] == [2]


def test_optout_import_and_apply_through_the_cli_are_audited(tmp_path: Path, capsys) -> None:
    from foundation.cli import build_parser

    ds = build_toy_dataset(tmp_path / "ds", n_patients=4)
    key_file = tmp_path / "key.txt"
    key_file.write_text("toy-secret-key-0123456789abcdef\n")
    requests = tmp_path / "requests.csv"
    pid = ds.patient_ids[2]
    requests.write_text(f"patient_id,request_type,date_received\n{pid},erasure,2025-02-03\n")
    parser = build_parser()  # the real `foundation` parser, governance commands included
    lst, log = tmp_path / "exclusion_list.json", tmp_path / "audit.jsonl"
    for argv in (
        [
            "optout",
            "import",
            str(requests),
            "--list",
            str(lst),
            "--key-file",
            str(key_file),
            "--audit-log",
            str(log),
        ],
        [
            "optout",
            "apply",
            "--manifest",
            str(ds.manifest),
            "--list",
            str(lst),
            "--audit-log",
            str(log),
        ],
    ):
        args = parser.parse_args(argv)
        assert args.handler(args) == 0
    entries = audit.read(log)
    assert [e["action"] for e in entries] == ["optout import", "optout apply"]
    assert entries[0]["requests"] == {"opposition": 0, "erasure": 1}
    assert entries[1]["patients_erased"] == 1 and entries[1]["to_version"] == 2
    text = log.read_text()
    assert pid not in text and ds.key.patient(pid) not in text
    assert audit.verify(log).ok and pid not in capsys.readouterr().out
