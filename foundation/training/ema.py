"""Exponential moving average of a module's weights (a smoother encoder to evaluate and export).

Why: the EMA of the weights is often a better encoder than the last iterate at no training cost;
it lives as a frozen submodule, so it moves with the model, is saved in checkpoints and resumes
exactly.

Under FSDP2 the copy is sharded like the weights it averages (``shard_transformer_blocks``
makes it a unit of its own), so each rank keeps the average of its own shards: the update is
local (no communication) and the EMA lands in the sharded checkpoint beside the weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ModelEMA(nn.Module):
    """A frozen copy of ``module`` updated as ``ema = decay_t * ema + (1 - decay_t) * param``.

    ``decay_t = min(decay, (1 + step) / (10 + step))`` warms up so that early updates follow the
    fast-moving weights instead of the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ModelEMA:
        super().train(mode)
        self.module.eval()  # the average is an inference model (no dropout)
        return self

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Move the average towards the current weights of ``module`` (sharded: shard by shard)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params, params = [], []
        pairs = zip(self.module.named_parameters(), module.parameters(), strict=True)
        for (name, e), p in pairs:
            e, p = _local_pair(name, e, p.detach())
            ema_params.append(e)
            params.append(p)
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for eb, b in zip(self.module.buffers(), module.buffers(), strict=True):
            eb.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _local_pair(name: str, ema: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
    """The tensors to average: the local shards when both are DTensors sharded alike."""
    if not torch.distributed.is_available():
        return ema, param
    from torch.distributed.tensor import DTensor

    ema_sharded, sharded = isinstance(ema, DTensor), isinstance(param, DTensor)
    if not ema_sharded and not sharded:
        return ema, param
    if (
        ema_sharded
        and sharded
        and (ema.placements, ema.device_mesh, ema.shape)
        == (param.placements, param.device_mesh, param.shape)
    ):
        return ema.to_local(), param.to_local()  # same placements -> same local shapes
    raise RuntimeError(
        f"EMA parameter {name} is not sharded like the weight it averages; under FSDP build "
        "the model with foundation.training.cluster.TransformerFSDPStrategy, which shards both"
    )
