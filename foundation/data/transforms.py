"""Image transforms between a decoded shard array and the model: MONAI, array versions.

Input: the stored array (3D ``(X, Y, Z)`` RAS, 2D ``(H, W)``; CT int16 HU, MR/XR float16 in
[0, 1]) and its meta. Output: float32 ``(C, *size)`` roughly in [0, 1], where CT went through an
intensity window. ``C`` is the same for every modality (1, or one per CT window with
``multi_window``; MR/XR are repeated) so 2D or 3D batches can mix modalities.

Training crops before it converts or windows: the 3D crop is a view of the stored array (the
crop box drawn by MONAI's ``get_random_patch``, as ``RandSpatialCropSamples`` draws it), or,
when the stream passes a volume read by boxes (``foundation.shards.npy_slab``), only that box
read from the shard (the same boxes, the same values); flipped as a view too, and one pass
converts it to float32 while subtracting the window's low end; on a 512x512x160 CT only the
crop is touched (MONAI's crop/flip transforms on a ``MetaTensor`` cost more than the arithmetic
here). Randomness comes from one ``RandomState`` shared by the sub-transforms;
``set_random_state(seed)`` makes a sample's augmentation a function of its seed alone, which the
stream uses for exact resume (seed = hash of seed, epoch, key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import get_random_patch, get_valid_patch_size
from monai.transforms import RandScaleCrop, Resize, ResizeWithPadOrCrop, SpatialPad

# (level, width) in HU: mediastinum (soft tissue), lung, bone. The first is the eval default.
DEFAULT_CT_WINDOWS: tuple[tuple[float, float], ...] = (
    (40.0, 400.0),
    (-600.0, 1500.0),
    (400.0, 1800.0),
)
LEVEL_JITTER = 0.1  # level moves by up to +-10% of the width
WIDTH_JITTER = (0.8, 1.25)  # width scaled by a factor in this range


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MONAI returns MetaTensor; its metadata is not needed past this point)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _intensity(
    x: torch.Tensor, modality: str, windows: Sequence[tuple[float, float]], channels: int
) -> torch.Tensor:
    """(1, *S) -> (channels, *S) float32 in [0, 1].

    CT: one channel per window ``level +- width/2``, clipped. Written as in-place ops into one
    preallocated output (MONAI's ScaleIntensityRange allocates a volume per arithmetic step:
    5x slower on a 128x128x64 crop; same result)."""
    return _intensity_np(x[0].numpy(), modality, windows, channels)


def _intensity_np(
    x: np.ndarray, modality: str, windows: Sequence[tuple[float, float]], channels: int
) -> torch.Tensor:
    """``_intensity`` of a stored-dtype array ``(*S)``, which may be a strided view (a crop,
    flipped by negative strides): the conversion to float32 is the only copy."""
    if modality == "CT":
        out = torch.empty((len(windows), *x.shape), dtype=torch.float32)
        o = out.numpy()
        for c, (level, width) in enumerate(windows):
            # int16 -> float32 minus the low end, in float32 as torch.sub computed it
            np.subtract(x, np.float32(level - width / 2.0), out=o[c], dtype=np.float32)
            out[c].div_(width).clamp_(0.0, 1.0)  # torch: the same rounding as before
        return out
    out = torch.empty((1, *x.shape), dtype=torch.float32)
    out.numpy()[0] = x
    out.clamp_(0.0, 1.0)
    return out if channels == 1 else out.expand(channels, *x.shape).contiguous()


class TrainTransform:
    """Random crop(s) to the training size, flips, random CT window(s)."""

    def __init__(
        self,
        dims: int,
        crop_size: Sequence[int],
        *,
        ct_windows: Sequence[tuple[float, float]] = DEFAULT_CT_WINDOWS,
        multi_window: bool = False,
        flips: bool = True,
        crops_per_volume: int = 1,
        min_scale_2d: float = 0.4,
    ) -> None:
        if dims not in (2, 3) or len(crop_size) != dims:
            raise ValueError(f"crop_size {tuple(crop_size)} does not match dims={dims}")
        self.dims = dims
        self.crop_size = tuple(int(s) for s in crop_size)
        self.ct_windows = tuple((float(lv), float(wd)) for lv, wd in ct_windows)
        self.multi_window = multi_window
        self.channels = len(self.ct_windows) if multi_window else 1
        self.crops_per_volume = crops_per_volume
        if dims == 3:  # fixed-size crops of the volume (padded where it is smaller)
            self.pad = SpatialPad(self.crop_size)
        else:  # RandomResizedCrop analogue: an area fraction in [min_scale, 1], resized
            self.crop2d = RandScaleCrop(min_scale_2d, max_roi_scale=1.0, random_size=True)
            self.resize = Resize(self.crop_size, mode="area")
        self.flips = flips
        self.R = np.random.RandomState()
        self.set_random_state(None)

    def set_random_state(self, seed: int | None) -> None:
        """Reseed every random sub-transform from one stream (deterministic augmentation)."""
        self.R = np.random.RandomState(None if seed is None else seed % (2**32))
        if hasattr(self, "crop2d"):
            self.crop2d.set_random_state(state=self.R)

    def _windows(self) -> list[tuple[float, float]]:
        chosen = (
            self.ct_windows
            if self.multi_window
            else [self.ct_windows[self.R.randint(len(self.ct_windows))]]
        )
        out = []
        for lv, wd in chosen:
            w = wd * self.R.uniform(*WIDTH_JITTER)
            out.append((lv + self.R.uniform(-LEVEL_JITTER, LEVEL_JITTER) * wd, w))
        return out

    def _flip_axes(self) -> list[int]:
        """Each spatial axis flipped with probability 1/2."""
        if not self.flips:
            return []
        return [a for a in range(self.dims) if self.R.random_sample() < 0.5]

    @property
    def reads_boxes(self) -> bool:
        """3D takes a volume read by boxes (``NpyVolume``: only the crops are read) as well as
        an array; 2D needs the array."""
        return self.dims == 3

    def __call__(self, image: np.ndarray | Any, meta: dict[str, Any]) -> list[torch.Tensor]:
        """Stored array (or, 3D, a volume read by boxes) -> ``crops_per_volume`` tensors
        ``(C, *crop_size)`` float32 (3D); 2D gives ``crops_per_volume`` crops too."""
        if image.ndim != self.dims:
            raise ValueError(f"expected a {self.dims}D image, got shape {image.shape}")
        modality = meta.get("modality", "CT")
        if self.dims == 2:
            x = torch.from_numpy(np.ascontiguousarray(image))[None]  # (1, H, W), stored dtype
            # every crop drawn first, then per crop its window(s) and flips (the draw order
            # fixes the augmentation of a seed); crop in the stored dtype, then float
            crops = [self.crop2d(x) for _ in range(self.crops_per_volume)]
            out = []
            for c in crops:
                c = _plain(self.resize(_plain(c).float()))
                c = _intensity(c, modality, self._windows(), self.channels)
                axes = self._flip_axes()
                out.append(torch.flip(c, [a + 1 for a in axes]) if axes else c)
            return out
        # 3D: every crop box is drawn first (as RandSpatialCropSamples did), then per crop its
        # window(s) and flips: the same draws from self.R, so the same augmentation per seed.
        size = get_valid_patch_size(image.shape, self.crop_size)
        boxes = [get_random_patch(image.shape, size, self.R) for _ in range(self.crops_per_volume)]
        # a volume read by boxes (NpyVolume) reads only these; an array gives views
        views = (
            image.read_boxes(boxes) if hasattr(image, "read_boxes") else [image[b] for b in boxes]
        )
        out = []
        for view in views:  # (X', Y', Z'), stored dtype
            windows = self._windows()
            axes = self._flip_axes()
            if size != self.crop_size:  # volume smaller than the crop: MONAI's zero pad
                padded = self.pad(torch.from_numpy(np.ascontiguousarray(view))[None])
                view = _plain(padded)[0].numpy()
            if axes:  # a flipped view: the conversion below makes the one copy
                view = view[
                    tuple(slice(None, None, -1) if a in axes else slice(None) for a in range(3))
                ]
            out.append(_intensity_np(view, modality, windows, self.channels))
        return out


class EvalTransform:
    """Deterministic: 3D centre crop/pad to ``size``; 2D resize to ``size``; fixed CT window(s)."""

    def __init__(
        self,
        dims: int,
        size: Sequence[int],
        *,
        ct_windows: Sequence[tuple[float, float]] = DEFAULT_CT_WINDOWS,
        multi_window: bool = False,
    ) -> None:
        if dims not in (2, 3) or len(size) != dims:
            raise ValueError(f"size {tuple(size)} does not match dims={dims}")
        self.dims = dims
        self.size = tuple(int(s) for s in size)
        windows = tuple((float(lv), float(wd)) for lv, wd in ct_windows)
        self.windows = windows if multi_window else windows[:1]
        self.channels = len(self.windows)
        self.spatial = (
            ResizeWithPadOrCrop(self.size) if dims == 3 else Resize(self.size, mode="area")
        )

    def __call__(self, image: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
        """Stored array -> ``(C, *size)`` float32."""
        if image.ndim != self.dims:
            raise ValueError(f"expected a {self.dims}D image, got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image))[None]
        x = _plain(self.spatial(x if self.dims == 3 else x.float()))
        return _intensity(x, meta.get("modality", "CT"), self.windows, self.channels)


def train_transform(
    dims: int,
    crop_size: tuple[int, ...],
    *,
    ct_windows: Sequence[tuple[float, float]] = DEFAULT_CT_WINDOWS,
    multi_window: bool = False,
    flips: bool = True,
    crops_per_volume: int = 1,
    min_scale_2d: float = 0.4,
) -> Callable[[np.ndarray, dict], list[torch.Tensor]]:
    """Training augmentation (see ``TrainTransform``)."""
    return TrainTransform(
        dims,
        crop_size,
        ct_windows=ct_windows,
        multi_window=multi_window,
        flips=flips,
        crops_per_volume=crops_per_volume,
        min_scale_2d=min_scale_2d,
    )


def eval_transform(
    dims: int,
    size: tuple[int, ...],
    *,
    ct_windows: Sequence[tuple[float, float]] = DEFAULT_CT_WINDOWS,
    multi_window: bool = False,
) -> Callable[[np.ndarray, dict], torch.Tensor]:
    """Deterministic evaluation transform (see ``EvalTransform``)."""
    return EvalTransform(dims, size, ct_windows=ct_windows, multi_window=multi_window)
