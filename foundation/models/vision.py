"""One vision transformer trunk for 2D and 3D images (X-ray, CT, MR).

Why one trunk: radiographs and volumes share anatomy and report vocabulary, so a single set of
transformer blocks sees both; only the patch embedding differs (Conv2d for ``(B, C, H, W)``,
Conv3d for ``(B, C, X, Y, Z)``). Positional embeddings are fixed sin-cos tables computed for the
grid at hand (cached per grid), so a model trained on one crop size runs on another. A learned
modality embedding (index into ``foundation.sample.MODALITIES``) is added to every token.

Masking drops patch tokens *before* the trunk (MAE): the encoder only pays for the kept tokens,
and the same masked pass feeds the contrastive loss (FLIP), which is what makes 3D pretraining
affordable (a 128^3 volume in 16^3 patches is 512 tokens, 128 at 75% masking).

CT with several intensity windows (e.g. lung / mediastinum / bone) is just ``in_channels=3``:
the data side stacks the windows as channels; nothing here changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from foundation.models.config import config_from_any

# (dim, depth, heads): tiny is for CPU tests; small/base/large follow ViT-S/B/L.
_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 2),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@dataclass
class VisionConfig:
    """Hyperparameters of :class:`VisionTransformer` (defaults: ViT-B, 16-pixel/voxel patches)."""

    patch_size_2d: int = 16
    patch_size_3d: int = 16
    in_channels: int = 1
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_modalities: int = 3
    pos_embed: str = "sincos"
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    grad_checkpointing: bool = False
    # The pooled embedding: "cls" (the CLS token) or "mean" (mean of the patch tokens the trunk
    # saw: the kept ones under masking, as FLIP pools). Mean pooling starts informative (at
    # init it is a smooth function of the image) where a CLS token must first learn to attend.
    pool: str = "cls"

    @classmethod
    def preset(cls, name: str, **overrides: object) -> VisionConfig:
        """A named size ("tiny", "small", "base", "large") with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; choose from {sorted(_PRESETS)}")
        dim, depth, heads = _PRESETS[name]
        return replace(cls(dim=dim, depth=depth, heads=heads), **overrides)

    @classmethod
    def from_any(cls, value: VisionConfig | dict | None) -> VisionConfig:
        """Accept a config, a dict of fields (optionally with ``preset``), or None (defaults)."""
        return config_from_any(cls, value, "vision")


@dataclass
class VisionOutput:
    """What the encoder returns; ``N`` is the number of patches of the full grid."""

    tokens: Tensor  # (B, 1 + N_keep, D) after the final norm, CLS first
    pooled: Tensor  # (B, D), the CLS token or the patch-token mean (``VisionConfig.pool``)
    mask: Tensor | None  # (B, N) bool, True = masked (dropped); None without masking
    ids_restore: Tensor | None  # (B, N): position of each patch in [kept, dropped] order
    grid: tuple[int, ...]  # patches per spatial axis
    patch_size: tuple[int, ...]


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> Tensor:
    """Fixed sin-cos embedding ``(prod(grid), dim)`` for a 2D or 3D grid of patch indices.

    Each axis gets an equal, even share of the channels (half sin, half cos, MAE frequencies);
    leftover channels (when ``dim`` is not a multiple of ``2 * len(grid)``) are zero.
    """
    per_axis = (dim // (2 * len(grid))) * 2
    if per_axis == 0:
        raise ValueError(f"dim {dim} too small for a {len(grid)}D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for c in coords:  # same flattening order as Conv output .flatten(2)
        angles = c.reshape(-1, 1) * omega  # (N, per_axis/2)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


def patchify(image: Tensor, patch: tuple[int, ...]) -> Tensor:
    """``(B, C, *spatial) -> (B, N, prod(patch) * C)`` in the token order of the patch embedding."""
    b, c, *spatial = image.shape
    nd = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch, strict=True)]
    shape = [b, c]
    for g, p in zip(grid, patch, strict=True):
        shape += [g, p]
    x = image.reshape(shape)  # (B, C, g0, p0, g1, p1, ...)
    grid_axes = [2 + 2 * i for i in range(nd)]
    patch_axes = [3 + 2 * i for i in range(nd)]
    x = x.permute(0, *grid_axes, *patch_axes, 1)  # (B, g..., p..., C)
    return x.reshape(b, math.prod(grid), -1)


