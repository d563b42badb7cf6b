"""A binary sidecar beside an exclusion list's JSON, so that reloading it costs a file read.

The stream reloads the list at each epoch start; with 1,000,000 pseudonyms parsing the JSON and
re-hashing its canonical form to verify the version takes seconds. The JSON stays the contract
(pseudonyms only, request type and date, content-hash version); ``<list>.json.cache`` is a
derived copy of its rows, written atomically after the JSON was read and its version verified
(or right after ``save``), and used only while it still describes the JSON on disk:

- the JSON's size, mtime (ns) and inode equal those recorded (any rewrite changes them), and
- the ``"version"`` at the end of the JSON equals the version recorded (a replacement that
  happens to match size, mtime and a recycled inode still differs in content, so in version),
- the sidecar's body hashes to the SHA-256 its header records (a damaged sidecar is ignored).

Otherwise it is ignored and ``ExclusionList.load`` reads the JSON and writes a new one. Layout:
one JSON header line, then the three columns (pseudonyms, request types, dates), each joined by
newlines, UTF-8: splitting them back is one C call per column. It holds nothing the JSON does
not (pseudonyms only) and is written with the same private mode (``mkstemp``: 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)
CACHE_FORMAT = "foundation-exclusion-cache"
CACHE_VERSION = 1
TAIL = 4096  # the JSON ends with its "version" (sorted keys): read this much of its end
_VERSION_RE = re.compile(rb'"version"\s*:\s*"([0-9a-f]+)"\s*}\s*$')


class Rows(NamedTuple):
    """The list's content as parallel columns, sorted by (pseudonym, request type), unique."""

    pseudonyms: list[str]
    types: list[str]
    dates: list[str]


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".cache")


def stamp(st: os.stat_result) -> dict[str, int]:
    """What identifies one state of the JSON file (no device number: it differs per machine
    on a shared file system)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def tail_version(path: Path, size: int) -> str | None:
    """The ``"version"`` recorded at the end of the JSON (``save`` sorts keys: it is last)."""
    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL))
        m = _VERSION_RE.search(f.read(TAIL))
    return m.group(1).decode() if m else None


def read_sidecar(path: Path) -> tuple[Rows, str | None, str] | None:
    """(rows, key_id, version) from the sidecar of the JSON at ``path`` if it is valid (see the
    module docstring), else ``None``. Never raises for a missing, stale or damaged sidecar."""
    cache = sidecar_path(path)
    try:
        st = os.stat(path)
        data = cache.read_bytes()
        end = data.index(b"\n")
        head = json.loads(data[:end])
        if (
            head.get("format") != CACHE_FORMAT
            or head.get("cache_version") != CACHE_VERSION
            or head.get("source") != stamp(st)
            or head.get("version") != tail_version(path, st.st_size)
        ):
            return None
        body = memoryview(data)[end + 1 :]
        if hashlib.sha256(body).hexdigest() != head.get("sha256"):
            log.warning("%s: damaged exclusion-list cache ignored", cache.name)
            return None
        n, columns, start = head["count"], [], 0
        for length in head["lengths"]:
            text = bytes(body[start : start + length]).decode("utf-8")
            columns.append(text.split("\n") if n else [])
            start += length
        rows = Rows(*columns)
        if start != len(body) or any(len(c) != n for c in rows):
            return None
        return rows, head["key_id"], head["version"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_sidecar(
    path: Path, rows: Rows, key_id: str | None, version: str, st: os.stat_result
) -> None:
    """Write the sidecar of the JSON at ``path`` whose state ``st`` holds ``rows`` (verified to
    have ``version``), atomically. Best effort: a read-only folder or a full disk only means
    the next load parses the JSON again."""
    cache = sidecar_path(path)
    blobs = []
    for column in rows:
        if any("\n" in s for s in column):  # cannot be split back: no cache for this list
            return
        blobs.append("\n".join(column).encode("utf-8"))
    body = b"".join(blobs)
    head = {
        "format": CACHE_FORMAT, "cache_version": CACHE_VERSION, "source": stamp(st),
        "version": version, "key_id": key_id, "count": len(rows.pseudonyms),
        "lengths": [len(b) for b in blobs], "sha256": hashlib.sha256(body).hexdigest(),
    }  # fmt: skip
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(head).encode() + b"\n")
            f.write(body)
        os.replace(tmp, cache)
        tmp = None
    except OSError as e:
        log.info("%s: exclusion-list cache not written (%s)", cache.name, e.__class__.__name__)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
