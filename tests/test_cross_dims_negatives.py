"""``cross_dims_negatives``: a batch's contrastive loss also ranks against the last batch of the
other dimensionality (batches are all 2D or all 3D, retrieval mixes them)."""

from __future__ import annotations

import pytest
import torch
from test_pretrain import PairDataset, collate, tiny_module


def _batch(dims: int) -> dict:
    side = 32 if dims == 2 else 16
    return collate([PairDataset(4, dims=dims, side=side)[i] for i in range(4)])


def test_the_other_dimensionality_joins_as_negatives() -> None:
    torch.manual_seed(0)
    module = tiny_module(cross_dims_negatives=True, mask_ratio=0.0).train()
    first = module.compute_losses(_batch(2), mask_ratio=0.0)  # nothing of 3D held yet
    plain_2d = module.contrastive(first["_img"], first["_txt"])
    assert torch.allclose(first["loss_contrastive"], plain_2d, atol=1e-6)
    ct = module.compute_losses(_batch(3), mask_ratio=0.0)
    # independent computation: the 2D batch's embeddings as extra columns of the 3D batch's loss
    expected = module.contrastive(ct["_img"], ct["_txt"], None, first["_img"], first["_txt"])
    assert torch.allclose(ct["loss_contrastive"], expected, atol=1e-6)
    assert ct["loss_contrastive"] > module.contrastive(ct["_img"], ct["_txt"])
    # detached: the held batch's graph is gone, the gradient reaches this batch's towers only
    ct["loss"].backward()
    assert module.vision.patch_embed_3d.weight.grad.abs().sum() > 0
    assert not any(v.requires_grad for pair in module._last_batch_of.values() for v in pair)
    # evaluation neither reads nor updates what training holds
    module.eval()
    with torch.no_grad():
        val = module.compute_losses(_batch(3), mask_ratio=0.0)
    assert torch.allclose(val["loss_contrastive"], module.contrastive(val["_img"], val["_txt"]))
    assert torch.equal(module._last_batch_of[3][0], ct["_img"])
    assert torch.equal(module._last_batch_of[2][1], first["_txt"])


def test_off_by_default_and_outside_the_state_dict() -> None:
    torch.manual_seed(0)
    module = tiny_module(mask_ratio=0.0).train()
    module.compute_losses(_batch(2), mask_ratio=0.0)
    ct = module.compute_losses(_batch(3), mask_ratio=0.0)
    assert torch.allclose(ct["loss_contrastive"], module.contrastive(ct["_img"], ct["_txt"]))
    assert module._last_batch_of == {}
    on = tiny_module(cross_dims_negatives=True, mask_ratio=0.0).train()
    on.compute_losses(_batch(2), mask_ratio=0.0)
    assert on._last_batch_of and list(on.state_dict()) == list(module.state_dict())
    with pytest.raises(ValueError, match="cross_dims_negatives"):
        tiny_module(cross_dims_negatives=True, negatives="same_modality")


def test_the_checkpoint_entry_holds_embeddings_only(tmp_path) -> None:
    # privacy: what the checkpoint carries for resume is numbers, never a key, study or patient
    torch.manual_seed(0)
    module = tiny_module(cross_dims_negatives=True, mask_ratio=0.0).train()
    batch = _batch(2)
    module.compute_losses(batch, mask_ratio=0.0)
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    held = ckpt["cross_dims_negatives"]
    assert set(held) == {"2"}
    for tensor in held["2"]:
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tensor.shape == (len(batch["key"]), 32)
    path = tmp_path / "c.pt"
    torch.save(ckpt, path)
    raw = path.read_bytes()
    assert not any(s.encode() in raw for s in [*batch["key"], *batch["patient"]])
