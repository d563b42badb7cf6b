"""One writer at a time per dataset: an exclusive ``flock`` on ``<manifest>.lock``.

Every operation that publishes a new manifest version or edits a manifest in place (erasure,
rectification, retention set/purge, project approvals, merge) holds the lock of the dataset for
its whole read-modify-publish. Without it a second erasure could build version N+1 from a
stale version N, or delete the shards the first one just wrote. Readers (training streams,
``shards verify``) never take it: they see the old manifest or the new one (atomic renames).

- The lock file sits beside the manifest (``data_manifests/<dataset>.json.lock``) and is never
  deleted: unlinking a lock file races with a process about to lock it. While held it records
  the holder (pid, host, operation, start time; no identifier of anyone) for the error message.
- ``flock`` is released by the kernel when the holder's file descriptors close, so an
  exception or a killed process (SIGKILL, OOM, node failure on a local disk) never leaves a
  dataset locked. Linux only; on a shared file system it needs flock support (NFSv4 emulates
  it with byte-range locks, Lustre needs the ``flock`` mount option).
- Non-blocking by default: a second writer fails at once with ``DatasetLockedError``; with
  ``wait`` seconds it polls until then.
- Re-entrant within one thread (``apply_erasure`` holds it and calls ``rewrite.run``, which
  takes it too); another thread of the same process is a second writer like any other.
- The lock of a merged dataset also covers the parts it was merged from (their manifests are
  redacted or revoked by its erasures); archived versions ``<dataset>.v<N>.json`` are only
  ever written under the lock of their current manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from foundation.shards.manifest import Manifest, ManifestError

LOCK_SUFFIX = ".lock"
POLL_SECONDS = 0.1  # between attempts while waiting


class DatasetLockError(RuntimeError):
    """The dataset's lock cannot be taken at all (a file system without flock)."""


class DatasetLockedError(DatasetLockError):
    """Another process (or thread) holds the dataset's lock; names the manifest and holder."""


@dataclass
class _Held:
    fd: int
    depth: int  # nested acquisitions by the owning thread


# (lock file, thread id) -> open lock; one flock per entry
_held: dict[tuple[Path, int], _Held] = {}
_registry = threading.Lock()


def _forget_inherited() -> None:
    # A forked child shares the parent's lock (same open file description): closing its copy
    # does not release the parent's lock, and the child must not believe it holds it.
    for h in _held.values():
        with contextlib.suppress(OSError):
            os.close(h.fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def lock_path(manifest_path: str | Path) -> Path:
    """``<manifest>.lock`` beside the manifest (symlinks resolved: one lock per real file)."""
    p = Path(manifest_path).resolve()
    return p.with_name(p.name + LOCK_SUFFIX)


def holder(manifest_path: str | Path) -> str:
    """Who holds (or last held) the lock, as recorded in the lock file: 'pid N on HOST, ...'."""
    try:
        info = json.loads(lock_path(manifest_path).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, {info['operation']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _open(path: Path) -> tuple[int, bool]:
    """The lock file's descriptor and whether it is writable (a read-only one still locks)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), True
    except PermissionError:  # created by a colleague without group write: lock, record nothing
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False


def _record(fd: int, operation: str) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "operation": operation,
        "since": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _try_flock(fd: int, manifest: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. ENOLCK / ENOSYS: a file system without flock
        raise DatasetLockError(
            f"{manifest}: cannot lock the dataset for writing"
            f" ({errno.errorcode.get(e.errno, 'error')}: file system without flock support?)"
        ) from None


def _holds(manifest: Path) -> bool:
    """Whether this thread holds the lock of ``manifest`` already."""
    with _registry:
        return (lock_path(manifest), threading.get_ident()) in _held


def _acquire(manifest: Path, wait: float, operation: str) -> None:
    path = lock_path(manifest)
    key = (path, threading.get_ident())
    with _registry:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
            return
    fd, writable = _open(path)
    deadline = time.monotonic() + max(wait, 0.0)
    try:
        while not _try_flock(fd, manifest):
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                raise DatasetLockedError(
                    f"{manifest}: another writer holds this dataset's lock"
                    f" ({holder(manifest)}){waited}; retry when it has finished"
                    " (or wait for it: --wait SECONDS)"
                )
            time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
        if writable:
            _record(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    with _registry:
        _held[key] = _Held(fd, 1)


def _release(manifest: Path) -> None:
    key = (lock_path(manifest), threading.get_ident())
    with _registry:
        held = _held[key]
        held.depth -= 1
        if held.depth > 0:
            return
        del _held[key]
    with contextlib.suppress(OSError):
        os.ftruncate(held.fd, 0)  # a reader of the file during the next acquisition sees no one
    os.close(held.fd)  # closing releases the flock


@contextlib.contextmanager
def hold(
    manifest_path: str | Path, *, wait: float = 0.0, operation: str = "rewrite"
) -> Iterator[Path]:
    """Hold the lock of one manifest file (``wait`` seconds at most to get it); yields the
    lock file. Raises ``DatasetLockedError`` naming the manifest and the holder's pid."""
    manifest = Path(manifest_path)
    _acquire(manifest, wait, operation)
    try:
        yield lock_path(manifest)
    finally:
        _release(manifest)


def _parts(manifest_path: Path) -> list[Path]:
    """Manifests a merged dataset was made from (``extra["sources"]``), sorted; [] otherwise."""
    try:
        sources = Manifest.load(manifest_path).extra.get("sources") or []
    except ManifestError:
        return []  # the writer itself reports the unreadable manifest
    base = manifest_path.resolve().parent
    parts = {(base / s["manifest"]).resolve() for s in sources if s.get("manifest")}
    return sorted(p for p in parts if p.is_file())  # a part deleted since: nothing to protect


@contextlib.contextmanager
def dataset_lock(
    manifest_path: str | Path, *, wait: float = 0.0, operation: str = "rewrite"
) -> Iterator[None]:
    """Hold the lock of the dataset at ``manifest_path`` and, for a merged dataset, of the parts
    it was merged from (always in that order: merged first, parts sorted). The manifest must
    exist (``ManifestError`` otherwise: no lock file is left beside a mistyped path)."""
    path = Path(manifest_path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with contextlib.ExitStack() as stack:
        nested = _holds(path)  # re-entered: the outer call holds the parts already
        stack.enter_context(hold(path, wait=wait, operation=operation))
        for part in [] if nested else _parts(path):  # read under the merged manifest's lock
            stack.enter_context(hold(part, wait=wait, operation=operation))
        yield
