"""The linear map from a tower's pooled features to the joint (image, report) embedding space.

``norm="batchnorm"`` standardises the features first (batch statistics in training, running
ones at evaluation; no affine), as the projection heads of SimCLR and MoCo v3 do. Why: at
initialisation every image's pooled features share one large common component, so after the
projection and the L2 norm the embeddings of one modality are nearly identical; the InfoNCE
gradient that tells them apart is then tiny and training sits on the "modality only" plateau.
Standardising removes that common part (``docs/researchers.md``, "modality plateau").

Why one set of statistics per dimensionality: batches are homogeneous in dimensionality, so in
training a radiograph's features (and its report's) are standardised with the statistics of a
2D batch, a CT's with those of a 3D batch. One shared set of running statistics would hold the
mixture of both, and evaluation would compute another function than the one trained: on the
demo's checkpoint, image->report recall@1 over its own training studies read 0.035 with shared
running statistics and 0.175 with each dimensionality's batch statistics (retrained with the
statistics kept apart: 0.193). So the 2D and 3D batches keep their own running statistics, and
the text side is told the dimensionality of the images its reports go with: a report is
encoded for the dimensionality of its exam (its DICOM says which), a free-text query for that
of the images it is matched against.

Under DDP, ``broadcast_buffers`` copies rank 0's running statistics to every rank each step,
so each set follows the batches of its kind that rank 0 sees: fewer samples, same estimate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTION_NORMS = ("none", "batchnorm")


class Projection(nn.Module):
    """``(B, in_dim)`` -> ``(B, out_dim)``: ``x @ weight.T``, optionally standardised first.

    With ``norm="batchnorm"``, ``forward`` needs ``dims`` (2 or 3), the dimensionality of the
    images of the batch (for a report: of the images it is paired or compared with).
    """

    def __init__(self, in_dim: int, out_dim: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in PROJECTION_NORMS:
            raise ValueError(f"proj_norm must be 'none' or 'batchnorm', not {norm!r}")
        # the parameter nn.Linear(bias=False) would hold, same name and initialisation, so
        # checkpoints and seeded runs of the plain projection are unchanged
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.norms: nn.ModuleDict | None = None
        if norm == "batchnorm":
            self.norms = nn.ModuleDict(
                {f"{d}d": nn.BatchNorm1d(in_dim, affine=False) for d in (2, 3)}
            )

    def forward(self, x: Tensor, dims: int | None = None) -> Tensor:
        if self.norms is not None:
            if dims not in (2, 3):
                raise ValueError(
                    "a batch-normalised projection needs the dimensionality (2 or 3) of the "
                    f"batch's images, got dims={dims!r}"
                )
            x = self.norms[f"{dims}d"](x)
        return F.linear(x, self.weight)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints written before the per-dimensionality statistics held an
        # nn.Sequential(BatchNorm1d, Linear): keys "0.*" and "1.weight". Their one set of
        # statistics goes to both dimensionalities.
        if prefix + "1.weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "1.weight")
        legacy = [k for k in state_dict if k.startswith(prefix + "0.")]
        for key in legacy if self.norms is not None else ():
            value = state_dict.pop(key)
            for d in self.norms:
                state_dict[f"{prefix}norms.{d}.{key.removeprefix(prefix + '0.')}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        norm = "batchnorm per dims" if self.norms is not None else "none"
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, norm={norm}"
