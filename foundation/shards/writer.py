"""Write validated samples into WebDataset tar shards, one dimensionality per shard.

Each shard is written to ``<name>.tar.tmp`` while open and renamed to ``<name>.tar`` only when
complete, so a crash never leaves a truncated file under a final name. 2D and 3D samples go to
separate shards (``<prefix>-2d-000000.tar``, ``<prefix>-3d-000000.tar``): the stream builds
batches homogeneous in dims and plans per dims from the manifest counts alone, which needs
homogeneous shards; sizes differ by orders of magnitude anyway.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds

from foundation.sample import Sample
from foundation.shards.manifest import ShardRecord


def encode_sample(sample: Sample) -> dict[str, bytes | str]:
    """The tar entries of a sample: ``img.npy``, ``meta.json``, ``report.txt`` (contract)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(sample.image), allow_pickle=False)
    return {
        "__key__": sample.key,
        "img.npy": buf.getvalue(),
        "meta.json": json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "report.txt": sample.report.encode("utf-8"),
    }


class _HashingFile:
    """Write-only file wrapper that hashes and counts what goes through (no re-read)."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class _OpenShard:
    """One shard being written: its tar writer and the facts the manifest will record."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.final = out_dir / name
        self.tmp = out_dir / (name + ".tmp")
        self.file = _HashingFile(self.tmp)
        # mtime fixed: the same samples give byte-identical shards (reproducible sha256).
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=0.0)
        self.patients: Counter[str] = Counter()
        self.modalities: set[str] = set()
        self.dims: Counter[str] = Counter()
        self.keys: list[str] = []

    def write(self, entries: dict, sample: Sample) -> None:
        self.tar.write(entries)
        self.patients[sample.meta["patient"]] += 1
        self.modalities.add(sample.meta["modality"])
        self.dims[str(sample.meta["dims"])] += 1
        self.keys.append(sample.key)

    def finish(self, out_dir: Path) -> ShardRecord:
        self.tar.close()  # writes the tar end blocks through the hashing file
        self.file.close()
        os.replace(self.tmp, self.final)
        return ShardRecord(
            path=str(self.final.relative_to(out_dir)),
            samples=len(self.keys),
            bytes=self.file.nbytes,
            sha256=self.file.sha256.hexdigest(),
            modalities=sorted(self.modalities),
            patients=dict(sorted(self.patients.items())),
            dims=dict(sorted(self.dims.items())),
            keys=list(self.keys),
        )

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Write samples into size-bounded shards; ``close()`` returns their records.

    A shard is closed when it holds ``max_samples`` samples or when the next sample would take
    it past ``max_bytes`` (a single larger sample still gets a shard of its own).
    """

    def __init__(
        self,
        out_dir: Path,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        start_index: int = 0,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self._next_index = {2: start_index, 3: start_index}
        self._open: dict[int, _OpenShard] = {}
        self._records: list[ShardRecord] = []
        self._seen_keys: set[str] = set()
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard behind
            for shard in self._open.values():
                shard.abort()
            self._open.clear()
            self._closed = True

    def _name(self, dims: int) -> str:
        index = self._next_index[dims]
        self._next_index[dims] += 1
        return f"{self.prefix}-{dims}d-{index:06d}.tar"

    def write(self, sample: Sample) -> None:
        """Validate and append one sample (``ValueError`` if it breaks the shard contract)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        sample.validate()
        if sample.key in self._seen_keys:
            raise ValueError(f"duplicate sample key {sample.key}")
        entries = encode_sample(sample)
        size = sum(len(v) for k, v in entries.items() if k != "__key__") + 512 * 4  # + headers
        dims = int(sample.meta["dims"])
        shard = self._open.get(dims)
        if shard is not None and (
            len(shard.keys) >= self.max_samples or shard.file.nbytes + size > self.max_bytes
        ):
            self._records.append(shard.finish(self.out_dir))
            shard = None
        if shard is None:
            shard = self._open[dims] = _OpenShard(self.out_dir, self._name(dims))
        shard.write(entries, sample)
        self._seen_keys.add(sample.key)

    def close(self) -> list[ShardRecord]:
        """Finish the open shards; return every shard record, sorted by path."""
        if not self._closed:
            for dims in sorted(self._open):
                self._records.append(self._open[dims].finish(self.out_dir))
            self._open.clear()
            self._closed = True
        return sorted(self._records, key=lambda r: r.path)
