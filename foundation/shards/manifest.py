"""The manifest of a shard dataset: what was built, from what, and what each shard holds.

One JSON file per dataset version: the current one is ``data_manifests/<dataset>.json``; an
erasure or rectification archives the version it supersedes as ``<dataset>.v<N>.json`` with
``revoked_by`` set (see ``foundation.governance.rewrite``). It records the
lineage an audit needs (code version, key fingerprint, preprocessing spec, exclusion-list version
applied at build time) and, per shard, the facts the rest of the pipeline relies on without
opening the shard: sample count, size, sha256, modalities, dims, and the patient pseudonyms it
holds with their sample counts (erasure touches only those shards; the stream computes
post-exclusion sample counts from them to plan equal work per rank).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import foundation
from foundation.atomic import write_json_atomic

SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A manifest file is unreadable, malformed or unusable (the message names the file)."""


@dataclass
class ShardRecord:
    """What one shard holds; ``path`` is relative to the manifest's shard folder."""

    path: str
    samples: int
    bytes: int
    sha256: str
    modalities: list[str] = field(default_factory=list)  # sorted
    patients: dict[str, int] = field(default_factory=dict)  # pseudonym -> samples in shard
    dims: dict[str, int] = field(default_factory=dict)  # {"2": n, "3": n}
    keys: list[str] | None = None  # sample keys in shard order (optional)

    @property
    def dim(self) -> int:
        """The dimensionality of a homogeneous shard (2 or 3); ValueError if mixed or empty."""
        present = [int(d) for d, n in self.dims.items() if n > 0]
        if len(present) != 1:
            raise ValueError(f"shard {self.path} is not homogeneous in dims: {self.dims}")
        return present[0]

    def kept(self, excluded: frozenset[str] | set[str]) -> int:
        """Samples left once the excluded patients' samples are dropped."""
        return self.samples - sum(n for p, n in self.patients.items() if p in excluded)


def code_version() -> str:
    """``foundation.__version__`` plus ``git describe`` of the package checkout when available."""
    version = foundation.__version__
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(foundation.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        described = out.stdout.strip()
        if described:
            version = f"{version}+{described}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Manifest:
    """One dataset version. ``shard_root`` is the shard folder relative to the manifest file."""

    dataset: str
    key_id: str
    shards: list[ShardRecord] = field(default_factory=list)
    version: int = 1
    preprocessing: dict[str, Any] = field(default_factory=dict)
    exclusion_version: str | None = None
    shard_root: str = "."
    revoked_by: int | None = None
    created: str = field(default_factory=_now)
    code_version: str = field(default_factory=code_version)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the manifest was loaded from / saved to (not serialised): resolves shard paths.
    location: Path | None = field(default=None, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def shard_dir(self) -> Path:
        """Absolute shard folder (relative ``shard_root`` resolved against the manifest file)."""
        root = Path(self.shard_root)
        if root.is_absolute():
            return root
        base = self.location.parent if self.location is not None else Path.cwd()
        return (base / root).resolve()

    def shard_paths(self) -> list[Path]:
        """Absolute path of every shard, in manifest order."""
        return [self.shard_dir / s.path for s in self.shards]

    def patients(self) -> set[str]:
        """Every patient pseudonym present in the dataset."""
        return {p for s in self.shards for p in s.patients}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("location")
        return d

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, fsync, rename)."""
        path = write_json_atomic(path, self.to_dict(), sort_keys=False)
        self.location = path.resolve()
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: manifest must be a JSON object")
        schema = d.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: unsupported manifest schema_version {schema!r} "
                f"(this code reads {SCHEMA_VERSION})"
            )
        known = {f.name for f in fields(cls)} - {"location"}
        unknown = set(d) - known
        if unknown:
            raise ManifestError(f"{source}: unknown manifest fields {sorted(unknown)}")
        for required in ("dataset", "key_id", "shards"):
            if required not in d:
                raise ManifestError(f"{source}: manifest lacks {required!r}")
        shard_fields = {f.name for f in fields(ShardRecord)}
        shards = []
        for i, s in enumerate(d["shards"]):
            if not isinstance(s, dict) or not {"path", "samples", "bytes", "sha256"} <= set(s):
                raise ManifestError(f"{source}: shard #{i} lacks path/samples/bytes/sha256")
            extra = set(s) - shard_fields
            if extra:
                raise ManifestError(f"{source}: shard #{i} has unknown fields {sorted(extra)}")
            shards.append(ShardRecord(**s))
        if not isinstance(d.get("version", 1), int) or d.get("version", 1) < 1:
            raise ManifestError(f"{source}: version must be an integer >= 1")
        return cls(**{**d, "shards": shards})

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a manifest; ``ManifestError`` naming the file on bad JSON or schema."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{path}: manifest not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
        try:
            manifest = cls.from_dict(d, source=str(path))
        except TypeError as e:  # wrong field types caught by the dataclass constructors
            raise ManifestError(f"{path}: malformed manifest ({e})") from None
        manifest.location = path.resolve()
        return manifest
