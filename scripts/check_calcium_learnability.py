"""Can an encoder learn the synthetic coronary calcium score from CT when it is told the score?

The demo's probes find no calcium in the tiny ViT's features, pretrained or at random init.
This asks the question beneath: trained *supervised* on the score, does the encoder learn it at
all? It renders phantoms as the cohort acquires them (its CT orientations in turn), preprocesses
them as ingest does (``foundation.ingest.preprocess`` at ``--spacing`` mm), crops them as
evaluation does (``--size``, mediastinal window), and trains each encoder with a linear head on
standardised log1p(score) (batch 16, AdamW, no flips unless ``--flip-lr``: the coronaries are
not symmetric, and the demo's probes see no flips either), testing on phantoms it never saw:

- ``max16``: the maximum of each 16-voxel block, read block by block by a linear map (no
  transformer): the reference, which can see a calcification of one or two voxels;
- ``vit``: the demo's vision encoder (``model.vision`` of ``--config``), tokens mean-pooled.

It prints, every ``--every`` steps and in a final table, the held-out Pearson correlation with
log1p(score) and the MAE on log1p next to the constant predictor's.

    python scripts/check_calcium_learnability.py --train 1500 --test 500 --steps 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
import yaml
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import Tensor, nn

from foundation.data.transforms import EvalTransform
from foundation.ingest.preprocess import PreprocessConfig, preprocess
from foundation.ingest.volume import Volume
from foundation.models.vision import VisionConfig, VisionTransformer
from foundation.sample import MODALITIES
from foundation.synthetic.anatomy import calcium_score, render_ct, sample_patient
from foundation.synthetic.geometry import CT_ORIENTATIONS, draw_ct_stack

REPO = Path(__file__).resolve().parent.parent
BATCH = 16


def render_phantoms(
    n: int, seed: int, spacing: float, size: tuple[int, ...], matrix: int = 96
) -> tuple[Tensor, Tensor]:
    """``n`` phantoms -> images ``(n, 1, *size)`` float32 and log1p(calcium score) ``(n,)``."""
    rng = np.random.default_rng(seed)
    config = PreprocessConfig(ct_spacing=(spacing, spacing, spacing))
    crop = EvalTransform(3, size)  # the first window: mediastinal
    images, targets = [], []
    for i in track(range(n), description=f"rendering {n} phantoms (seed {seed})"):
        anatomy = sample_patient(rng).at(1.0)
        stack = draw_ct_stack(rng, matrix, CT_ORIENTATIONS[i % len(CT_ORIENTATIONS)])
        hu = render_ct(anatomy, stack.world_points(), (*stack.spacing, stack.slice_spacing), rng)
        volume = Volume(
            array=hu.transpose(2, 1, 0).astype(np.float32),  # (K, rows, cols) -> (cols, rows, K)
            affine=stack.ras_affine(),
            spacing=(stack.spacing[1], stack.spacing[0], stack.slice_spacing),
            modality="CT",
            header=pydicom.Dataset(),
            source_format="synthetic",
            source=Path(f"phantom-{seed}-{i}"),
        )
        array, meta = preprocess(volume, config)
        images.append(crop(array, meta))
        targets.append(float(np.log1p(calcium_score(anatomy))))
    return torch.stack(images), torch.tensor(targets)


class BlockMax(nn.Module):
    """The maximum of each ``block``-voxel cube, flattened: ``(B, 1, *S) -> (B, blocks)``."""

    def __init__(self, block: int = 16) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.max_pool3d(x, self.block).flatten(1)


class PooledViT(nn.Module):
    """The vision encoder's mean-pooled patch tokens: ``(B, 1, *S) -> (B, D)``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vit = VisionTransformer(cfg)

    def forward(self, x: Tensor) -> Tensor:
        modality = torch.full((len(x),), MODALITIES.index("CT"), dtype=torch.long)
        return self.vit(x, modality).pooled


def train_and_test(
    name: str,
    encoder: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    lr: float,
    every: int,
    seed: int,
    flip_lr: bool = False,
) -> dict[str, float]:
    """Train ``encoder`` + a lazy linear head on standardised targets; held-out figures."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = nn.Sequential(encoder, nn.LazyLinear(1))
    model(x_train[:2])  # materialise the head before the optimiser sees it
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    mu, sd = y_train.mean(), y_train.std()

    def test() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            z = torch.cat([model(x_test[i : i + 64]).squeeze(1) for i in range(0, len(x_test), 64)])
        model.train()
        pred = (z * sd + mu).clamp(min=0)
        corr = float(np.corrcoef(pred.numpy(), y_test.numpy())[0, 1]) if pred.std() > 0 else 0.0
        return {"corr": corr, "mae_log1p": float((pred - y_test).abs().mean())}

    start = time.perf_counter()
    for step in range(1, steps + 1):
        i = torch.randint(0, len(x_train), (BATCH,))
        x = x_train[i]
        if flip_lr and torch.rand(()) < 0.5:
            x = x.flip(2)  # the RAS x axis: left-right
        loss = ((model(x).squeeze(1) - (y_train[i] - mu) / sd) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            figures = test()
            print(f"{name:6s} step {step:5d}  train loss {loss.item():.3f}  "
                  f"test corr {figures['corr']:+.3f}  mae_log1p {figures['mae_log1p']:.3f}")  # fmt: skip
    return {**test(), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1500, help="training phantoms")
    parser.add_argument("--test", type=int, default=500, help="held-out phantoms")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--every", type=int, default=500, help="test every N steps")
    parser.add_argument("--spacing", type=float, default=4.0, help="CT spacing, mm (demo: 4)")
    parser.add_argument("--size", type=int, nargs=3, default=[80, 80, 64], help="eval crop")
    parser.add_argument("--config", type=Path, default=REPO / "configs/pretrain/tiny.yaml",
                        help="pretraining config whose model.vision is the ViT")  # fmt: skip
    parser.add_argument("--encoders", nargs="+", default=["max16", "vit"],
                        choices=["max16", "vit"])  # fmt: skip
    parser.add_argument("--flip-lr", action="store_true", help="random left-right flips")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = tuple(args.size)
    x_train, y_train = render_phantoms(args.train, args.seed, args.spacing, size)
    x_test, y_test = render_phantoms(args.test, args.seed + 1, args.spacing, size)
    data = (x_train, y_train, x_test, y_test)
    vision = yaml.safe_load(args.config.read_text())["model"]["vision"]
    cfg = VisionConfig.from_any({**vision, "pool": "mean"})
    build = {"max16": lambda: BlockMax(16), "vit": lambda: PooledViT(cfg)}
    constant = float((y_train.mean() - y_test).abs().mean())
    results = {
        name: train_and_test(
            name, build[name](), data, args.steps, args.lr, args.every, args.seed, args.flip_lr
        )
        for name in args.encoders
    }

    table = Table(title=f"calcium score, supervised: {args.train} training phantoms, "
                        f"{args.test} held out, {args.steps} steps, {args.spacing:g} mm")  # fmt: skip
    for column in ("encoder", "test corr", "mae_log1p", "vs constant", "train s"):
        table.add_column(column, justify="left" if column == "encoder" else "right")
    table.add_row("constant", "0", f"{constant:.3f}", "1.00", "")
    for name, r in results.items():
        table.add_row(name, f"{r['corr']:+.3f}", f"{r['mae_log1p']:.3f}",
                      f"{r['mae_log1p'] / constant:.2f}", f"{r['seconds']:.0f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
