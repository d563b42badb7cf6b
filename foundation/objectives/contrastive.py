"""Image-report contrastive losses (CLIP InfoNCE and SigLIP sigmoid), gathered across ranks.

Why gather: the negatives of a contrastive loss are the other pairs of the batch, so the
global batch (all ranks) is what makes the signal; each rank only holds its local rows.

How (the "local loss" of open_clip, made exact): every rank all-gathers the features of all
ranks, scores its *local* rows against *all* columns, and averages over its local rows. The
gather is differentiable: its backward sums, over ranks, the gradient each rank computed for a
slot and hands it to the slot's owner (an all-reduce of the gathered gradient). Rank r then
holds ``d(sum_s L_s) / d f_r``; DDP averages parameter gradients over the W ranks, which gives
exactly the gradient of ``mean_s L_s``, the loss of the concatenated batch.

Note: a gather *without* gradient (only the local slot keeps its graph) loses the terms where a
rank's features serve as columns for another rank's rows; with the local-rows formulation that
gradient is wrong, hence the autograd gather here. ``tests/test_objectives.py`` checks both
losses and gradients against the single-process loss in a 2-process gloo run.

Negatives within a group (``groups``, e.g. the modality of each pair): in a batch that mixes CT
and MR, telling the modalities apart (which a report's first words already do) brings the loss
to ``log(B / n_modalities)`` without learning anything else. With ``groups`` a pair's negatives
are only the pairs of its own group, so the loss can fall only by telling apart exams of one
modality; pairs of other groups are left out of the softmax (CLIP) or of the sum (SigLIP). On
the synthetic cohort it did not help (docs/researchers.md); it is an option, off by default.

Extra negatives (``extra_image``, ``extra_text``: local, detached features of pairs outside
the batch) join as columns that are never anyone's positive: the image rows are also scored
against ``extra_text``, the report rows against ``extra_image``. The pretraining module uses
them to hold the last batch of the other dimensionality (see ``cross_dims_negatives`` there).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (equal sizes); backward sums the slot gradients over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = _world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank computed a gradient for every slot; the owner needs their sum. A
        # reduce-scatter would move less data, but the features are small and all-reduce runs
        # on every backend (gloo has no reduce_scatter).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_features(x: Tensor) -> tuple[Tensor, int]:
    """Features of all ranks ``(W * B, D)`` with gradients, and the offset of the local rows.

    Every rank must hold the same batch size (drop the last incomplete batch); a mismatch raises
    rather than silently misaligning the positive pairs.
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    if any(int(s) != x.shape[0] for s in all_sizes):
        raise RuntimeError(
            f"contrastive gather needs equal per-rank batch sizes, got {[int(s) for s in all_sizes]}"
        )
    return _GatherWithGrad.apply(x), rank * x.shape[0]


def gather_groups(groups: Tensor) -> Tensor:
    """Group ids of all ranks ``(W * B,)`` (no gradient), in the order of ``gather_features``."""
    _, world = _world()
    if world == 1:
        return groups
    out = [torch.empty_like(groups) for _ in range(world)]
    dist.all_gather(out, groups.contiguous())
    return torch.cat(out)


def _other_group(groups: Tensor | None) -> Tensor | None:
    """``(B, W*B)`` True where a local row and a gathered column belong to different groups
    (not negatives of each other); None without groups."""
    if groups is None:
        return None
    return groups[:, None] != gather_groups(groups)[None, :]


Extra = tuple[Tensor | None, Tensor | None]  # (extra images, extra reports), each (N, D)


class ContrastiveLoss(nn.Module):
    """What CLIP and SigLIP share: a learnable ``logit_scale`` clamped at ``max_scale`` and the
    call ``loss(image, text, groups=None, extra_image=None, extra_text=None)``."""

    def __init__(self, init_scale: float, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_scale = max_scale

    def scale(self) -> Tensor:
        """The multiplier of the cosine similarities, clamped at ``max_scale`` (CLIP: 100)."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        groups: Tensor | None = None,
        extra_image: Tensor | None = None,
        extra_text: Tensor | None = None,
    ) -> Tensor:
        """Loss of L2-normalised ``image`` and ``text`` features ``(B, D)``; row i pairs with i.
        ``groups`` ``(B,)`` int: negatives only within a row's group; ``extra_image`` /
        ``extra_text`` ``(N, D)``: more negatives, never a positive (see the module doc)."""
        if groups is not None and (extra_image is not None or extra_text is not None):
            raise ValueError("extra negatives and negatives within a group do not combine")
        return self._loss(image, text, groups, (extra_image, extra_text))

    def _loss(self, image: Tensor, text: Tensor, groups: Tensor | None, extra: Extra) -> Tensor:
        raise NotImplementedError


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE with a learnable temperature (``logit_scale = log(1/T)``, T >= 0.01)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__(1.0 / init_temperature, max_scale)

    def _loss(self, image: Tensor, text: Tensor, groups: Tensor | None, extra: Extra) -> Tensor:
        extra_image, extra_text = extra
        all_image, offset = gather_features(image)
        all_text, _ = gather_features(text)
        scale = self.scale()
        logits_image = scale * image @ all_text.T  # (B, W*B): local images vs all reports
        logits_text = scale * text @ all_image.T
        other = _other_group(groups)
        if other is not None:  # the positive (same pair, same group) is never masked
            logits_image = logits_image.masked_fill(other, float("-inf"))
            logits_text = logits_text.masked_fill(other, float("-inf"))
        if extra_text is not None:  # (B, W*B + N): the extra columns come after the batch's
            logits_image = torch.cat([logits_image, scale * image @ extra_text.T], dim=1)
        if extra_image is not None:
            logits_text = torch.cat([logits_text, scale * text @ extra_image.T], dim=1)
        labels = torch.arange(image.shape[0], device=image.device) + offset
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP) with learnable scale ``t`` and bias ``b``.

    Every (image, report) pair is an independent binary problem (positive on the diagonal), so
    no softmax over the batch is needed; the loss is summed over columns and averaged over rows,
    as in the paper (``-1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))``).
    """

    def __init__(
        self, init_scale: float = 10.0, init_bias: float = -10.0, max_scale: float = 100.0
    ):
        super().__init__(init_scale, max_scale)
        self.logit_bias = nn.Parameter(torch.tensor(init_bias))

    def _loss(self, image: Tensor, text: Tensor, groups: Tensor | None, extra: Extra) -> Tensor:
        # extra pairs are negatives only (label -1): local images x extra reports, extra
        # images x local reports
        extra_image, extra_text = extra
        all_text, offset = gather_features(text)
        logits = self.scale() * image @ all_text.T + self.logit_bias  # (B, W*B)
        b = image.shape[0]
        labels = -torch.ones_like(logits)
        idx = torch.arange(b, device=image.device)
        labels[idx, idx + offset] = 1.0
        terms = -F.logsigmoid(labels * logits)
        other = _other_group(groups)
        if other is not None:
            terms = terms.masked_fill(other, 0.0)
        total = terms.sum()
        for rows, cols in ((image, extra_text), (text, extra_image)):
            if cols is not None:  # negatives only: label -1
                total = (
                    total - F.logsigmoid(-(self.scale() * rows @ cols.T + self.logit_bias)).sum()
                )
        return total / b


def build_contrastive_loss(kind: str) -> ClipLoss | SigLipLoss:
    """``"clip"`` or ``"siglip"``."""
    if kind == "clip":
        return ClipLoss()
    if kind == "siglip":
        return SigLipLoss()
    raise ValueError(f"unknown contrastive loss {kind!r}; choose 'clip' or 'siglip'")
