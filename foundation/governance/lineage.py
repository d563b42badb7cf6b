"""What a checkpoint was trained on, and which requests arrived since (``foundation audit run``).

A pretraining checkpoint records ``checkpoint["foundation"]["lineage"]`` (the run's
``lineage`` hyperparameter updated with the DataModule's ``{"dataset", "version", "key_id"}``)
and the stream position, which holds ``manifest_version`` and ``exclusion_version``. Names have
varied (``manifest_version`` / ``version``, ``exclusion_version`` / ``exclusion_list_version``):
all are read. The requests that arrived after the run are those of the current exclusion list
received after the checkpoint was written (its ``saved`` time, else the file's mtime).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from foundation.privacy.exclusion import ExclusionList
from foundation.shards.manifest import Manifest


def _load(ckpt_path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found") from None
    except Exception:  # objects beyond weights_only's allow-list: a checkpoint of our own runs
        return torch.load(ckpt_path, map_location="cpu", weights_only=False)


def _dicts(obj: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    if isinstance(obj, dict) and depth < 4:
        yield obj
        for v in obj.values():
            yield from _dicts(v, depth + 1)


def checkpoint_lineage(ckpt_path: str | Path) -> dict[str, Any]:
    """``{"dataset", "manifest_version", "exclusion_version", "key_id", "saved"}`` of a .ckpt."""
    path = Path(ckpt_path)
    ckpt = _load(path)
    lineage = dict((ckpt.get("foundation") or {}).get("lineage") or {})
    # the stream state (under the DataModule's key) says what the data loader actually read
    state = next((d for d in _dicts(ckpt) if "exclusion_version" in d and "format" in d), {})

    def first(*names: str) -> Any:
        for source in (lineage, state):
            for n in names:
                if source.get(n) is not None:
                    return source[n]
        return None

    saved = first("saved", "time", "created")
    if saved is None:
        mtime = path.stat().st_mtime
        saved = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "dataset": first("dataset"),
        "manifest_version": first("manifest_version", "version"),
        "exclusion_version": first("exclusion_version", "exclusion_list_version"),
        "key_id": first("key_id"),
        "saved": saved,
    }


def checkpoint_report(
    ckpt_path: str | Path, manifest_path: str | Path, lists: list[ExclusionList]
) -> dict[str, Any]:
    """The checkpoint's data lineage against the dataset's and exclusion lists' current state."""
    lin = checkpoint_lineage(ckpt_path)
    manifest = Manifest.load(manifest_path)
    saved_day = str(lin["saved"])[:10]
    later = [e for lst in lists for e in lst.entries if e.date_received > saved_day]
    current_versions = sorted(lst.version for lst in lists)
    trained = lin["manifest_version"]
    changes = [
        h
        for h in manifest.extra.get("history", [])
        if isinstance(trained, int) and h.get("version", 0) > trained
    ]
    dates = sorted(e.date_received for e in later)
    return {
        "checkpoint": str(ckpt_path),
        "dataset": lin["dataset"],
        "dataset_current": manifest.dataset,
        "trained_on_version": trained,
        "current_version": manifest.version,
        "trained_exclusion_version": lin["exclusion_version"],
        "current_exclusion_version": "+".join(current_versions) or None,
        "exclusion_up_to_date": lin["exclusion_version"]
        in (*current_versions, "+".join(current_versions)),
        "saved": lin["saved"],
        "requests_after": dict(Counter(e.request_type for e in later)),
        "requests_after_total": len(later),
        "requests_after_first": dates[0] if dates else None,
        "requests_after_last": dates[-1] if dates else None,
        "dataset_changes_after": [
            {k: h.get(k) for k in ("version", "action", "time", "samples_removed")} for h in changes
        ],
    }
