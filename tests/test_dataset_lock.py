"""One writer at a time per dataset: a second erasure (or any manifest writer) fails at once
while another holds the dataset's lock and changes nothing; the lock goes away when its holder
finishes, raises or is killed."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from foundation.cli import main as cli_main
from foundation.governance import audit, dataset_lock, retention, rewrite
from foundation.governance.dataset_lock import (
    DatasetLockedError,
    DatasetLockError,
    hold,
    lock_path,
)
from foundation.governance.erase import apply_erasure
from foundation.governance.merge import merge
from foundation.governance.projects import approve, revoke
from foundation.governance.subject import rectify
from foundation.governance.toy import ToyDataset, build_toy_dataset
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.shards.manifest import Manifest
from foundation.shards.reader import iter_samples
from foundation.shards.verify import verify_manifest

TODAY = dt.date(2025, 6, 1)


@pytest.fixture
def toy(tmp_path: Path) -> ToyDataset:
    return build_toy_dataset(tmp_path / "ds", n_patients=8, shard_max_samples=4)


def save_list(ds: ToyDataset, folder: Path, *patient_ids: str) -> Path:
    """An erasure list for ``patient_ids``, saved outside the dataset's folder."""
    entries = [ExclusionEntry(ds.key.patient(p), "erasure", "2025-01-02") for p in patient_ids]
    path = folder / f"erase-{'-'.join(patient_ids)}.json"
    ExclusionList(entries, key_id=ds.key.key_id).save(path)
    return path


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` but the lock files (whose holder record changes with holders)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock")
    return {p: p.read_bytes() for p in files}


def patients_left(manifest: Path) -> set[str]:
    return {s.meta["patient"] for s in iter_samples(manifest, decode_image=False)}


def locked_elsewhere(manifest: Path) -> bool:
    """Whether any holder has the lock: a fresh open file description cannot take it."""
    fd = os.open(lock_path(manifest), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_by_thread(manifest: Path, until: threading.Event | None = None) -> Iterator[None]:
    """Another writer of this process (a thread) holds the lock until ``until`` is set, or
    until the block ends."""
    got, done = threading.Event(), until or threading.Event()

    def holder() -> None:
        with hold(manifest, operation="test holder"):
            got.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert got.wait(10)
    try:
        yield
    finally:
        done.set()
        t.join(10)


# -- a second process erasing the same dataset ---------------------------------------------


def _erase_paused(manifest: str, list_path: str, ready, go) -> None:
    """(Spawned process.) Erase, pausing after the first shard is rewritten until ``go``."""
    original = rewrite.rewrite_shard

    def paused(*args, **kwargs):
        out = original(*args, **kwargs)
        if not ready.is_set():
            ready.set()
            go.wait(60)
        return out

    rewrite.rewrite_shard = paused
    apply_erasure(manifest, [ExclusionList.load(list_path)])


def start_paused_erasure(manifest: Path, list_path: Path):
    """A spawned process mid-erasure of ``manifest`` (one new shard written); (process, go)."""
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_erase_paused, args=(str(manifest), str(list_path), ready, go))
    proc.start()
    while not ready.wait(0.2):
        assert proc.is_alive(), f"the first erasure ended early (exit {proc.exitcode})"
    return proc, go


def test_second_erasure_fails_while_the_first_runs_then_succeeds(
    toy: ToyDataset, tmp_path: Path
) -> None:
    first, second = toy.patient_ids[2], toy.patient_ids[5]
    pseudo = {toy.key.patient(first), toy.key.patient(second)}
    list1, list2 = save_list(toy, tmp_path, first), save_list(toy, tmp_path, second)
    proc, go = start_paused_erasure(toy.manifest, list1)
    try:
        assert rewrite.pending(toy.manifest) is not None  # the first is really mid-way
        before = snapshot(toy.root)
        with pytest.raises(DatasetLockedError) as info:
            apply_erasure(toy.manifest, [ExclusionList.load(list2)])
        msg = str(info.value)
        assert str(toy.manifest) in msg and f"pid {proc.pid}" in msg and "optout apply" in msg
        assert not any(p in msg for p in pseudo)
        assert snapshot(toy.root) == before  # manifest, journal, shards, no audit entry
    finally:
        go.set()
        proc.join(60)
    assert proc.exitcode == 0
    assert Manifest.load(toy.manifest).version == 2
    out = apply_erasure(toy.manifest, [ExclusionList.load(list2)])
    assert out.version == 3 and out.patients_erased == 1
    m = Manifest.load(toy.manifest)
    assert verify_manifest(m).ok
    assert not pseudo & patients_left(toy.manifest)
    assert len(patients_left(toy.manifest)) == len(toy.patient_ids) - 2
    log = audit.default_log_path(toy.manifest)
    assert [e["to_version"] for e in audit.read(log)] == [2, 3] and audit.verify(log).ok


def test_killed_holder_leaves_the_dataset_unlocked(toy: ToyDataset, tmp_path: Path) -> None:
    first, second = toy.patient_ids[1], toy.patient_ids[6]
    proc, _ = start_paused_erasure(toy.manifest, save_list(toy, tmp_path, first))
    assert locked_elsewhere(toy.manifest)
    proc.kill()  # SIGKILL: no finally, no atexit
    proc.join(30)
    assert not locked_elsewhere(toy.manifest)
    # the next erasure finishes the killed one's journal, then applies its own
    out = apply_erasure(toy.manifest, [ExclusionList.load(save_list(toy, tmp_path, second))])
    assert out.version == 3 and len(out.results) == 2
    assert verify_manifest(Manifest.load(toy.manifest)).ok
    assert not {toy.key.patient(first), toy.key.patient(second)} & patients_left(toy.manifest)


# -- in one process --------------------------------------------------------------------------


def test_lock_is_released_when_the_holder_raises(
    toy: ToyDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args, **kwargs):
        assert locked_elsewhere(toy.manifest)  # held while the rewrite runs
        raise RuntimeError("injected")

    monkeypatch.setattr(rewrite, "rewrite_shard", fail)
    lst = ExclusionList.load(save_list(toy, tmp_path, toy.patient_ids[0]))
    with pytest.raises(RuntimeError, match="injected"):
        apply_erasure(toy.manifest, [lst])
    assert not locked_elsewhere(toy.manifest)
    assert not dataset_lock._held
    monkeypatch.undo()
    assert apply_erasure(toy.manifest, [lst]).version == 2


def test_wait_gets_the_lock_once_the_holder_releases_it(toy: ToyDataset, tmp_path: Path) -> None:
    lst = ExclusionList.load(save_list(toy, tmp_path, toy.patient_ids[3]))
    waited = pytest.raises(DatasetLockedError, match=r"after waiting 0\.2 s")
    with held_by_thread(toy.manifest), waited:
        apply_erasure(toy.manifest, [lst], lock_wait=0.2)
    assert Manifest.load(toy.manifest).version == 1
    release = threading.Event()
    with held_by_thread(toy.manifest, until=release):
        threading.Timer(0.3, release.set).start()  # released 0.3 s into a 20 s wait
        assert apply_erasure(toy.manifest, [lst], lock_wait=20).version == 2


def test_merged_dataset_is_locked_with_its_parts(tmp_path: Path) -> None:
    a = build_toy_dataset(tmp_path / "a", n_patients=3, dataset="ca", site="A", id_prefix="A")
    b = build_toy_dataset(tmp_path / "b", n_patients=3, dataset="cb", site="B", id_prefix="B")
    merged = tmp_path / "data_manifests" / "all.json"
    merge([a.manifest, b.manifest], merged)
    lst = ExclusionList.load(save_list(a, tmp_path, a.patient_ids[0]))
    refused = pytest.raises(DatasetLockedError, match=str(b.manifest))
    with held_by_thread(b.manifest), refused:  # e.g. a project revocation on part b
        apply_erasure(merged, [lst])
    assert Manifest.load(merged).version == 1
    assert apply_erasure(merged, [lst]).version == 2


def _rectify_csv(ds: ToyDataset, folder: Path) -> Path:
    path = folder / "rectify.csv"
    acc = ds.accession(ds.patient_ids[0])
    path.write_text(f"accession_number,field,value\n{acc},body_part,ABDOMEN\n", encoding="utf-8")
    return path


WRITERS: dict[str, Callable[[ToyDataset, Path], object]] = {
    "rectify": lambda ds, tmp: rectify(ds.manifest, _rectify_csv(ds, tmp), ds.key),
    "retention set": lambda ds, tmp: retention.set_retention(ds.manifest, TODAY),
    "retention purge": lambda ds, tmp: retention.purge(
        ds.manifest, today=TODAY + dt.timedelta(days=1), yes=True
    ),
    "project approve": lambda ds, tmp: approve(ds.manifest, "p1", "DPO-1", TODAY, today=TODAY),
    "project revoke": lambda ds, tmp: revoke(ds.manifest, "p0", today=TODAY),
    "merge": lambda ds, tmp: merge([ds.manifest], tmp / "merged" / "all.json"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_manifest_writer_takes_the_lock(toy: ToyDataset, tmp_path: Path, writer: str) -> None:
    approve(toy.manifest, "p0", "DPO-0", TODAY, today=TODAY)
    retention.set_retention(toy.manifest, TODAY - dt.timedelta(days=800))  # past its deadline
    before = snapshot(toy.root)
    with held_by_thread(toy.manifest):
        with pytest.raises(DatasetLockedError, match="another writer holds this dataset"):
            WRITERS[writer](toy, tmp_path)
        assert snapshot(toy.root) == before
    WRITERS[writer](toy, tmp_path)  # the same call goes through once the lock is free
    assert snapshot(toy.root) != before


def test_cli_reports_a_held_lock_in_one_line(
    toy: ToyDataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lst = save_list(toy, tmp_path, toy.patient_ids[4])
    argv = ["optout", "apply", "--manifest", str(toy.manifest), "--list", str(lst)]
    with held_by_thread(toy.manifest):
        assert cli_main(argv) == 75
        err = capsys.readouterr().err
        assert str(toy.manifest) in err and f"pid {os.getpid()}" in err
        assert toy.key.patient(toy.patient_ids[4]) not in err
        assert cli_main([*argv, "--wait", "0.1"]) == 75
    assert cli_main(argv) == 0
    assert Manifest.load(toy.manifest).version == 2


def test_a_file_system_without_flock_is_refused(
    toy: ToyDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(dataset_lock.fcntl, "flock", no_flock)
    lst = ExclusionList.load(save_list(toy, tmp_path, toy.patient_ids[0]))
    with pytest.raises(DatasetLockError, match="ENOLCK") as info:
        apply_erasure(toy.manifest, [lst])
    assert not isinstance(info.value, DatasetLockedError)  # not "retry later"
    assert str(toy.manifest) in str(info.value)
    assert Manifest.load(toy.manifest).version == 1 and not dataset_lock._held
