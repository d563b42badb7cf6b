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
from foundation.models.projection import Projection


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
    plain = Projection(48, 32, "none")
    torch.manual_seed(0)
    normed = Projection(48, 32, "batchnorm").train()
    with torch.no_grad():
        assert _mean_off_diagonal_cosine(plain(feats)) > 0.95  # every image looks the same
        assert abs(_mean_off_diagonal_cosine(normed(feats, 2))) < 0.2  # told apart
    with pytest.raises(ValueError, match="proj_norm"):
        Projection(48, 32, "layernorm")
    with pytest.raises(ValueError, match="dimensionality"):
        normed(feats)  # which statistics: a 2D or a 3D batch's?


def test_plain_projection_is_the_bias_free_linear_map() -> None:
    # same parameter name and initialisation as nn.Linear(bias=False): older checkpoints and
    # seeded runs of the plain projection are unchanged
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32, bias=False)
    torch.manual_seed(0)
    plain = Projection(48, 32, "none")
    assert list(plain.state_dict()) == ["weight"]
    assert torch.equal(plain.weight, linear.weight)
    x = torch.randn(5, 48)
    assert torch.equal(plain(x, 3), linear(x))


def test_each_dimensionality_keeps_its_own_statistics() -> None:
    # Batches are all 2D or all 3D, so training standardises a radiograph's features with a 2D
    # batch's statistics and a CT's with a 3D batch's. Evaluation must compute that same
    # function: with the running statistics of its own dimensionality it does; with one shared
    # set (the mixture of both kinds of batches) it does not.
    g = torch.Generator().manual_seed(0)
    batch_2d = lambda n=64: 4.0 + torch.randn(n, 48, generator=g)  # noqa: E731
    batch_3d = lambda n=64: -4.0 + 3.0 * torch.randn(n, 48, generator=g)  # noqa: E731
    proj = Projection(48, 32, "batchnorm").train()
    shared = torch.nn.BatchNorm1d(48, affine=False).train()
    with torch.no_grad():
        for _ in range(200):  # alternate, as a run with data.ratio_3d near 0.5 does
            for dims, x in ((2, batch_2d()), (3, batch_3d())):
                proj(x, dims)
                shared(x)
        x2, x3 = batch_2d(1024), batch_3d(1024)  # large: batch statistics near the true ones
        trained_2d, trained_3d = proj(x2, 2), proj(x3, 3)  # batch statistics: as in training
        proj.eval(), shared.eval()
        for x, dims, trained in ((x2, 2, trained_2d), (x3, 3, trained_3d)):
            evaluated = proj(x, dims)
            mixed = F.linear(shared(x), proj.weight)
            err = (evaluated - trained).norm() / trained.norm()
            err_mixed = (mixed - trained).norm() / trained.norm()
            assert err < 0.1 and err_mixed > 1.0, (dims, float(err), float(err_mixed))
    assert torch.allclose(proj.norms["2d"].running_mean, torch.full((48,), 4.0), atol=0.3)
    assert torch.allclose(proj.norms["3d"].running_mean, torch.full((48,), -4.0), atol=0.5)


def test_a_checkpoint_with_one_set_of_statistics_still_loads() -> None:
    # before per-dimensionality statistics: nn.Sequential(BatchNorm1d, Linear)
    torch.manual_seed(0)
    old = torch.nn.Sequential(
        torch.nn.BatchNorm1d(48, affine=False), torch.nn.Linear(48, 32, bias=False)
    )
    with torch.no_grad():
        old.train()(3.0 + torch.randn(16, 48))
    new = Projection(48, 32, "batchnorm")
    new.load_state_dict(old.state_dict())  # strict: every key mapped, none left over
    old.eval(), new.eval()
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert torch.allclose(new(x, 2), old(x)) and torch.allclose(new(x, 3), old(x))


def test_batchnorm_projection_evaluates_each_image_alone(tmp_path) -> None:
    L.seed_everything(0)
    module = tiny_module(proj_norm="batchnorm")
    trainer(4).fit(module, StandInDataModule())
    module.eval()
    batch = collate([PairDataset(4)[i] for i in range(4)])
    with torch.no_grad():
        together = module.encode_image(batch["image"], batch["modality"])
        alone = module.encode_image(batch["image"][:1], batch["modality"][:1])
        text = module.encode_text(batch["input_ids"], batch["attention_mask"], 3)
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
    # the stand-in batches are 3D: the 3D statistics moved, the 2D ones were never used
    assert module.vision_proj.norms["3d"].num_batches_tracked > 0
    assert module.vision_proj.norms["2d"].num_batches_tracked == 0


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
