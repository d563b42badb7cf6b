"""The training transform's fast path (crop/flip as views, one conversion) gives exactly what
the MONAI composition it replaced gives for the same seed: augmentation and resume unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Flip, RandScaleCrop, RandSpatialCropSamples, Resize, SpatialPad

from foundation.data.transforms import DEFAULT_CT_WINDOWS, TrainTransform


def _plain(x):
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _reference(t: TrainTransform, image: np.ndarray, modality: str, seed: int) -> list:
    """The previous implementation: MONAI crop samples / scale crop, pad, window, MONAI Flip."""
    R = np.random.RandomState(seed)
    x = torch.from_numpy(np.ascontiguousarray(image))[None]
    if t.dims == 3:
        crop = RandSpatialCropSamples(t.crop_size, num_samples=t.crops_per_volume)
        crop.set_random_state(state=R)
        crops = [SpatialPad(t.crop_size)(c) for c in crop(x)]
    else:
        crop2d = RandScaleCrop(0.4, max_roi_scale=1.0, random_size=True)
        crop2d.set_random_state(state=R)
        resize = Resize(t.crop_size, mode="area")
        crops = [resize(crop2d(x.float())) for _ in range(t.crops_per_volume)]
    t.R = R  # draw the windows with the reference's stream
    out = []
    for c in crops:
        c = _plain(c)
        windows = t._windows()
        if modality == "CT":
            y = torch.empty((len(windows), *c.shape[1:]), dtype=torch.float32)
            for k, (level, width) in enumerate(windows):
                torch.sub(c[0], level - width / 2.0, out=y[k])
                y[k].div_(width).clamp_(0.0, 1.0)
        else:
            y = c.float().clamp_(0.0, 1.0)
            y = y if t.channels == 1 else y.expand(t.channels, *y.shape[1:]).contiguous()
        axes = [a for a in range(t.dims) if R.random_sample() < 0.5]
        out.append(_plain(Flip(spatial_axis=axes)(y) if axes else y).contiguous())
    return out


@pytest.mark.parametrize(
    ("dims", "shape", "crop", "modality", "kw"),
    [
        (3, (40, 36, 20), (16, 16, 8), "CT", {}),
        (3, (40, 36, 20), (16, 16, 8), "CT", {"multi_window": True, "crops_per_volume": 3}),
        (3, (12, 36, 6), (16, 16, 8), "CT", {"crops_per_volume": 2}),  # smaller: zero pad
        (3, (30, 20, 10), (8, 8, 8), "MR", {"multi_window": True}),
        (2, (50, 40), (16, 16), "XR", {"crops_per_volume": 2}),
    ],
)
def test_train_transform_matches_the_monai_composition(dims, shape, crop, modality, kw):
    rng = np.random.default_rng(0)
    if modality == "CT":
        image = rng.integers(-1024, 3071, shape).astype(np.int16)
    else:
        image = rng.random(shape).astype(np.float16)
    t = TrainTransform(dims, crop, ct_windows=DEFAULT_CT_WINDOWS, **kw)
    flipped = 0
    for seed in range(12):
        t.set_random_state(seed)
        got = t(image, {"modality": modality})
        want = _reference(t, image, modality, seed)
        assert len(got) == len(want) == t.crops_per_volume
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32 and g.is_contiguous()
            assert g.shape == (t.channels, *crop) and torch.equal(g, w)
            flipped += int(not torch.equal(g, g.flip(1)))
    assert flipped  # the seeds exercised flips, not only identity


def test_train_transform_reads_only_the_crop():
    """A read-only stored array works (views only) and the input is left untouched."""
    image = np.arange(20 * 20 * 10, dtype=np.int16).reshape(20, 20, 10)
    image.setflags(write=False)
    t = TrainTransform(3, (8, 8, 4))
    t.set_random_state(3)
    (out,) = t(image, {"modality": "CT"})
    assert out.shape == (1, 8, 8, 4) and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(image, np.arange(20 * 20 * 10, dtype=np.int16).reshape(20, 20, 10))
