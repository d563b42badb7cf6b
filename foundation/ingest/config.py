"""Ingest configuration from YAML (``configs/ingest/*.yaml``); every key optional."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from foundation.ingest.pipeline import IngestConfig
from foundation.ingest.preprocess import PreprocessConfig


def ingest_config_from_dict(data: dict[str, Any]) -> IngestConfig:
    """Build an ``IngestConfig``; unknown keys are an error naming them."""
    data = dict(data)
    pre = data.pop("preprocess", None) or {}
    known = {f.name for f in dataclasses.fields(IngestConfig)} - {"preprocess"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown ingest config keys {sorted(unknown)}; known: {sorted(known)}")
    if "part" in data:
        data["part"] = tuple(data["part"])
    return IngestConfig(preprocess=PreprocessConfig.from_dict(pre), **data)


def load_ingest_config(path: str | Path | None) -> IngestConfig:
    """Read ``path`` (YAML); ``None`` gives the defaults."""
    if path is None:
        return IngestConfig()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read ingest config ({err})") from None
    try:
        return ingest_config_from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
