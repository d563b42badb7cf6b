"""Read shards back: raw tar samples (for the stream) and decoded ``Sample`` objects (for tools).

The tar reader is our own (tarfile's stream mode copies every payload twice, through 10 KiB
reads): 512-byte headers are parsed by ``tarfile.TarInfo`` (pax and GNU long names included),
small parts are read whole, and ``img.npy`` is read with ``readinto`` straight into the buffer
the decoded array views (one copy, from the kernel). On a local file the image is read only
when ``load_image`` asks for it, so a filter that reads ``meta.json`` only seeks past the image
bytes. ``pipe:`` URLs (webdataset's ``gopen``) read sequentially, the image eagerly. The stream
reads only a training crop's rows of a local 3D image (``npy_slab``, from ``NpyPart.fileno``
and ``npy_header``).

Corruption (truncated tar, missing end-of-archive marker, bad header, sample missing a part)
surfaces as ``ShardReadError`` naming the shard and the reason, never a sample's content.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from foundation.sample import Sample
from foundation.shards.manifest import Manifest

REQUIRED_PARTS = ("img.npy", "meta.json")
BLOCK = tarfile.BLOCKSIZE  # 512
SKIP_CHUNK = 1 << 20  # discarding a payload from a pipe: 1 MiB reads into one scratch buffer


class ShardReadError(RuntimeError):
    """A shard (or one of its samples) cannot be read; ``shard`` names it."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"{shard}: {reason}")
        self.shard = shard
        self.reason = reason


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class _TarStream:
    """A tar byte stream read exactly: what ``TarInfo.fromtarfile`` needs of a ``TarFile``
    (``fileobj`` with ``read``/``tell``, ``pax_headers``, ``encoding``, ``errors``) plus
    ``readinto`` and ``skip`` (a seek when the file allows it)."""

    encoding = tarfile.ENCODING
    errors = "surrogateescape"

    def __init__(self, raw: Any, seekable: bool) -> None:
        self.raw = raw  # FileIO (local) or a buffered pipe: both have readinto
        self.seekable = seekable
        self.pos = 0
        self.offset = 0  # set by TarInfo._proc_builtin; unused
        self.pax_headers: dict[str, str] = {}
        self.fileobj = self
        self._scratch: bytearray | None = None

    def tell(self) -> int:
        return self.pos

    def readinto(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:  # pipes (and some file systems) return short reads
            k = self.raw.readinto(view[got:])
            if not k:
                raise EOFError("unexpected end of data")
            got += k
        self.pos += n

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = 0
        with memoryview(buf) as view:
            while got < n:
                k = self.raw.readinto(view[got:])
                if not k:
                    break
                got += k
        self.pos += got
        return bytes(buf[:got]) if got < n else bytes(buf)

    def skip(self, n: int) -> None:
        if self.seekable:
            self.pos = self.raw.seek(n, os.SEEK_CUR)
            return
        if self._scratch is None:
            self._scratch = bytearray(SKIP_CHUNK)
        with memoryview(self._scratch) as view:
            while n > 0:
                k = min(n, SKIP_CHUNK)
                self.readinto(view[:k])
                n -= k

    def read_at(self, offset: int, size: int) -> np.ndarray:
        """``size`` bytes at ``offset`` into a new uint8 array; the position is kept."""
        here = self.pos
        self.raw.seek(offset)
        self.pos = offset
        try:
            return self.read_array(size)
        finally:
            self.pos = self.raw.seek(here)

    def read_array(self, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.uint8)  # the decoded image will view this buffer
        with memoryview(out) as view:
            self.readinto(view)
        return out


class NpyPart:
    """An ``.npy`` member: bytes already read (pipe) or a place in a local shard, read when
    ``load_image`` asks (valid while the shard iterator that produced it is open)."""

    __slots__ = ("_stream", "data", "offset", "size")

    def __init__(self, size: int, data: np.ndarray | None, stream: _TarStream | None, offset: int):
        self.size, self.data, self._stream, self.offset = size, data, stream, offset

    def fileno(self) -> int | None:
        """The open local shard's descriptor (for reads by position), ``None`` when the bytes
        were read already (pipe) or the shard iterator is closed."""
        if self.data is not None or self._stream is None or self._stream.raw.closed:
            return None
        return self._stream.raw.fileno()

    def read(self) -> np.ndarray:
        """The member's bytes as a uint8 array (``OSError``/``EOFError`` if unreadable)."""
        if self.data is None:
            if self._stream is None or self._stream.raw.closed:
                raise OSError("image read after its shard iterator was closed")
            self.data = self._stream.read_at(self.offset, self.size)
        return self.data


def _open(url: str) -> tuple[Any, Any, bool]:
    """(object to close, object with readinto, seekable) for a local path or a gopen URL."""
    if url.startswith("pipe:") or "://" in url:
        stream = gopen(url, "rb")
        raw = getattr(stream, "stream", stream)  # webdataset's Pipe wraps proc.stdout
        return stream, raw, False
    raw = open(url, "rb", buffering=0)  # noqa: SIM115 (closed by iter_shard)
    return raw, raw, True


def _iter_parts(ts: _TarStream) -> Iterator[tuple[str, Any]]:
    """(name, value) of each regular member; ``.npy`` values are ``NpyPart``s."""
    while True:
        try:
            info = tarfile.TarInfo.fromtarfile(ts)  # type: ignore[arg-type]
        except tarfile.EOFHeaderError:
            return  # a zero block: the end-of-archive marker
        except tarfile.EmptyHeaderError:
            raise EOFError("no end-of-archive marker") from None
        except tarfile.TruncatedHeaderError:
            raise EOFError("truncated header") from None
        size = info.size if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES else 0
        base = info.name.rsplit("/", 1)[-1]
        if not info.isreg() or (base.startswith("__") and base.endswith("__")):
            ts.skip(_padded(size))
            continue
        if info.name.endswith(".npy"):
            if ts.seekable:  # read later, only if load_image asks
                part = NpyPart(size, None, ts, ts.pos)
                ts.skip(_padded(size))
            else:
                part = NpyPart(size, ts.read_array(size), None, ts.pos - size)
                ts.skip(_padded(size) - size)
            yield info.name, part
        else:
            data = ts.read(_padded(size))
            if len(data) < _padded(size):
                raise EOFError("unexpected end of data")
            yield info.name, data[:size]


def _group(parts: Iterator[tuple[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key -> one sample dict (webdataset's convention)."""
    current: dict[str, Any] | None = None
    for fname, value in parts:
        prefix, suffix = base_plus_ext(fname)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": url}
        if suffix in current:
            raise ValueError(f"duplicate file name in tar file: {suffix}")
        current[suffix] = value
    if current is not None:
        yield current


def _shard_name(url: str) -> str:
    return Path(url.split(" ")[-1]).name if url.startswith("pipe:") else Path(url).name


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in stored order: ``{"__key__", "img.npy", "meta.json", ...}``.

    ``img.npy`` is an ``NpyPart`` (decode it with ``load_image`` while the iterator is open);
    the other values are bytes. Works with local paths and ``pipe:`` URLs. Raises
    ``ShardReadError`` on a truncated/corrupt tar or an incomplete sample; samples before the
    damage come first.
    """
    name = _shard_name(url)
    closer = None
    try:
        closer, raw, seekable = _open(url)
        for sample in _group(_iter_parts(_TarStream(raw, seekable)), url):
            missing = [p for p in REQUIRED_PARTS if p not in sample]
            if missing:
                raise ShardReadError(name, f"sample lacks {', '.join(missing)}")
            yield sample
        closer.close()  # a pipe's command status is checked here
    except ShardReadError:
        raise
    except FileNotFoundError:
        raise ShardReadError(name, "shard file not found") from None
    except EOFError as e:  # ours: the message is a reason, never content
        raise ShardReadError(name, f"corrupt or truncated shard ({e})") from None
    except Exception as e:  # tarfile.HeaderError, OSError, ValueError (duplicates)
        raise ShardReadError(name, f"corrupt or truncated shard ({e.__class__.__name__})") from None
    finally:
        if closer is not None:
            # a pipe cut short by us (early stop) may report SIGPIPE: irrelevant then
            with contextlib.suppress(Exception):
                closer.close()


def decode_meta(raw: dict[str, Any], shard: str = "?") -> dict[str, Any]:
    """Parse ``meta.json`` bytes; ``ShardReadError`` if it is not a JSON object."""
    try:
        meta = json.loads(raw["meta.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardReadError(shard, "meta.json is not valid UTF-8 JSON") from None
    if not isinstance(meta, dict):
        raise ShardReadError(shard, "meta.json is not an object")
    return meta


def npy_header(buf: bytes | np.ndarray) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran order, dtype, data offset) from the first bytes of an ``.npy``; ``None``
    for format 3.0 and later (let numpy read those). ``ValueError`` if the header is not a
    complete, pickle-free ``.npy`` header (``buf`` may hold more than the header)."""
    buf = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
    # magic (8 bytes), header length (2 bytes in v1, 4 in v2), header: copy just that
    hlen = int.from_bytes(buf[8:12].tobytes(), "little") if len(buf) >= 12 else 0
    hlen = hlen & 0xFFFF if buf[6:7].tobytes() == b"\x01" else hlen
    head = io.BytesIO(buf[: 12 + hlen].tobytes())
    version = npy_format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(head)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(head)
    else:  # 3.0 (utf-8 field names) and later: rare
        return None
    if dtype.hasobject:
        raise ValueError("object arrays need pickle")
    return shape, fortran, dtype, head.tell()


def decode_npy(buf: np.ndarray) -> np.ndarray:
    """``.npy`` bytes (a uint8 array) -> the array, viewing ``buf`` (no copy, no pickle).

    ``ValueError`` if the bytes are not a complete, pickle-free ``.npy``."""
    header = npy_header(buf)
    if header is None:  # one copy
        return np.load(io.BytesIO(buf.tobytes()), allow_pickle=False)
    shape, fortran, dtype, start = header
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) - start < nbytes:
        raise ValueError("npy data is truncated")
    flat = buf[start : start + nbytes].view(dtype)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def load_image(raw: dict[str, Any], shard: str = "?") -> np.ndarray:
    """Decode ``img.npy`` (an ``NpyPart`` or bytes) into a writable array; ``ShardReadError``
    if unreadable."""
    part = raw["img.npy"]
    try:
        if isinstance(part, NpyPart):
            buf = part.read()
        else:  # bytes from elsewhere: one copy, so the array is writable as np.load's was
            buf = np.frombuffer(bytearray(part), dtype=np.uint8)
        return decode_npy(buf)
    except (OSError, EOFError) as e:
        raise ShardReadError(
            shard, f"corrupt or truncated shard ({e.__class__.__name__})"
        ) from None
    except (ValueError, TypeError):
        raise ShardReadError(shard, "img.npy is not a readable .npy array") from None


def decode_report(raw: dict[str, Any]) -> str:
    data = raw.get("report.txt", b"")
    return data.decode("utf-8", errors="replace")


def iter_samples(manifest: Manifest | str | Path, *, decode_image: bool = True) -> Iterator[Sample]:
    """Every sample of a dataset, shard after shard, in manifest order.

    With ``decode_image=False`` the image is left unread: ``Sample.image`` is an empty
    ``(0,)`` array and ``meta["shape"]`` still says the stored shape (cheap inspection).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    missing = [p for p in manifest.shard_paths() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: shard listed in the manifest is missing")
    for path in manifest.shard_paths():
        for raw in iter_shard(str(path)):
            meta = decode_meta(raw, path.name)
            image = load_image(raw, path.name) if decode_image else np.empty((0,), dtype=np.int16)
            yield Sample(key=raw["__key__"], image=image, meta=meta, report=decode_report(raw))
