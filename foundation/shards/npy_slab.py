"""Read only the boxes a training crop needs from an ``.npy`` member of a local shard.

A 128^3 crop of a 239x239x133 CT is a quarter of the stored bytes; reading the whole volume to
keep one crop caps the stream's samples/s and multiplies the bytes moved per sample. Shards are
uncompressed tars whose ``img.npy`` the writer stores in C order, so the member is the header
followed by the array at a known file offset: a box ``(x0:x1, y0:y1, z0:z1)`` of an ``(X, Y, Z)``
array is ``x1 - x0`` contiguous runs of ``(y1 - y0) * Z`` items (one run when ``y`` is whole),
read with ``pread`` into the region array ``(x1 - x0, y1 - y0, Z)``; ``z`` is cut in memory (a
``Z`` row is a few hundred bytes: cutting it on disk would multiply the reads, not save bytes).

``open_volume`` gives an ``NpyVolume`` (shape, dtype, ``read_boxes``) for a C-ordered member of
a local shard, or ``None`` where only a whole read works (a ``pipe:`` URL, whose bytes are read
already; Fortran order; ``.npy`` 3.0). The volume holds its own duplicate of the shard's file
descriptor, so it stays readable after the shard iterator moves on or closes (the stream keeps
a shuffle block of volumes). A member cut short is found when it is opened (its declared array
must lie inside the member and the member inside the file), so the stream skips and counts it
with its shard name as it did for a whole read.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from foundation.shards.reader import NpyPart, ShardReadError, npy_header

HEAD_READ = 512  # bytes read for the header first: numpy writes 128 (v1), more is rare
read_stats: Counter[str] = Counter()  # per process: "bytes" read by boxes, "reads" (preads)
Box = tuple[slice, ...]


class _Fd:
    """An owned file descriptor, closed when the last volume holding it goes."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill the byte view from ``offset`` (``EOFError`` if the file ends first)."""
    got = os.preadv(fd, [view], offset)
    while got < len(view):  # regular files return short reads only at the end
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:
            raise EOFError("unexpected end of data")
        got += k


