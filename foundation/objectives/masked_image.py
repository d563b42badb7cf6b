"""Masked image modelling (MAE): reconstruct the dropped patches from the kept ones.

Why: the contrastive loss only learns what the reports talk about; reconstructing masked
anatomy gives the encoder a dense, label-free signal, and with tokens dropped before the trunk
it costs little on top of the (already masked) contrastive pass.

The decoder is deliberately light (MAE: narrow, 1-2 blocks) and is thrown away after
pretraining. It re-inserts a learned mask token at the dropped positions, adds sin-cos positions
for the full grid, and predicts pixels with one linear head per patch shape (2D and 3D).
Targets are normalised per patch (mean/variance), and the loss is taken on masked patches only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from foundation.models.vision import Block, VisionOutput, patchify, sincos_pos_embed


class MaskedImageDecoder(nn.Module):
    """MAE-style decoder and loss over the output of a masked :class:`VisionTransformer` pass."""

    def __init__(
        self,
        encoder_dim: int,
        in_channels: int = 1,
        patch_size_2d: int = 16,
        patch_size_3d: int = 16,
        dim: int = 256,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        self.dim = dim
        self.norm_pix_loss = norm_pix_loss
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_2d = nn.Linear(dim, in_channels * patch_size_2d**2)
        self.head_3d = nn.Linear(dim, in_channels * patch_size_3d**3)
        self._pos_cache: dict[tuple, Tensor] = {}
        nn.init.normal_(self.mask_token, std=0.02)

    def _pos(self, grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (grid, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed(grid, self.dim).to(device, dtype).unsqueeze(0)
        return self._pos_cache[key]

    def predict(self, out: VisionOutput) -> Tensor:
        """Pixel predictions ``(B, N, C * prod(patch))`` for every patch of the grid."""
        if out.ids_restore is None:
            raise ValueError("the MIM decoder needs a masked encoder pass (mask_ratio > 0)")
        x = self.embed(out.tokens)  # (B, 1 + N_keep, d)
        b, n = out.ids_restore.shape
        cls, kept = x[:, :1], x[:, 1:]
        fill = self.mask_token.to(x.dtype).expand(b, n - kept.shape[1], -1)
        x = torch.cat([kept, fill], dim=1)  # (B, N, d) in [kept, dropped] order
        x = x.gather(1, out.ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))  # grid order
        x = x + self._pos(out.grid, x.device, x.dtype)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]
        head = self.head_2d if len(out.grid) == 2 else self.head_3d
        return head(x)

    def loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over masked patches only.

        ``pred``/``target``: (B, N, P) with ``target`` the raw patchified pixels; ``mask``:
        (B, N) bool, True = masked.
        """
        target = target.float()
        if self.norm_pix_loss:  # per-patch normalisation: the loss sees structure, not brightness
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
        m = mask.float()
        return (per_patch * m).sum() / m.sum().clamp(min=1.0)

    def forward(self, out: VisionOutput, image: Tensor) -> Tensor:
        """MIM loss of a masked encoder pass ``out`` over the input ``image``."""
        if out.mask is None:
            raise ValueError("the MIM decoder needs a masked encoder pass (mask_ratio > 0)")
        pred = self.predict(out)
        target = patchify(image, out.patch_size)
        if target.shape[-1] != pred.shape[-1]:
            raise ValueError(
                f"patch of {target.shape[-1]} values but the head predicts {pred.shape[-1]}"
                f" (in_channels x {math.prod(out.patch_size)})"
            )
        return self.loss(pred, target, out.mask)
