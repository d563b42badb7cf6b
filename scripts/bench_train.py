"""Training-step benchmark of the pretraining model: step time, samples/s, FLOPs and MFU.

Default: ViT-B on 128^3 volumes in 16^3 patches (512 tokens), BERT-base report encoder,
bf16 autocast, SDPA attention, AdamW; with and without 75% masking, eager and torch.compile.
FLOPs per step are counted once per masking ratio with ``torch.utils.flop_counter``
(forward + backward, matmuls and attention), so MFU = FLOPs / step time / peak.

    python scripts/bench_train.py                 # full size, on a GPU
    python scripts/bench_train.py --tiny          # CPU smoke test in seconds
    python scripts/bench_train.py --peak-tflops 989 --batch 64 --compile both
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from foundation.training.pretrain import PretrainModule


@dataclass
class Result:
    mask_ratio: float
    compiled: bool
    step_s: float
    samples_per_s: float
    gflops_per_step: float
    mfu: float
    peak_mem_gb: float


def make_batch(args: argparse.Namespace, device: torch.device) -> dict:
    spatial = (args.crop,) * args.dims
    ids = torch.randint(5, args.vocab, (args.batch, args.text_length), device=device)
    return {
        "image": torch.rand(args.batch, 1, *spatial, device=device),
        "modality": torch.zeros(args.batch, dtype=torch.long, device=device),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


def build(args: argparse.Namespace, mask_ratio: float, device: torch.device) -> PretrainModule:
    patch = {"patch_size_2d": args.patch, "patch_size_3d": args.patch}
    module = PretrainModule(
        vision={"preset": args.vision, **patch, "grad_checkpointing": args.grad_checkpointing},
        text={"preset": args.text, "vocab_size": args.vocab, "max_length": args.text_length},
        embed_dim=args.embed_dim,
        loss=args.loss,
        mask_ratio=mask_ratio,
        w_mim=1.0 if mask_ratio > 0 else 0.0,
        decoder_dim=args.decoder_dim,
        decoder_heads=args.decoder_heads,
        warmup_steps=10,
        max_steps=1000,
    )
    return module.to(device).train()


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(module: PretrainModule, opt, batch: dict, ratio: float, args, device) -> None:
    with autocast(device, args.dtype):
        loss = module.compute_losses(batch, ratio)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_flops(args: argparse.Namespace, ratio: float, device: torch.device) -> float:
    """Model FLOPs of one forward + backward (matmuls, convolutions, attention).

    Counted without activation checkpointing: its recomputation is not model work (MFU, not
    hardware FLOPs utilisation).
    """
    module = build(argparse.Namespace(**{**vars(args), "grad_checkpointing": False}), ratio, device)
    batch = make_batch(args, device)
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, args.dtype):
        module.compute_losses(batch, ratio)["loss"].backward()
    del module
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args, ratio: float, compiled: bool, flops: float, device: torch.device) -> Result:
    torch.manual_seed(0)
    module = build(args, ratio, device)
    if compiled:
        module.hparams.compile = True
        module.configure_model()  # the same in-place compile as in training
    opt = module.configure_optimizers()["optimizer"]
    batch = make_batch(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):  # includes compilation
        train_step(module, opt, batch, ratio, args, device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(module, opt, batch, ratio, args, device)
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    del module, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(
        ratio,
        compiled,
        step_s,
        args.batch / step_s,
        flops / 1e9,
        flops / step_s / (args.peak_tflops * 1e12),
        mem,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: a smoke test")
    p.add_argument("--vision", default="base")
    p.add_argument("--text", default="base")
    p.add_argument("--dims", type=int, default=3, choices=(2, 3))
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text-length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--decoder-dim", type=int, default=384)
    p.add_argument("--decoder-heads", type=int, default=8)
    p.add_argument("--loss", default="clip", choices=("clip", "siglip"))
    p.add_argument("--mask-ratios", default="0.75,0.0")
    p.add_argument("--compile", default="both", choices=("no", "yes", "both"))
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense: 989")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.tiny:
        args.vision = args.text = "tiny"
        args.crop, args.patch, args.batch = 32, 8, 4
        args.text_length, args.vocab, args.embed_dim = 32, 256, 32
        args.decoder_dim, args.decoder_heads = 32, 2
        args.steps, args.warmup, args.device = 2, 1, "cpu"
        args.compile = "no" if args.compile == "both" else args.compile
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ratios = [float(r) for r in args.mask_ratios.split(",")]
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]

    grid = (args.crop // args.patch) ** args.dims
    print(
        f"vision={args.vision} text={args.text} image={args.crop}^{args.dims} patch={args.patch}"
        f" ({grid} patches) batch={args.batch} text_len={args.text_length} dtype={args.dtype}"
        f" device={device} peak={args.peak_tflops} TFLOP/s"
    )
    results: list[Result] = []
    for ratio in ratios:
        flops = count_flops(args, ratio, device)
        for compiled in modes:
            try:
                results.append(run(args, ratio, compiled, flops, device))
            except torch.OutOfMemoryError:
                print(f"mask={ratio} compiled={compiled}: out of memory")
                torch.cuda.empty_cache()

    header = f"{'mask':>5} {'compile':>7} {'step ms':>9} {'samples/s':>10} {'GFLOP/step':>11}"
    print(header + f" {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7}")
    for r in results:
        print(
            f"{r.mask_ratio:>5.2f} {r.compiled!s:>7} {r.step_s * 1e3:>9.1f}"
            f" {r.samples_per_s:>10.1f} {r.gflops_per_step:>11.1f}"
            f" {r.gflops_per_step / 1e3 / r.step_s:>8.2f} {r.mfu:>6.1%} {r.peak_mem_gb:>7.1f}"
        )
    by = {(r.mask_ratio, r.compiled): r for r in results}
    for compiled in modes:
        masked = [r for r in results if r.compiled == compiled and r.mask_ratio > 0]
        plain = by.get((0.0, compiled))
        for m in masked if plain else []:
            print(
                f"speed-up of mask {m.mask_ratio:.2f} vs unmasked (compile={compiled}):"
                f" {plain.step_s / m.step_s:.2f}x"
            )
    for ratio in ratios:
        if (ratio, False) in by and (ratio, True) in by:
            eager, comp = by[(ratio, False)], by[(ratio, True)]
            print(
                f"speed-up of compile vs eager (mask {ratio:.2f}): {eager.step_s / comp.step_s:.2f}x"
            )


if __name__ == "__main__":
    main()
