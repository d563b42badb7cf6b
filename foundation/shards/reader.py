"""Read shards back: raw tar samples (for the stream) and decoded ``Sample`` objects (for tools).

Tar iteration is webdataset's (``url_opener -> tar_file_expander -> group_by_keys``), so local
paths and ``pipe:`` URLs both work. Corruption (truncated tar, unreadable entry, sample missing
a part) surfaces as ``ShardReadError`` naming the shard and the reason, never a sample's content.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from webdataset import tariterators

from foundation.sample import Sample
from foundation.shards.manifest import Manifest

REQUIRED_PARTS = ("img.npy", "meta.json")


class ShardReadError(RuntimeError):
    """A shard (or one of its samples) cannot be read; ``shard`` names it."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"{shard}: {reason}")
        self.shard = shard
        self.reason = reason


def _reraise(exn: Exception) -> bool:
    raise exn


READ_CHUNK = 1 << 20  # tarfile's stream mode reads 10 KiB at a time by default: slow for volumes


def _tar_files(url: str) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` per regular member: webdataset's ``tar_file_iterator``
    with 1 MiB reads instead of 10 KiB (the stream is opened by webdataset's ``gopen``)."""
    for source in tariterators.url_opener([{"url": url}], handler=_reraise):
        stream = source["stream"]
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=READ_CHUNK) as tar:
                for info in tar:
                    if info.isreg():
                        data = tar.extractfile(info).read()  # type: ignore[union-attr]
                        yield {"fname": info.name, "data": data, "__url__": url}
                    tar.members = []  # stream mode: keep no member list
        finally:
            stream.close()


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in stored order: ``{"__key__", "img.npy", "meta.json", ...}``.

    Values are bytes. Works with local paths and ``pipe:`` URLs. Raises ``ShardReadError`` on
    a truncated/corrupt tar or an incomplete sample; samples before the damage come first.
    """
    name = Path(url.split(" ")[-1]).name if url.startswith("pipe:") else Path(url).name
    files = _tar_files(url)
    try:
        for sample in tariterators.group_by_keys(files, handler=_reraise):
            missing = [p for p in REQUIRED_PARTS if p not in sample]
            if missing:
                raise ShardReadError(name, f"sample lacks {', '.join(missing)}")
            yield sample
    except ShardReadError:
        raise
    except FileNotFoundError:
        raise ShardReadError(name, "shard file not found") from None
    except Exception as e:  # tarfile.ReadError, EOFError, OSError, ValueError (duplicates)
        raise ShardReadError(name, f"corrupt or truncated shard ({e.__class__.__name__})") from None
    finally:
        files.close()


def decode_meta(raw: dict[str, Any], shard: str = "?") -> dict[str, Any]:
    """Parse ``meta.json`` bytes; ``ShardReadError`` if it is not a JSON object."""
    try:
        meta = json.loads(raw["meta.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardReadError(shard, "meta.json is not valid UTF-8 JSON") from None
    if not isinstance(meta, dict):
        raise ShardReadError(shard, "meta.json is not an object")
    return meta


def load_image(raw: dict[str, Any], shard: str = "?") -> np.ndarray:
    """Decode ``img.npy`` bytes (no pickle); ``ShardReadError`` if unreadable."""
    try:
        return np.load(io.BytesIO(raw["img.npy"]), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise ShardReadError(shard, "img.npy is not a readable .npy array") from None


def decode_report(raw: dict[str, Any]) -> str:
    data = raw.get("report.txt", b"")
    return data.decode("utf-8", errors="replace")


def iter_samples(manifest: Manifest | str | Path, *, decode_image: bool = True) -> Iterator[Sample]:
    """Every sample of a dataset, shard after shard, in manifest order.

    With ``decode_image=False`` the image is left undecoded: ``Sample.image`` is an empty
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
