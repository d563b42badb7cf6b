"""Canonical geometry and intensity, once, at ingest (MONAI array transforms).

3D (CT, MR): ``Orientation(axcodes="RAS")`` then ``Spacing`` to the modality's target spacing
on a ``MetaTensor`` that carries the affine. 2D (radiographs, and single CT/MR slices kept as
2D): ``Resize`` of the longest side to ``longest_side_2d``, aspect kept.
Intensity (the shard contract): CT stays in HU, rounded, clipped to ``hu_range``, int16; MR and
X-ray are mapped to [0, 1] between robust percentiles and stored as float16.

The returned meta records the policy applied and ``PREPROCESS_VERSION``; bump the version
whenever a change here would change the bytes written for the same input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Resize, ScaleIntensityRange, Spacing

from foundation.ingest.volume import Volume
from foundation.sample import MODALITIES

PREPROCESS_VERSION = "1"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's convention, pinned explicitly


@dataclass
class PreprocessConfig:
    """Target geometry and intensity policy. Build from YAML with ``from_dict``.

    Defaults suit pretraining (1.5 mm isotropic keeps a chest CT near 256^3); the demo and CI
    set coarser spacings and a smaller ``longest_side_2d`` to stay fast.
    """

    ct_spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # mm, (X, Y, Z) in RAS
    mr_spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    longest_side_2d: int = 512  # pixels; radiographs and 2D CT/MR slices
    hu_range: tuple[float, float] = (-1024.0, 3071.0)  # CT clip, kept in HU as int16
    percentiles: tuple[float, float] = (0.5, 99.5)  # MR/XR robust range mapped to [0, 1]
    interpolation: str = "bilinear"  # MONAI mode for Spacing and Resize

    def __post_init__(self) -> None:
        self.ct_spacing = _positive_tuple(self.ct_spacing, 3, "ct_spacing")
        self.mr_spacing = _positive_tuple(self.mr_spacing, 3, "mr_spacing")
        self.hu_range = tuple(float(v) for v in self.hu_range)  # type: ignore[assignment]
        self.percentiles = tuple(float(v) for v in self.percentiles)  # type: ignore[assignment]
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if not -32768 <= self.hu_range[0] < self.hu_range[1] <= 32767:
            raise ValueError("hu_range must be an increasing pair inside int16")
        if int(self.longest_side_2d) < 8:
            raise ValueError("longest_side_2d must be at least 8 pixels")
        self.longest_side_2d = int(self.longest_side_2d)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PreprocessConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocess config fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the version, for the manifest."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"version": PREPROCESS_VERSION, **d}

    def target_spacing(self, modality: str) -> tuple[float, float, float]:
        if modality == "CT":
            return self.ct_spacing
        if modality == "MR":
            return self.mr_spacing
        raise ValueError(f"no 3D target spacing for modality {modality}")

    def intensity_policy(self, modality: str) -> dict[str, Any]:
        """The intensity rule of a modality, as recorded in each sample's meta."""
        if modality == "CT":
            return {"kind": "hu_clip", "range": list(self.hu_range), "dtype": "int16"}
        return {"kind": "percentile", "percentiles": list(self.percentiles), "dtype": "float16"}


def _positive_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in value)
    if len(out) != n or min(out) <= 0:
        raise ValueError(f"{name} must be {n} positive numbers")
    return out


def _resample_3d(
    volume: Volume, pixdim: tuple[float, ...], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) + affine -> RAS-oriented, resampled (X', Y', Z') float32 and its affine."""
    array = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
    img = MetaTensor(
        array[None],  # (1, X, Y, Z): channel first
        affine=torch.as_tensor(volume.affine, dtype=torch.float64),
    )
    img = Orientation(axcodes="RAS", labels=RAS_LABELS)(img)
    img = Spacing(pixdim=pixdim, mode=mode, padding_mode="border", dtype=torch.float32)(img)
    return img.array[0], np.asarray(img.affine, dtype=np.float64)


def _resize_2d(array: np.ndarray, longest: int, mode: str) -> np.ndarray:
    """(H, W) -> (H', W') with max(H', W') == longest, aspect kept, anti-aliased when shrinking."""
    resize = Resize(spatial_size=longest, size_mode="longest", mode=mode, anti_aliasing=True)
    out = resize(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None])
    return np.asarray(out[0], dtype=np.float32)


def _intensity(array: np.ndarray, policy: dict[str, Any]) -> np.ndarray:
    array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    if policy["kind"] == "hu_clip":
        lo, hi = policy["range"]
        return np.clip(np.rint(array), lo, hi).astype(np.int16)
    lo, hi = policy["percentiles"]
    a_min, a_max = np.percentile(array, [lo, hi])
    if a_max <= a_min:  # constant image: nothing to normalise, all zeros
        return np.zeros(array.shape, dtype=np.float16)
    scale = ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(array), dtype=np.float32).astype(np.float16)


def preprocess(volume: Volume, config: PreprocessConfig | None = None) -> tuple[np.ndarray, dict]:
    """Canonical array and meta for one volume (see the module docstring for the policy).

    Returns ``(array, meta)``; meta holds ``modality`` ("CT"|"MR"|"XR"), ``source_modality``,
    ``source_format``, ``dims``, ``spacing`` (mm per array axis), ``shape``, ``orientation``
    ("RAS" for 3D, ``None`` for 2D) and ``preprocessing`` (``{"version", "policy"}``).
    Raises ``ValueError`` naming the source file if the volume cannot be made canonical.
    """
    config = config or PreprocessConfig()
    modality = volume.canonical_modality
    if modality not in MODALITIES:
        raise ValueError(f"{volume.source}: modality {modality} is not one of {MODALITIES}")
    policy: dict[str, Any] = {"intensity": config.intensity_policy(modality)}
    if volume.dims == 3:
        if modality == "XR":
            raise ValueError(f"{volume.source}: a 3D X-ray volume is not supported")
        pixdim = config.target_spacing(modality)
        array, affine = _resample_3d(volume, pixdim, config.interpolation)
        axcodes = "".join(nib.aff2axcodes(affine))
        if axcodes != "RAS":  # Orientation guarantees it; a failure here is a bug, not data
            raise ValueError(f"{volume.source}: resampled orientation is {axcodes}, not RAS")
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        orientation: str | None = "RAS"
        policy.update(spacing=list(pixdim), interpolation=config.interpolation)
    else:
        array = _resize_2d(volume.array, config.longest_side_2d, config.interpolation)
        scale = np.asarray(volume.array.shape, dtype=np.float64) / np.asarray(array.shape)
        spacing = tuple(float(s * f) for s, f in zip(volume.spacing, scale, strict=True))
        orientation = None
        policy.update(longest_side=config.longest_side_2d, interpolation=config.interpolation)
    if min(array.shape) < 1:
        raise ValueError(f"{volume.source}: preprocessing produced an empty array")
    out = _intensity(array, policy["intensity"])
    meta = {
        "modality": modality,
        "source_modality": volume.modality,
        "source_format": volume.source_format,
        "dims": out.ndim,
        "spacing": [round(s, 6) for s in spacing],
        "shape": list(out.shape),
        "orientation": orientation,
        "preprocessing": {"version": PREPROCESS_VERSION, "policy": policy},
    }
    return out, meta
