"""The 2D/3D vision trunk: shared parameters, masking, crop sizes, patch order, checkpointing."""

from __future__ import annotations

import pytest
import torch

from foundation.models.vision import (
    VisionConfig,
    VisionTransformer,
    patchify,
    sincos_pos_embed,
)


def tiny(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = VisionConfig.preset("tiny", patch_size_2d=8, patch_size_3d=8, **overrides)
    return VisionTransformer(cfg)


def test_presets_and_from_any() -> None:
    t = VisionConfig.preset("tiny")
    assert 64 <= t.dim <= 96 and 2 <= t.depth <= 4 and 2 <= t.heads <= 4
    assert VisionConfig.preset("base").dim == 768
    assert VisionConfig.from_any({"preset": "tiny", "in_channels": 3}).in_channels == 3
    with pytest.raises(ValueError, match="unknown vision config"):
        VisionConfig.from_any({"dimm": 3})
    with pytest.raises(ValueError, match="preset"):
        VisionConfig.preset("huge")


def test_2d_and_3d_share_the_trunk() -> None:
    model = tiny()
    mod = torch.tensor([0, 2])
    out3 = model(torch.rand(2, 1, 16, 16, 24), mod)
    assert out3.grid == (2, 2, 3) and out3.tokens.shape == (2, 1 + 12, model.embed_dim)
    out3.pooled.sum().backward()
    trunk = model.blocks[0].attn.qkv.weight
    g3 = trunk.grad.clone()
    assert model.patch_embed_3d.weight.grad is not None
    assert model.patch_embed_2d.weight.grad is None  # the 2D stem played no part
    model.zero_grad(set_to_none=True)

    out2 = model(torch.rand(2, 1, 32, 24), mod)
    assert out2.grid == (4, 3) and out2.patch_size == (8, 8)
    out2.pooled.sum().backward()
    assert model.patch_embed_3d.weight.grad is None
    assert model.patch_embed_2d.weight.grad.abs().sum() > 0
    assert trunk.grad.abs().sum() > 0 and not torch.allclose(trunk.grad, g3)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_the_requested_share(ratio: float) -> None:
    model = tiny()
    out = model(torch.rand(3, 1, 32, 32, 32), torch.zeros(3, dtype=torch.long), mask_ratio=ratio)
    n = 4 * 4 * 4
    keep = max(1, int(n * (1 - ratio)))
    assert out.tokens.shape[1] == 1 + keep
    if ratio == 0:
        assert out.mask is None and out.ids_restore is None
        return
    assert out.mask.shape == (3, n)
    assert (out.mask.sum(dim=1) == n - keep).all()
    assert not torch.equal(out.mask[0], out.mask[1])  # one permutation per sample


def test_mask_generator_is_reproducible() -> None:
    model = tiny()
    x, m = torch.rand(2, 1, 16, 16, 16), torch.zeros(2, dtype=torch.long)
    a = model(x, m, 0.5, generator=torch.Generator().manual_seed(3))
    b = model(x, m, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.mask, b.mask) and torch.allclose(a.tokens, b.tokens)


def test_runs_at_another_crop_size() -> None:
    model = tiny().eval()
    mod = torch.tensor([1])
    for shape in [(1, 1, 16, 16, 16), (1, 1, 48, 32, 16), (1, 1, 64, 64), (1, 1, 24, 40)]:
        out = model(torch.rand(shape), mod)
        assert out.pooled.shape == (1, model.embed_dim)
        assert torch.isfinite(out.tokens).all()
    with pytest.raises(ValueError, match="not a multiple of patch"):
        model(torch.rand(1, 1, 20, 16, 16), mod)
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 3, 16, 16, 16), mod)


def test_modality_changes_the_embedding() -> None:
    model = tiny().eval()
    x = torch.rand(1, 1, 16, 16, 16).expand(2, -1, -1, -1, -1)
    out = model(x, torch.tensor([0, 1]))
    assert not torch.allclose(out.pooled[0], out.pooled[1])


def test_sincos_positions_are_distinct_and_bounded() -> None:
    emb = sincos_pos_embed((3, 4, 5), 64)
    assert emb.shape == (60, 64)
    assert emb.abs().max() <= 1.0
    assert torch.cdist(emb, emb).add(torch.eye(60)).min() > 0  # every position differs
    # A larger grid extends a smaller one: index (i, j, k) means the same everywhere.
    big = sincos_pos_embed((6, 4, 5), 64)
    assert torch.allclose(big[:60], emb)


@pytest.mark.parametrize("shape", [(2, 3, 16, 24, 8), (2, 3, 16, 24)])
def test_patchify_matches_the_patch_embedding_order(shape: tuple[int, ...]) -> None:
    # A patch embedding whose only output channel averages its patch must equal the mean of
    # each patchified row, in the same token order.
    model = tiny(in_channels=3)
    image = torch.rand(shape)
    conv = model.patch_embed_2d if len(shape) == 4 else model.patch_embed_3d
    with torch.no_grad():
        conv.weight.fill_(1.0 / conv.weight[0].numel())
        conv.bias.zero_()
        tokens = conv(image).flatten(2).transpose(1, 2)[..., 0]  # (B, N)
    patches = model.patchify(image)
    assert patches.shape[-1] == 3 * conv.weight[0, 0].numel()
    assert torch.allclose(patches.mean(-1), tokens, atol=1e-6)
    assert torch.equal(patches, patchify(image, model.patch_size_for(len(shape) - 2)))


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    x, m = torch.rand(2, 1, 16, 16, 16), torch.tensor([0, 1])
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt).train()
        model(x, m).pooled.square().sum().backward()
        grads.append(model.blocks[0].mlp[0].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_mean_pool_is_the_mean_of_the_kept_patch_tokens():
    from foundation.models.vision import VisionConfig, VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(VisionConfig(dim=32, depth=1, heads=2, pool="mean")).eval()
    image, modality = torch.rand(2, 1, 32, 32), torch.tensor([2, 2])
    out = model(image, modality)
    assert torch.allclose(out.pooled, out.tokens[:, 1:].mean(dim=1))
    masked = model(image, modality, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert masked.tokens.shape[1] == 1 + 2  # CLS + half of the 4 patches
    assert torch.allclose(masked.pooled, masked.tokens[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(VisionConfig(dim=32, depth=1, heads=2, pool="max"))
