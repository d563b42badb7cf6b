"""The input a pretrained vision encoder expects: how many channels, which CT windows.

Pretraining decides the channels: with ``data.multi_window`` every CT intensity window of the
data config is a channel (``vision.in_channels == len(windows)``); without it one window is
drawn per sample (``in_channels == 1``). Evaluation and fine-tuning must feed the encoder what
it was pretrained on, so their transform follows the loaded encoder, not a default: its
``in_channels`` chooses all the windows or the first one, and the windows are the ones the
pretraining data module recorded in the checkpoint's lineage (``lineage["ct_windows"]``,
carried into exported encoders too), else ``DEFAULT_CT_WINDOWS`` (checkpoints from before the
record). MR and X-ray images are repeated over the channels, as in pretraining.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from foundation.data.transforms import DEFAULT_CT_WINDOWS, EvalTransform

Windows = tuple[tuple[float, float], ...]
LINEAGE_KEY = "ct_windows"  # lineage entry: the (level, width) HU windows of pretraining


def windows_record(windows: Sequence[Sequence[float]]) -> list[list[float]]:
    """``windows`` as a lineage entry (JSON-able ``[[level, width], ...]``)."""
    return [[float(level), float(width)] for level, width in windows]


def recorded_windows(lineage: Mapping[str, Any] | None, source: str = "encoder") -> Windows | None:
    """The CT windows a checkpoint's lineage records, or None when it records none.

    A malformed record is an error naming ``source`` (not silently the defaults: an encoder
    evaluated through other windows than it learned gives wrong numbers without failing)."""
    value = (lineage or {}).get(LINEAGE_KEY)
    if value is None:
        return None
    try:
        windows = tuple((float(lv), float(wd)) for lv, wd in value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{source}: lineage {LINEAGE_KEY} is not a list of (level, width)"
        ) from err
    if not windows or not all(math.isfinite(lv) and wd > 0 for lv, wd in windows):
        raise ValueError(f"{source}: lineage {LINEAGE_KEY} needs finite levels, widths > 0")
    return windows


def input_windows(
    in_channels: int, lineage: Mapping[str, Any] | None = None, source: str = "encoder"
) -> Windows:
    """The CT windows an encoder of ``in_channels`` input channels is fed, one per channel.

    ``in_channels == len(windows)``: every window of the record (or the defaults); 1: the first
    one only; anything else cannot have come from this data and raises a ValueError naming
    ``source`` (the checkpoint) and the two numbers."""
    windows = recorded_windows(lineage, source) or DEFAULT_CT_WINDOWS
    if in_channels == len(windows):
        return windows
    if in_channels == 1:
        return windows[:1]
    raise ValueError(
        f"{source}: the vision encoder takes in_channels={in_channels}, but its data has "
        f"{len(windows)} CT windows (in_channels must be 1, or {len(windows)} with "
        "data.multi_window)"
    )


def input_lineage(lineage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The entries of ``lineage`` that describe the encoder's input (None when there are none):
    what a randomly initialised copy of an encoder keeps, so it is fed the same inputs."""
    kept = {k: v for k, v in (lineage or {}).items() if k == LINEAGE_KEY}
    return kept or None


def encoder_eval_transform(
    dims: int,
    size: Sequence[int],
    in_channels: int,
    lineage: Mapping[str, Any] | None = None,
    source: str = "encoder",
) -> EvalTransform:
    """The deterministic evaluation transform that gives an encoder of ``in_channels`` channels
    the input it was pretrained on: ``(in_channels, *size)`` float32."""
    windows = input_windows(in_channels, lineage, source)
    return EvalTransform(dims, size, ct_windows=windows, multi_window=len(windows) > 1)
