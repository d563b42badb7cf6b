"""A tiny PretrainModule under ``TransformerFSDPStrategy`` on CPU (gloo); run by test_fsdp.py.

``python tests/fsdp_worker.py OUT --devices N --steps S [--resume CKPT]``: trains to step S on
N processes (Lightning starts the other ranks by re-running this script), writes the sharded
checkpoint ``OUT/step=S.ckpt`` (a folder), the full parameters ``OUT/params-S.pt`` and what
rank 0 saw of the wrapping in ``OUT/report-S.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from test_pretrain import StepDataModule, tiny_module
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from foundation.training.cluster import TransformerFSDPStrategy, transformer_block_classes


def full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters (collective: every rank calls it; all get the full tensors)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    return {k: v.clone() for k, v in get_model_state_dict(module, options=options).items()}


class Report(L.Callback):
    """Wrapping facts after setup, the restored parameters at train start, the losses."""

    def __init__(self) -> None:
        self.facts: dict = {"losses": []}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        classes = tuple(transformer_block_classes())
        blocks = [m for m in module.modules() if isinstance(m, classes)]
        params = dict(module.named_parameters())
        self.facts.update(
            start_step=trainer.global_step,
            world_size=trainer.world_size,
            blocks=len(blocks),
            blocks_sharded=sum(isinstance(b, FSDPModule) for b in blocks),
            blocks_checkpointed=sum(_has_ac(b) for b in blocks),
            root_sharded=isinstance(module, FSDPModule),
            dtensor_params=sum(isinstance(p, DTensor) for p in params.values()),
            plain_params=sorted(k for k, p in params.items() if not isinstance(p, DTensor)),
            qkv_shape=list(blocks[0].attn.qkv.weight.shape),
            qkv_local_shape=list(blocks[0].attn.qkv.weight.to_local().shape),
            optimizer_steps=sorted(
                {int(st["step"]) for st in trainer.optimizers[0].state.values() if "step" in st}
            ),
            decay_group_min_ndim=min(
                p.ndim for p in trainer.optimizers[0].param_groups[0]["params"]
            ),
        )
        self.facts["start_params"] = full_params(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.facts["losses"].append(float(outputs["loss"]))


def _has_ac(block: torch.nn.Module) -> bool:
    from torch.distributed._composable.contract import _get_registry

    return "checkpoint" in (_get_registry(block) or {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resume", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    report = Report()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=TransformerFSDPStrategy(activation_checkpointing=True, state_dict_type="sharded"),
        max_steps=args.steps,
        gradient_clip_val=1.0,  # as multimodal_large.yaml: DTensor and replicated grads together
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    module = tiny_module(max_steps=40)
    trainer.fit(module, datamodule=StepDataModule(), ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / f"step={args.steps}.ckpt")
    params = full_params(module)
    # replicated (0-d) parameters: the same on every rank only if their gradients were averaged
    scales: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(scales, float(module.contrastive.logit_scale))
    if trainer.is_global_zero:
        facts = report.facts
        torch.save(
            {"end": params, "start": facts.pop("start_params")},
            args.out / f"params-{args.steps}.pt",
        )
        facts["end_step"] = trainer.global_step
        facts["logit_scale_per_rank"] = scales
        (args.out / f"report-{args.steps}.json").write_text(json.dumps(facts), encoding="utf-8")


if __name__ == "__main__":
    main()
