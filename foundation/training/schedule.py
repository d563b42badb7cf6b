"""Optimiser parameter groups and the learning-rate schedule (linear warm-up, cosine decay).

Why no weight decay on some parameters: decay pulls weights towards zero, which is a prior
for matrices but meaningless or harmful for norm gains/biases and for embeddings that act as
offsets (CLS token, modality embedding, positional tables, mask token, temperature/bias of the
contrastive loss). Every 0-d and 1-d tensor is exempt, as are names in ``NO_DECAY_NAMES``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY_NAMES: tuple[str, ...] = (
    "cls_token",
    "mask_token",
    "modality_embed",
    "pos_embed",
    "position_embeddings",
    "token_type_embeddings",
    "logit_scale",
    "logit_bias",
)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at ``step``: linear 0->1 over warm-up, cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    no_decay_names: tuple[str, ...] = NO_DECAY_NAMES,
) -> list[dict]:
    """Two AdamW groups: decayed matrices and non-decayed norms/biases/embedding offsets.

    Frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(n in name for n in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over :func:`param_groups` and a per-step :func:`warmup_cosine` scheduler."""
    groups = param_groups(module.named_parameters(), weight_decay)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)
    sched = LambdaLR(opt, lambda s: warmup_cosine(s, warmup_steps, max_steps, min_lr_ratio))
    return opt, sched