def _bounds(box: Box, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``box`` (basic slices, step 1, one per axis) -> ``[(start, stop)]`` per axis."""
    if len(box) != len(shape):
        raise ValueError(f"box has {len(box)} axes, the array {len(shape)}")
    out = []
    for s, n in zip(box, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("boxes are read with step 1 only")
        out.append((start, max(start, stop)))
    return out


class NpyVolume:
    """A C-ordered array inside a local shard, read by boxes (see the module docstring)."""

    __slots__ = ("_fd", "dtype", "offset", "shape", "shard")

    def __init__(
        self, fd: _Fd, offset: int, shape: tuple[int, ...], dtype: np.dtype, shard: str
    ) -> None:
        self._fd, self.offset, self.shape, self.dtype, self.shard = fd, offset, shape, dtype, shard

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def _region_bytes(self, bounds: list[tuple[int, int]]) -> int:
        """Bytes ``read_box`` reads for ``bounds``: the box, whole on the last axis."""
        n = int(np.prod([b - a for a, b in bounds[:-1]], dtype=np.int64))
        return n * self.shape[-1] * self.dtype.itemsize

    def _read_region(self, bounds: list[tuple[int, int]]) -> np.ndarray:
        """The box, whole on the last axis, as a new C-contiguous array."""
        shape, item = self.shape, self.dtype.itemsize
        region = np.empty([b - a for a, b in bounds[:-1]] + [shape[-1]], dtype=self.dtype)
        if region.size == 0:
            return region
        # Axes after ``j`` are whole in the region: each index on the axes before ``j`` is one
        # contiguous run in the file (the box on axis j times the whole trailing axes).
        j = len(shape) - 2
        while j >= 0 and bounds[j] == (0, shape[j]):
            j -= 1
        j = max(j, 0)
        strides = np.cumprod((*shape[1:], 1)[::-1])[::-1] * item  # C-order byte strides
        start_j = int(bounds[j][0] * strides[j]) if j < len(shape) - 1 else 0  # 1D: whole
        # file offset of each run, in the region's (C) order: (n_runs,)
        offsets = np.zeros((), dtype=np.int64) + self.offset + start_j
        for (lo, hi), stride in zip(bounds[:j], strides[:j], strict=True):
            offsets = offsets[..., None] + np.arange(lo, hi, dtype=np.int64) * int(stride)
        offsets = offsets.ravel().tolist()
        run = region.nbytes // len(offsets)
        fd = self._fd.fd
        try:
            with memoryview(region).cast("B") as view:
                for k, off in enumerate(offsets):
                    _pread_into(fd, view[k * run : (k + 1) * run], off)
        except (OSError, EOFError) as e:
            raise ShardReadError(
                self.shard, f"corrupt or truncated shard ({e.__class__.__name__})"
            ) from None
        reads = len(offsets)
        read_stats["bytes"] += region.nbytes
        read_stats["reads"] += reads
        return region

    def read_box(self, box: Box) -> np.ndarray:
        """``array[box]`` (basic slices), reading only the rows it covers."""
        bounds = _bounds(box, self.shape)
        region = self._read_region(bounds)
        z0, z1 = bounds[-1]
        return region[..., z0:z1]

    def read_boxes(self, boxes: Sequence[Box]) -> list[np.ndarray]:
        """``[array[b] for b in boxes]``: one read of the boxes' union when it costs no more
        bytes than one read per box (overlapping crops of one volume), else one read each."""
        all_bounds = [_bounds(b, self.shape) for b in boxes]
        if len(all_bounds) < 2:
            return [self.read_box(b) for b in boxes]
        # per axis: the lowest start, the highest stop
        union = [
            (min(a for a, _ in axis), max(b for _, b in axis))
            for axis in zip(*all_bounds, strict=True)
        ]
        if self._region_bytes(union) > sum(self._region_bytes(b) for b in all_bounds):
            return [self.read_box(b) for b in boxes]
        region = self._read_region(union)  # whole on the last axis: its bounds stay absolute
        origin = [u for u, _ in union[:-1]] + [0]
        return [
            region[tuple(slice(a - o, b - o) for (a, b), o in zip(bb, origin, strict=True))]
            for bb in all_bounds
        ]

    def __getitem__(self, box: Box) -> np.ndarray:
        return self.read_box(box)

    def read(self) -> np.ndarray:
        """The whole array."""
        return self.read_box(tuple(slice(None) for _ in self.shape))


def open_volume(
    raw: dict[str, Any], shard: str = "?", dims: Sequence[int] = (3,)
) -> NpyVolume | None:
    """An ``NpyVolume`` for the sample's ``img.npy`` when it is a C-ordered array of ``dims``
    dimensions in a local shard whose iterator is open; ``None`` where a whole read is needed.

    Reads only the header. ``ShardReadError`` (naming the shard) if the header is unreadable or
    the member is cut short."""
    part = raw.get("img.npy")
    fd = part.fileno() if isinstance(part, NpyPart) else None
    if fd is None:
        return None
    try:
        head = os.pread(fd, min(part.size, HEAD_READ), part.offset)
        if len(head) < min(part.size, HEAD_READ):
            raise EOFError("member cut short")
        need = 12 + int.from_bytes(head[8:12], "little") if len(head) >= 12 else 0
        if head[6:7] == b"\x01":
            need = 10 + int.from_bytes(head[8:10], "little")
        if len(head) < need <= part.size:
            head = os.pread(fd, need, part.offset)
        header = npy_header(head)
        file_size = os.fstat(fd).st_size
    except EOFError as e:  # ours: the message is a reason
        raise ShardReadError(shard, f"corrupt or truncated shard ({e})") from None
    except OSError as e:
        raise ShardReadError(
            shard, f"corrupt or truncated shard ({e.__class__.__name__})"
        ) from None
    except (ValueError, TypeError):
        raise ShardReadError(shard, "img.npy is not a readable .npy array") from None
    if header is None:
        return None
    shape, fortran, dtype, start = header
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if start + nbytes > part.size:
        raise ShardReadError(shard, "img.npy is not a readable .npy array")
    if part.offset + part.size > file_size:
        raise ShardReadError(shard, "corrupt or truncated shard (member cut short)")
    if (fortran and len(shape) > 1) or len(shape) not in dims:
        return None
    return NpyVolume(_Fd(os.dup(fd)), part.offset + start, tuple(shape), dtype, shard)
