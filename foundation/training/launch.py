"""`foundation pretrain`: LightningCLI over ``PretrainModule`` + ``ShardDataModule``.

The YAML in ``configs/pretrain/`` holds the trainer, model and data sections; any key can be
overridden on the command line (``--trainer.max_steps=10``). ``--ckpt_path`` resumes model,
optimiser, scheduler, step and the data stream's position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from foundation.data.datamodule import ShardDataModule
from foundation.training.pretrain import PretrainModule


class PretrainCLI(LightningCLI):
    """LightningCLI with the project's defaults (config saved beside the logs, overwritable)."""

    def before_fit(self) -> None:
        dm, model = self.datamodule, self.model
        vocab = getattr(getattr(model, "text", None), "vocab_size", None)
        tok_dir = getattr(dm, "tokenizer_dir", None)
        if vocab is not None and tok_dir:
            from foundation.data.tokenizer import load_tokenizer

            n = len(load_tokenizer(tok_dir))
            if n > vocab:
                raise ValueError(
                    f"tokenizer {tok_dir} has {n} tokens but model.text.vocab_size is {vocab}: "
                    "raise the vocabulary size of the text encoder"
                )


def build_cli(args: Sequence[str], *, run: bool = True) -> PretrainCLI:
    """Build (and with ``run``, fit) from CLI-style ``args`` (``--config X --trainer.k=v``)."""
    return PretrainCLI(
        PretrainModule,
        ShardDataModule,
        args=["fit", *args] if run else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def run_pretrain(config: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """Fit from a YAML config; returns the last checkpoint's path and a few figures."""
    cli = build_cli(["--config", str(config), *overrides])
    trainer = cli.trainer
    ckpt = Path(trainer.default_root_dir) / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return ckpt, {"steps": int(trainer.global_step), "extra": _final_losses(metrics)}


def _final_losses(metrics: dict[str, float]) -> dict[str, float]:
    keep = ("train/loss", "train/loss_contrastive", "train/loss_mim", "val/loss")
    return {k.replace("/", "_"): round(v, 4) for k, v in metrics.items() if k in keep}


def main(argv: Sequence[str]) -> int:
    """Entry of `foundation pretrain ...` (arguments after the sub-command)."""
    build_cli(list(argv))
    return 0
