"""Re-running an ingest into a folder a governance writer has changed since: an erasure (or a
retention record, a merge) is never undone by the ledger's older view of the dataset, and an
ingest holds the dataset's lock, so it cannot interleave with another writer."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
from pathlib import Path

import pytest
from conftest import demo_ingest_config, ingest_argv
from test_dataset_lock import held_by_thread, snapshot
from test_ingest_exclusion import _listed

from foundation.cli import main
from foundation.governance import retention
from foundation.governance.dataset_lock import DatasetLockedError
from foundation.governance.erase import apply_erasure
from foundation.governance.merge import merge
from foundation.ingest import pipeline
from foundation.ingest.pipeline import run_ingest
from foundation.ingest.publish import GovernedDatasetError
from foundation.shards.manifest import Manifest
from foundation.shards.verify import verify_manifest


def _reingest(ingested, out: Path, list_path: Path | None = None):
    """The session's export ingested again into ``out`` (same config as the first ingest)."""
    return run_ingest(
        ingested.cohort.export_dir,
        out,
        reports_csv=ingested.cohort.reports_csv,
        config=demo_ingest_config(shard_max_samples=4),
        key_file=ingested.key_file,
        exclusion_list=list_path,
    )


def _copy(ingested, dest: Path) -> Path:
    """A copy of the session's finished ingest (lock files left behind: a fresh folder)."""
    shutil.copytree(ingested.out, dest, ignore=shutil.ignore_patterns("*.lock"))
    return dest / "data_manifests" / ingested.result.manifest_path.name


@pytest.fixture
def erased(ingested, tmp_path):
    """A copy of the session's ingest, then one patient erased from it (version 2)."""
    listed = _listed(ingested, tmp_path)
    manifest = _copy(ingested, tmp_path / "dataset")
    assert listed.pseudonym in Manifest.load(manifest).patients()
    assert apply_erasure(manifest, [listed.exclusion]).version == 2
    return listed, manifest


def _assert_erasure_stands(listed, manifest: Path) -> None:
    """Version 2 is current, names only shards on disk that verify, and nothing in the folder
    holds the erased patient's pseudonym."""
    m = Manifest.load(manifest)
    assert m.version == 2 and m.revoked_by is None
    assert all(p.is_file() for p in m.shard_paths())
    assert verify_manifest(m).ok
    assert listed.pseudonym not in m.patients()
    root = manifest.parent.parent
    held = [
        p for p in root.rglob("*") if p.is_file() and listed.pseudonym.encode() in p.read_bytes()
    ]
    assert not held, f"{len(held)} files of the dataset name the erased patient"


@pytest.mark.parametrize("with_list", [False, True], ids=["no-list", "exclusion-list"])
def test_reingest_into_an_erased_folder_is_refused_and_changes_nothing(ingested, erased, with_list):
    listed, manifest = erased
    root = manifest.parent.parent
    before = snapshot(root)
    with pytest.raises(GovernedDatasetError) as err:
        _reingest(ingested, root, listed.list_path if with_list else None)
    message = str(err.value)
    assert str(manifest) in message and "version 2" in message
    assert "new folder" in message and "dataset merge" in message
    assert listed.pseudonym not in message
    assert snapshot(root) == before  # no shard, ledger line, manifest or summary written
    _assert_erasure_stands(listed, manifest)


def test_cli_reingest_into_an_erased_folder_is_refused(ingested, erased):
    listed, manifest = erased
    root = manifest.parent.parent
    with pytest.raises(GovernedDatasetError):
        main(ingest_argv(ingested, root, "--exclusion-list", str(listed.list_path)))
    _assert_erasure_stands(listed, manifest)


def _ingest_part(ingested, out: Path, part: int, list_path: Path | None = None) -> Path:
    config = demo_ingest_config(shard_max_samples=4, part=(part, 2))
    res = run_ingest(
        ingested.cohort.export_dir,
        out,
        reports_csv=ingested.cohort.reports_csv,
        config=config,
        key_file=ingested.key_file,
        exclusion_list=list_path,
    )
    return res.manifest_path


