"""Check that the shards on disk are exactly what the manifest says (size, sha256, samples)."""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from foundation.shards.manifest import Manifest


@dataclass
class ShardProblem:
    path: str  # shard path relative to the shard folder
    reason: str


@dataclass
class VerifyReport:
    manifest: str
    checked: int = 0
    problems: list[ShardProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.manifest}: {self.checked} shards checked, {len(self.problems)} problems"
        return "\n".join([head, *(f"  {p.path}: {p.reason}" for p in self.problems)])


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _keys(path: Path) -> list[str]:
    """Sample keys in stored order (webdataset cuts member names at the first dot)."""
    keys: list[str] = []
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.isreg():
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def verify_manifest(path: str | Path | Manifest, *, check_samples: bool = True) -> VerifyReport:
    """Check every shard: exists, byte size, sha256 and (optionally) sample count and keys."""
    manifest = path if isinstance(path, Manifest) else Manifest.load(path)
    report = VerifyReport(manifest=str(manifest.location or path))
    for record, shard_path in zip(manifest.shards, manifest.shard_paths(), strict=True):
        report.checked += 1

        def problem(reason: str, rel: str = record.path) -> None:
            report.problems.append(ShardProblem(rel, reason))

        if not shard_path.is_file():
            problem("missing")
            continue
        size = shard_path.stat().st_size
        if size != record.bytes:
            problem(f"size {size} bytes, manifest says {record.bytes}")
        digest = _sha256(shard_path)
        if digest != record.sha256:
            problem("sha256 differs from the manifest")
        if not check_samples:
            continue
        try:
            keys = _keys(shard_path)
        except (tarfile.TarError, OSError, EOFError) as e:
            problem(f"unreadable tar ({e.__class__.__name__})")
            continue
        if len(keys) != record.samples:
            problem(f"{len(keys)} samples, manifest says {record.samples}")
        elif record.keys is not None and keys != record.keys:
            problem("sample keys differ from the manifest")
    return report
