"""Exponential moving average of a module's weights (a smoother encoder to evaluate and export).

Why: the EMA of the weights is often a better encoder than the last iterate at no training cost;
it lives as a frozen submodule, so it moves with the model, is saved in checkpoints and resumes
exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


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
        """Move the average towards the current weights of ``module``."""
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for eb, b in zip(self.module.buffers(), module.buffers(), strict=True):
            eb.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
