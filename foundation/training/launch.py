"""`foundation pretrain`: LightningCLI over ``PretrainModule`` + ``ShardDataModule``.

The YAML in ``configs/pretrain/`` holds the trainer, model and data sections; any key can be
overridden on the command line (``--trainer.max_steps=10``). ``--ckpt_path`` resumes model,
optimiser, scheduler, step and the data stream's position.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from foundation.data.datamodule import ShardDataModule
from foundation.training import cluster
from foundation.training.pretrain import PretrainModule


class PretrainCLI(LightningCLI):
    """LightningCLI with the project's defaults: a run folder, resume, requeue on SIGUSR1."""

    run_dir: Path | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="run folder (logs, checkpoints); stable across requeues",
        )
        parser.add_argument(
            "--runs_root", type=str, default="runs", help="parent of generated run folders"
        )
        parser.add_argument(
            "--resume",
            type=Literal["auto", "never"],
            default="auto",
            help="auto: resume from the run folder's newest checkpoint",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(str(self.subcommand), self.config)
        configs = cfg.get("config") or []
        config_file = str(configs[0]) if configs else None
        run_dir = cfg.get("run_dir") or cfg.trainer.get("default_root_dir")
        self.run_dir = cluster.resolve_run_dir(config_file, run_dir, cfg.get("runs_root", "runs"))
        place_in_run_dir(cfg, self.run_dir)
        if self.subcommand == "fit" and not cfg.get("ckpt_path") and cfg.get("resume") == "auto":
            latest = cluster.latest_checkpoint(self.run_dir)
            if latest is not None:
                rank_zero_info(f"resuming from {latest}")
                cfg.ckpt_path = str(latest)

    def instantiate_trainer(self, **kwargs: Any):
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            plugins = cluster.cluster_plugins()
            if plugins:
                kwargs.setdefault("plugins", plugins)
        trainer = super().instantiate_trainer(**kwargs)
        if self.run_dir is not None:
            trainer.callbacks.append(cluster.RequeueOnSignal(self.run_dir / cluster.CHECKPOINT_DIR))
        return trainer

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
        record_training_use(dm, self.trainer, "pretrain")


def record_training_use(dm: Any, trainer: Any, action: str) -> None:
    """Append the use of a dataset by a training run (and its project) to the audit log."""
    if not getattr(trainer, "is_global_zero", True) or not getattr(dm, "manifest_paths", None):
        return
    from foundation.governance import audit

    manifest = dm.manifest  # loads and checks the manifest(s): revoked or unapproved fails here
    audit.append(
        audit.default_log_path(dm.manifest_paths[0]),
        action,
        dataset=manifest.dataset,
        dataset_version=manifest.version,
        project=getattr(dm, "project", None),
        run_dir=str(getattr(trainer, "default_root_dir", "")),
    )


def place_in_run_dir(cfg: Any, run_dir: Path) -> None:
    """Point the trainer, its file loggers and its ModelCheckpoints at ``run_dir`` (in place,
    on the parsed config, so the saved config.yaml says where everything went)."""
    trainer = cfg.trainer
    trainer.default_root_dir = str(run_dir)
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        args = getattr(lg, "init_args", None)
        if args is not None and "save_dir" in args:
            # one version_<n> per launch/requeue: a requeue never overwrites earlier metrics
            args.save_dir, args.name = str(run_dir), cluster.LOG_DIR
            if "version" in args:
                args.version = None
    callbacks = trainer.get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        name = str(getattr(cb, "class_path", ""))
        args = getattr(cb, "init_args", None)
        if name.endswith("ModelCheckpoint") and args is not None and not args.get("dirpath"):
            args.dirpath = str(run_dir / cluster.CHECKPOINT_DIR)


class _NoCloudTrackerTip(logging.Filter):
    """Lightning suggests a cloud experiment tracker at every start; on a health-data cluster
    metrics stay on site, and the suggestion should not reach the researchers' logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


def _quiet_cloud_tip() -> None:
    # Also Lightning's caution that an IterableDataset's __len__ may be wrong with several
    # workers: the stream plans every worker's share, so its length is exact by construction.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoCloudTrackerTip) for f in log.filters):
            log.addFilter(_NoCloudTrackerTip())


def build_cli(args: Sequence[str], *, run: bool = True) -> PretrainCLI:
    """Build (and with ``run``, fit) from CLI-style ``args`` (``--config X --trainer.k=v``)."""
    _quiet_cloud_tip()
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
