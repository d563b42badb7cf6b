"""``cross_dims_negatives``: a batch's contrastive loss also ranks against the last batch of the
other dimensionality (batches are all 2D or all 3D, retrieval mixes them)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_pretrain import PairDataset, StepDataModule, collate, tiny_module

from foundation.training.held_negatives import HELD_NEGATIVES, HELD_NEGATIVES_BY_RANK, load_held


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


def _ddp_fit(module, steps: int, root, ckpt_path=None, callbacks=()) -> None:
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    ).fit(module, datamodule=StepDataModule(mixed=True), ckpt_path=ckpt_path)


@pytest.mark.slow
def test_a_ddp_resume_gives_each_rank_its_own_held_batches(tmp_path) -> None:
    # Two ranks read different batches, so they hold different negatives. The checkpoint must
    # carry both: a resume on two ranks then ends where an uninterrupted run ends.
    options = {"proj_norm": "batchnorm", "cross_dims_negatives": True,
               "contrastive_masked": False, "max_steps": 8}  # fmt: skip
    L.seed_everything(0)
    straight = tiny_module(**options)
    _ddp_fit(straight, 8, tmp_path / "straight")
    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="half", every_n_train_steps=4)
    _ddp_fit(tiny_module(**options), 4, tmp_path / "half", callbacks=[saver])

    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=True)
    by_rank = ckpt[HELD_NEGATIVES_BY_RANK]
    assert len(by_rank) == 2 and set(by_rank[0]) == set(by_rank[1]) == {"2", "3"}
    for d in ("2", "3"):
        assert not torch.equal(by_rank[0][d][0], by_rank[1][d][0])
    assert torch.equal(ckpt[HELD_NEGATIVES]["3"][1], by_rank[0]["3"][1])  # the 1-rank entry

    def resumed_from(path):
        L.seed_everything(1)  # other initial weights: everything must come from the checkpoint
        module = tiny_module(**options)
        _ddp_fit(module, 8, tmp_path / path.stem, ckpt_path=path)
        return {k: v.detach() for k, v in module.state_dict().items()}

    a = {k: v.detach() for k, v in straight.state_dict().items()}
    b = resumed_from(tmp_path / "half.ckpt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # a checkpoint holding rank 0's batches only (as written before) resumes both ranks with
    # them: rank 1 ranks against other negatives and the run ends elsewhere
    del ckpt[HELD_NEGATIVES_BY_RANK]
    torch.save(ckpt, tmp_path / "rank0.ckpt")
    c = resumed_from(tmp_path / "rank0.ckpt")
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_held_batches_of_another_world_size_are_shared_out_with_a_warning() -> None:
    pair = [torch.zeros(2, 4), torch.ones(2, 4)]
    written = {HELD_NEGATIVES_BY_RANK: [{"3": pair}, {"3": [p + 5 for p in pair]}]}
    with pytest.warns(UserWarning, match="of 2 ranks and this run has 1"):
        held = load_held(written)
    assert torch.equal(held[3][1], pair[1])  # rank 0 takes rank 0's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading weights to evaluate or export: no warning
        assert torch.equal(load_held(written, resuming=False)[3][0], pair[0])
    assert load_held({}) == {}
    one = {HELD_NEGATIVES: {"2": pair}}
    assert torch.equal(load_held(one)[2][0], pair[0])  # single-process checkpoints load as before