def random_masking(
    batch: int, n: int, ratio: float, device: torch.device, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE masking: a random permutation per sample, keep the first ``len_keep``.

    Returns ``ids_keep (B, len_keep)``, ``mask (B, N)`` bool (True = dropped) and
    ``ids_restore (B, N)``.
    """
    len_keep = max(1, int(n * (1.0 - ratio)))
    noise = torch.rand(batch, n, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first len_keep are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask[:, :len_keep] = False
    mask = mask.gather(1, ids_restore)  # back to grid order
    return ids_shuffle[:, :len_keep], mask, ids_restore


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash/mem-eff)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, ``x + mlp(norm(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias, attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder with a Conv2d and a Conv3d patch embedding in front of one trunk."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.pos_embed != "sincos":
            raise ValueError(f"unsupported pos_embed {cfg.pos_embed!r} (only 'sincos')")
        if cfg.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {cfg.pool!r}")
        self.cfg = cfg
        p2, p3 = cfg.patch_size_2d, cfg.patch_size_3d
        self.patch_embed_2d = nn.Conv2d(cfg.in_channels, cfg.dim, p2, stride=p2)
        self.patch_embed_3d = nn.Conv3d(cfg.in_channels, cfg.dim, p3, stride=p3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.modality_embed = nn.Embedding(cfg.num_modalities, cfg.dim)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.dropout, cfg.attn_dropout)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self._pos_cache: dict[tuple, Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE initialisation: conv kernels as a flattened linear layer, xavier everywhere.
        for conv in (self.patch_embed_2d, self.patch_embed_3d):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self.cfg.dim

    def patch_size_for(self, spatial_dims: int) -> tuple[int, ...]:
        """Patch shape for a 2D or 3D image."""
        if spatial_dims == 2:
            return (self.cfg.patch_size_2d,) * 2
        if spatial_dims == 3:
            return (self.cfg.patch_size_3d,) * 3
        raise ValueError(f"expected a 2D or 3D image, got {spatial_dims} spatial dims")

    def patchify(self, image: Tensor) -> Tensor:
        """``(B, C, *spatial) -> (B, N, C * prod(patch))``: pixel targets for masked modelling."""
        return patchify(image, self.patch_size_for(image.ndim - 2))

    def pos_embed(self, grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """Sin-cos embedding ``(1, N, D)`` for ``grid``, cached per (grid, device, dtype)."""
        key = (grid, device, dtype)
        if key not in self._pos_cache:
            emb = sincos_pos_embed(grid, self.cfg.dim)
            self._pos_cache[key] = emb.to(device=device, dtype=dtype).unsqueeze(0)
        return self._pos_cache[key]

    def embed(self, image: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
        """Patch embedding + positions: ``(B, C, *spatial) -> (B, N, D)``, grid, patch shape."""
        nd = image.ndim - 2
        patch = self.patch_size_for(nd)
        bad = [s for s, p in zip(image.shape[2:], patch, strict=True) if s % p]
        if bad:
            raise ValueError(
                f"image spatial shape {tuple(image.shape[2:])} is not a multiple of patch {patch}"
            )
        conv = self.patch_embed_2d if nd == 2 else self.patch_embed_3d
        x = conv(image)  # (B, D, *grid)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        return x + self.pos_embed(grid, x.device, x.dtype), grid, patch

    def forward(
        self,
        image: Tensor,
        modality: Tensor,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> VisionOutput:
        """Encode ``image`` (B, C, H, W) or (B, C, X, Y, Z); ``modality`` int64 (B,).

        With ``mask_ratio > 0`` a random ``mask_ratio`` share of patches is dropped per sample
        before the trunk; ``generator`` makes that draw reproducible (exact resume).
        """
        if image.ndim not in (4, 5):
            raise ValueError(f"expected (B, C, H, W) or (B, C, X, Y, Z), got {tuple(image.shape)}")
        if image.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected {self.cfg.in_channels} channels, got {image.shape[1]}")
        x, grid, patch = self.embed(image)
        b, n, d = x.shape
        mask = ids_restore = None
        if mask_ratio > 0:
            ids_keep, mask, ids_restore = random_masking(b, n, mask_ratio, x.device, generator)
            x = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, N_keep, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.modality_embed(modality).unsqueeze(1).to(x.dtype)  # every token, CLS too
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        return VisionOutput(x, pooled, mask, ids_restore, grid, patch)
