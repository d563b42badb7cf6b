"""The options that let a small cohort leave the modality-only plateau: standardised projection
inputs (``proj_norm``), a contrastive loss on an unmasked pass (``contrastive_masked``) and
whole-image 2D crops (``crop_min_scale_2d``)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pretrain import PairDataset, StandInDataModule, collate, tiny_module, trainer

from foundation.data.datamodule import ShardDataModule
from foundation.data.transforms import eval_transform, train_transform
from foundation.training.pretrain import projection


def _mean_off_diagonal_cosine(z: torch.Tensor) -> float:
    z = F.normalize(z, dim=-1)
    sim = z @ z.T
    n = len(z)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def test_batchnorm_projection_removes_the_common_component() -> None:
    # pooled features at init: one large shared vector plus small per-image differences
    g = torch.Generator().manual_seed(0)
    common = 50.0 * F.normalize(torch.randn(1, 48, generator=g), dim=-1)
    feats = common + torch.randn(16, 48, generator=g)
    torch.manual_seed(0)
    plain = projection(48, 32, "none")
    torch.manual_seed(0)
    normed = projection(48, 32, "batchnorm").train()
    with torch.no_grad():
        assert _mean_off_diagonal_cosine(plain(feats)) > 0.95  # every image looks the same
        assert abs(_mean_off_diagonal_cosine(normed(feats))) < 0.2  # told apart
    with pytest.raises(ValueError, match="proj_norm"):
        projection(48, 32, "layernorm")


def test_batchnorm_projection_evaluates_each_image_alone(tmp_path) -> None:
    L.seed_everything(0)
    module = tiny_module(proj_norm="batchnorm")
    trainer(4).fit(module, StandInDataModule())
    module.eval()
    batch = collate([PairDataset(4)[i] for i in range(4)])
    with torch.no_grad():
        together = module.encode_image(batch["image"], batch["modality"])
        alone = module.encode_image(batch["image"][:1], batch["modality"][:1])
        text = module.encode_text(batch["input_ids"], batch["attention_mask"])
    # running statistics at evaluation: an image's embedding does not depend on its batch
    assert torch.allclose(together[:1], alone, atol=1e-5)
    assert torch.isfinite(text).all()
    # the running statistics travel with the weights
    path = tmp_path / "m.pt"
    torch.save(module.state_dict(), path)
    restored = tiny_module(proj_norm="batchnorm")
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    with torch.no_grad():
        again = restored.encode_image(batch["image"], batch["modality"])
    assert torch.allclose(together, again, atol=1e-6)
    assert module.vision_proj[0].num_batches_tracked > 0


@pytest.mark.parametrize("masked", [True, False])
def test_contrastive_reads_the_masked_or_the_whole_image(masked: bool) -> None:
    torch.manual_seed(0)
    module = tiny_module(contrastive_masked=masked)
    batch = collate([PairDataset(4)[i] for i in range(4)])
    losses = module.compute_losses(batch, mask_ratio=0.5)
    with torch.no_grad():
        whole = module.encode_image(batch["image"], batch["modality"])
    assert "loss_mim" in losses  # the masked pass still feeds the MIM decoder
    assert torch.allclose(losses["_img"], whole, atol=1e-5) is not masked


def test_2d_crops_can_keep_the_whole_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 48)).astype(np.float16)
    meta = {"modality": "XR"}
    whole = train_transform(2, (32, 32), flips=False, min_scale_2d=1.0)
    expected = eval_transform(2, (32, 32))(image, meta)
    for seed in range(3):
        whole.set_random_state(seed)
        assert torch.allclose(whole(image, meta)[0], expected, atol=1e-6)
    cropped = train_transform(2, (32, 32), flips=False, min_scale_2d=0.3)
    outs = []
    for seed in range(3):
        cropped.set_random_state(seed)
        outs.append(cropped(image, meta)[0])
    assert not all(torch.allclose(o, expected, atol=1e-3) for o in outs)
    with pytest.raises(ValueError, match="crop_min_scale_2d"):
        ShardDataModule("m.json", crop_min_scale_2d=0.0)
