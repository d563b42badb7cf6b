"""A tiny PretrainModule under ``TransformerFSDPStrategy`` on CPU (gloo); run by test_fsdp.py.

``python tests/fsdp_worker.py OUT --devices N --steps S [--resume CKPT] [--precision P]
[--param-dtype D] [--reduce-dtype D] [--ema]``: trains to step S on N processes (Lightning
starts the other ranks by re-running this script), writes the sharded checkpoint
``OUT/step=S.ckpt`` (a folder), the full parameters ``OUT/params-S.pt`` (with ``--ema``: also
the weights the EMA averaged, after each step) and what rank 0 saw of the wrapping and the
dtypes in ``OUT/report-S.json``.
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

    def __init__(self, track_ema: bool = False) -> None:
        self.facts: dict = {"losses": [], "compute_dtypes": [], "grad_dtypes": []}
        self.track_ema = track_ema
        self.history: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        classes = tuple(transformer_block_classes())
        in_ema = {id(m) for m in module.ema.modules()} if module.ema is not None else set()
        blocks = [m for m in module.modules() if isinstance(m, classes) and id(m) not in in_ema]
        params = dict(module.named_parameters())
        # what the first block's qkv projection computes with (inside FSDP's all-gather)
        blocks[0].attn.qkv.register_forward_pre_hook(self._record_compute_dtype)
        if module.ema is not None:
            ema_qkv = module.ema.module["vision"].blocks[0].attn.qkv.weight
            self.facts.update(
                ema_units=sum(isinstance(m, FSDPModule) for m in module.ema.modules()),
                ema_checkpointed=sum(_has_ac(m) for m in module.ema.modules()),
                ema_is_unit=isinstance(module.ema, FSDPModule),
                ema_qkv_local_shape=list(ema_qkv.to_local().shape),
            )
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

    def _record_compute_dtype(self, linear: torch.nn.Module, args: tuple) -> None:
        seen = [str(args[0].dtype), str(linear.weight.dtype)]
        if seen not in self.facts["compute_dtypes"]:
            self.facts["compute_dtypes"].append(seen)

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = {str(p.grad.dtype) for p in module.parameters() if p.grad is not None}
        self.facts["grad_dtypes"] = sorted(set(self.facts["grad_dtypes"]) | grads)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.facts["losses"].append(float(outputs["loss"]))
        if self.track_ema:  # the weights after this step: the EMA update that follows uses them
            params = full_params(module)
            kept = {k: v for k, v in params.items() if k.startswith(("vision.", "vision_proj."))}
            self.history.append((trainer.global_step, kept))

    def on_train_end(self, trainer, module) -> None:
        self.facts["param_dtypes"] = sorted({str(p.dtype) for p in module.parameters()})


def _has_ac(block: torch.nn.Module) -> bool:
    from torch.distributed._composable.contract import _get_registry

    return "checkpoint" in (_get_registry(block) or {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--param-dtype", default="auto")
    ap.add_argument("--reduce-dtype", default="float32")
    ap.add_argument("--ema", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    report = Report(track_ema=args.ema)
    strategy = TransformerFSDPStrategy(
        activation_checkpointing=True,
        state_dict_type="sharded",
        param_dtype=args.param_dtype,
        reduce_dtype=args.reduce_dtype,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.steps,
        gradient_clip_val=1.0,  # as multimodal_large.yaml: DTensor and replicated grads together
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    module = tiny_module(max_steps=40, ema=args.ema, ema_decay=0.9)
    trainer.fit(module, datamodule=StepDataModule(), ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / f"step={args.steps}.ckpt")
    params = full_params(module)
    # replicated (0-d) parameters: the same on every rank only if their gradients were averaged
    scales: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(scales, float(module.contrastive.logit_scale))
    if trainer.is_global_zero:
        facts = report.facts
        torch.save(
            {"end": params, "start": facts.pop("start_params"), "history": report.history},
            args.out / f"params-{args.steps}.pt",
        )
        facts["end_step"] = trainer.global_step
        facts["logit_scale_per_rank"] = scales
        policy = strategy.mixed_precision_policy()
        facts["policy"] = [str(policy.param_dtype), str(policy.reduce_dtype)]
        (args.out / f"report-{args.steps}.json").write_text(json.dumps(facts), encoding="utf-8")


if __name__ == "__main__":
    main()