def test_new_studies_into_a_new_folder_then_merge(ingested, tmp_path):
    # what the refusal advises: the studies of one part were ingested and a patient erased;
    # the other part's studies arrive later, go to a new folder, and the two are merged
    listed = _listed(ingested, tmp_path)
    first = [_ingest_part(ingested, tmp_path / f"first{i}", i) for i in range(2)]
    old = next(i for i in range(2) if listed.pseudonym in Manifest.load(first[i]).patients())
    assert apply_erasure(first[old], [listed.exclusion]).version == 2
    with pytest.raises(GovernedDatasetError):  # a part's manifest is guarded like any other
        _ingest_part(ingested, first[old].parent.parent, old, listed.list_path)
    new = _ingest_part(ingested, tmp_path / "new", 1 - old, listed.list_path)
    merged = merge([first[old], new], tmp_path / "all" / "data_manifests" / "all.json")
    assert verify_manifest(merged).ok
    assert listed.pseudonym not in merged.patients()
    whole = Manifest.load(ingested.result.manifest_path)
    erased = sum(r.patients.get(listed.pseudonym, 0) for r in whole.shards)
    assert merged.num_samples == whole.num_samples - erased


def test_manifest_marked_by_another_writer_is_not_overwritten(ingested, tmp_path):
    manifest = _copy(ingested, tmp_path / "dataset")
    retention.set_retention(manifest, dt.date(2025, 6, 30))  # in place, still version 1
    before = manifest.read_bytes()
    with pytest.raises(GovernedDatasetError, match="retention"):
        _reingest(ingested, manifest.parent.parent)
    assert manifest.read_bytes() == before  # the retention deadline is not dropped


def test_folder_with_an_archived_version_is_refused(ingested, erased):
    # a folder already left at version 1 by an earlier ingest (before this check existed):
    # the archive of version 1 shows that an erasure happened
    _, manifest = erased
    m = Manifest.load(manifest)
    m.version, m.extra = 1, {}
    m.save(manifest)
    with pytest.raises(GovernedDatasetError, match="archived"):
        _reingest(ingested, manifest.parent.parent)


def test_rerun_of_an_unchanged_ingest_still_publishes(ingested, tmp_path):
    manifest = _copy(ingested, tmp_path / "dataset")
    res = _reingest(ingested, manifest.parent.parent)
    assert res.manifest_path == manifest
    assert Manifest.load(manifest).shards == Manifest.load(ingested.result.manifest_path).shards


# -- the lock ------------------------------------------------------------------------------


def test_ingest_is_refused_while_another_writer_holds_the_lock(ingested, tmp_path, capsys):
    manifest = _copy(ingested, tmp_path / "dataset")
    root = manifest.parent.parent
    before = snapshot(root)
    with held_by_thread(manifest):
        with pytest.raises(DatasetLockedError, match=str(manifest)):
            _reingest(ingested, root)
        assert snapshot(root) == before
        assert main(ingest_argv(ingested, root)) == 75
        assert str(manifest) in capsys.readouterr().err
        assert main(ingest_argv(ingested, root, "--wait", "0.1")) == 75
        assert snapshot(root) == before
    assert main(ingest_argv(ingested, root)) == 0  # free again: the same command goes through


def test_first_ingest_takes_the_lock_too(ingested, tmp_path):
    out = tmp_path / "fresh"
    manifest = out / "data_manifests" / ingested.result.manifest_path.name
    manifest.parent.mkdir(parents=True)
    with held_by_thread(manifest), pytest.raises(DatasetLockedError):
        _reingest(ingested, out)
    assert not manifest.exists() and not (out / "shards").exists()


def test_erasure_during_an_ingest_waits_for_it(ingested, tmp_path, monkeypatch):
    # a resumed ingest (one group left to write) while an erasure of the same dataset starts
    listed = _listed(ingested, tmp_path)
    manifest = _copy(ingested, tmp_path / "resuming")
    ledger = manifest.parent.parent / "ledger.jsonl"
    lines = ledger.read_text(encoding="utf-8").splitlines()
    ledger.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    real, seen = pipeline._append_ledger, []

    def erase_meanwhile(path, entry):
        def erase() -> None:
            try:
                apply_erasure(manifest, [listed.exclusion])
            except DatasetLockedError as e:
                seen.append(e)

        t = threading.Thread(target=erase)
        t.start()
        t.join(30)
        real(path, entry)

    monkeypatch.setattr(pipeline, "_append_ledger", erase_meanwhile)
    res = _reingest(ingested, manifest.parent.parent)
    assert len(seen) == 1 and "ingest" in str(seen[0])  # the holder is named by its command
    assert Manifest.load(res.manifest_path).version == 1  # the ingest published, untouched
    assert verify_manifest(res.manifest_path).ok
    assert apply_erasure(manifest, [listed.exclusion]).version == 2  # once the ingest is done
