"""Contrastive losses (single process and gathered over 2 gloo ranks) and the MIM loss."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from foundation.models.vision import VisionConfig, VisionTransformer
from foundation.objectives.contrastive import ClipLoss, SigLipLoss, build_contrastive_loss
from foundation.objectives.masked_image import MaskedImageDecoder

WORLD, LOCAL_B, DIM = 2, 3, 8


def features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(WORLD * LOCAL_B, DIM, generator=g), dim=-1)
    txt = F.normalize(torch.randn(WORLD * LOCAL_B, DIM, generator=g), dim=-1)
    return img, txt


# a modality per pair, spread over both ranks' rows (same-group columns on the other rank too)
GROUPS = torch.tensor([0, 1, 0, 1, 1, 0])


def single_process(kind: str, grouped: bool = False) -> dict[str, torch.Tensor]:
    """Loss and gradients of the concatenated batch, in one process."""
    img, txt = (t.clone().requires_grad_(True) for t in features())
    loss_fn = build_contrastive_loss(kind)
    loss = loss_fn(img, txt, GROUPS if grouped else None)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad}
    out.update({n: p.grad for n, p in loss_fn.named_parameters()})
    return out


def _worker(rank: int, kind: str, grouped: bool, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        img, txt = features()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        img = img[rows].clone().requires_grad_(True)
        txt = txt[rows].clone().requires_grad_(True)
        loss_fn = build_contrastive_loss(kind)
        loss = loss_fn(img, txt, GROUPS[rows] if grouped else None)
        loss.backward()
        out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad}
        out.update({n: p.grad for n, p in loss_fn.named_parameters()})
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("grouped", [False, True], ids=["all-negatives", "same-group"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gathered_loss_and_gradients_match_single_process(kind: str, grouped: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(kind, grouped, init_file, tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]
    ref = single_process(kind, grouped)
    # DDP averages parameter gradients over ranks, so the effective loss is the mean of the
    # per-rank losses and the effective feature gradient of rank r's rows is grad_r / WORLD.
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"], atol=1e-5)
    for name in ("img", "txt"):
        got = torch.cat([r[name] for r in ranks]) / WORLD
        assert torch.allclose(got, ref[name], atol=1e-6), name
    for name in ("logit_scale", "logit_bias"):
        if name in ref:
            got = torch.stack([r[name] for r in ranks]).mean()
            assert torch.allclose(got, ref[name], atol=1e-6), name


def test_clip_loss_matches_the_textbook_formula() -> None:
    img, txt = features(1)
    loss_fn = ClipLoss(init_temperature=0.1)
    logits = 10.0 * img @ txt.T
    labels = torch.arange(len(img))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(loss_fn(img, txt), expected, atol=1e-5)
    # Aligned pairs at a high scale give a loss near zero.
    assert loss_fn(img, img) < F.cross_entropy(logits, labels)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_same_group_negatives_equal_the_losses_of_each_group_alone(kind: str) -> None:
    # Independent computation: each group's pairs as a batch of their own; the grouped loss of
    # the whole batch is their mean weighted by group size (every row counts once).
    img, txt = features(3)
    loss_fn = build_contrastive_loss(kind)
    parts = [torch.nonzero(GROUPS.eq(g)).flatten() for g in GROUPS.unique()]
    expected = sum(len(i) * loss_fn(img[i], txt[i]) for i in parts) / len(GROUPS)
    assert torch.allclose(loss_fn(img, txt, GROUPS), expected, atol=1e-5)
    assert not torch.allclose(loss_fn(img, txt), expected, atol=1e-3)  # the mask does something
    # one group: the same loss as without groups
    assert torch.allclose(loss_fn(img, txt, torch.zeros_like(GROUPS)), loss_fn(img, txt))


def test_extra_negatives_are_columns_nobody_pairs_with() -> None:
    # Independent computation: CLIP with extras = cross-entropy over [batch | extra] columns;
    # SigLIP with extras = the textbook pair sum plus one negative term per (row, extra) pair.
    img, txt = features(4)
    extra_img, extra_txt = features(5)
    b, labels = len(img), torch.arange(len(img))
    clip = ClipLoss(init_temperature=0.1)
    li = 10.0 * torch.cat([img @ txt.T, img @ extra_txt.T], dim=1)
    lt = 10.0 * torch.cat([txt @ img.T, txt @ extra_img.T], dim=1)
    expected = (F.cross_entropy(li, labels) + F.cross_entropy(lt, labels)) / 2
    got = clip(img, txt, None, extra_img, extra_txt)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got > clip(img, txt)  # more negatives, larger InfoNCE
    siglip = SigLipLoss(init_scale=10.0, init_bias=-10.0)
    z = 10.0 * img @ txt.T - 10.0
    sign = 2 * torch.eye(b) - 1
    base = -F.logsigmoid(sign * z).sum()
    extra = -F.logsigmoid(-(10.0 * img @ extra_txt.T - 10.0)).sum()
    extra = extra - F.logsigmoid(-(10.0 * txt @ extra_img.T - 10.0)).sum()
    assert torch.allclose(siglip(img, txt), base / b, atol=1e-5)
    assert torch.allclose(
        siglip(img, txt, None, extra_img, extra_txt), (base + extra) / b, atol=1e-5
    )
    with pytest.raises(ValueError, match="do not combine"):
        clip(img, txt, GROUPS, extra_img, extra_txt)


def test_clip_temperature_is_clamped() -> None:
    loss_fn = ClipLoss()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1000.0))
    assert loss_fn.scale().item() == pytest.approx(100.0)


def test_siglip_prefers_aligned_pairs() -> None:
    img, txt = features(2)
    loss_fn = SigLipLoss()
    assert loss_fn(img, img) < loss_fn(img, txt)
    with pytest.raises(ValueError):
        build_contrastive_loss("triplet")


def test_mim_loss_counts_masked_patches_only() -> None:
    dec = MaskedImageDecoder(encoder_dim=16, patch_size_2d=4, patch_size_3d=4, dim=16, heads=2)
    pred, target = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :4] = True
    base = dec.loss(pred, target, mask)
    visible = target.clone()
    visible[:, 4:] += torch.randn(2, 6, 64)  # change visible patches only
    assert torch.allclose(dec.loss(pred, visible, mask), base)
    hidden = target.clone()
    hidden[:, :4] += torch.randn(2, 4, 64)
    assert not torch.allclose(dec.loss(pred, hidden, mask), base)
    # Per-patch normalised targets: brightness and contrast of a patch do not matter.
    assert torch.allclose(dec.loss(pred, 3.0 * target + 2.0, mask), base, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 1, 16, 16, 16), (2, 1, 32, 32)])
def test_decoder_on_an_encoder_pass(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(VisionConfig.preset("tiny", patch_size_2d=8, patch_size_3d=8))
    dec = MaskedImageDecoder(enc.embed_dim, patch_size_2d=8, patch_size_3d=8, dim=32, heads=2)
    image = torch.rand(shape)
    out = enc(image, torch.zeros(2, dtype=torch.long), mask_ratio=0.5)
    pred = dec.predict(out)
    assert pred.shape == enc.patchify(image).shape
    loss = dec(out, image)
    loss.backward()
    assert torch.isfinite(loss) and enc.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="masked encoder pass"):
        dec(enc(image, torch.zeros(2, dtype=torch.long)), image)
