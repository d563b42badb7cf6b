"""Running at cluster scale: run folders, requeue on a signal, resume, plugins, FSDP.

- Run folder: ``<runs_root>/<config-stem>-<YYYYmmdd-HHMMSS>[-<job token>]``. The job token
  (``j<SLURM_JOB_ID>``, or ``t<TORCHELASTIC_RUN_ID>``) makes it stable across requeues: a
  requeued job keeps its id, finds its folder again and resumes from the newest checkpoint in
  it. Launch scripts compute the folder once and pass it (``--run_dir``) so every rank agrees.
- Requeue: ``RequeueOnSignal`` turns SIGUSR1 (``#SBATCH --signal=SIGUSR1@120``) into a flag;
  at the next optimiser-step boundary all ranks agree (one boolean all-reduce), write a
  checkpoint, rank 0 calls ``scontrol requeue`` and the run exits cleanly. Unlike Lightning's
  own handler it never saves from inside a signal handler, i.e. mid-backward or mid-collective.
- Plugins: under SLURM, ``SLURMEnvironment(auto_requeue=False)`` (requeue is ours); under
  ``torchrun`` Lightning picks ``TorchElasticEnvironment`` itself.
- FSDP: ``TransformerFSDPStrategy`` lives in ``foundation.training.fsdp``; it is re-exported
  here, so ``class_path: foundation.training.cluster.TransformerFSDPStrategy`` (configs, SLURM
  scripts, docs) keeps working.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

# Re-exported: configs and scripts name ``foundation.training.cluster.TransformerFSDPStrategy``.
from foundation.training.fsdp import (  # noqa: F401
    FSDP_DTYPES,
    TransformerFSDPStrategy,
    fsdp_mixed_precision,
    shard_transformer_blocks,
    transformer_block_classes,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
PREEMPT_PREFIX = "preempted-step="
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# ---- run folders ------------------------------------------------------------------------------


def job_token(env: Mapping[str, str] | None = None) -> str | None:
    """What identifies this job across requeues: ``j<slurm id>``, ``t<torchelastic id>`` or None."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"j{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"j{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":  # torchrun's default id is the literal "none"
        return "t" + _SAFE.sub("-", run_id)
    return None


def run_name(
    config: str | Path | None, when: dt.datetime | None = None, token: str | None = None
) -> str:
    """``<config-stem>-<YYYYmmdd-HHMMSS>[-<token>]`` (local time)."""
    stamp = (when or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{_stem(config)}-{stamp}" + (f"-{token}" if token else "")


def _stem(config: str | Path | None) -> str:
    return _SAFE.sub("-", Path(config).stem) if config else "run"


def resolve_run_dir(
    config: str | Path | None,
    run_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
    env: Mapping[str, str] | None = None,
) -> Path:
    """The run folder: ``run_dir`` > ``$FOUNDATION_RUN_DIR`` > the folder an earlier attempt of
    this job made under ``runs_root`` (same job token) > a new name. Not created here."""
    env = os.environ if env is None else env
    explicit = run_dir or env.get("FOUNDATION_RUN_DIR")
    if explicit:
        return Path(explicit)
    token = job_token(env)
    root = Path(runs_root)
    if token:
        earlier = sorted(root.glob(f"{_stem(config)}-*-{token}"))
        if earlier:
            return earlier[-1]
    return root / run_name(config, token=token)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest checkpoint of a run (file, or folder for sharded FSDP checkpoints), or None."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


# ---- plugins ----------------------------------------------------------------------------------


def in_slurm_step(env: Mapping[str, str] | None = None) -> bool:
    """True inside an ``srun`` step of a batch job (Lightning's own SLURM detection)."""
    env = os.environ if env is None else env
    if env is os.environ:
        return SLURMEnvironment.detect()
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def cluster_plugins(env: Mapping[str, str] | None = None) -> list[Any]:
    """Trainer plugins for where we run: SLURM gets an environment whose requeue is ours."""
    if in_slurm_step(env):
        return [SLURMEnvironment(auto_requeue=False)]
    return []  # torchrun -> TorchElasticEnvironment, else LightningEnvironment (auto-detected)


# ---- requeue ----------------------------------------------------------------------------------


def requeue_command(env: Mapping[str, str] | None = None) -> list[str] | None:
    """``scontrol requeue <job>`` for this SLURM job, or None outside SLURM."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        job = env["SLURM_JOB_ID"]
    else:
        return None
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError("SLURM job id is not numeric")
    return ["scontrol", "requeue", job]


class RequeueOnSignal(Callback):
    """On ``signum``: checkpoint at the next step boundary, requeue (SLURM), stop cleanly.

    The checkpoint goes to ``<dirpath>/preempted-step=<N>.ckpt``; ``latest_checkpoint`` finds
    it, so the requeued job (same run folder) resumes from step N.
    """

    def __init__(
        self, dirpath: str | Path, signum: int = signal.SIGUSR1, requeue: bool = True
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signum = signal.Signals(signum)
        self.requeue = requeue
        self.received = False
        self.saved: Path | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        # Only a flag: saving here could interrupt a backward pass or a collective.
        self.received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import threading

        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Any rank signalled -> every rank stops (they must take the same branch: the save is
        # collective under DDP/FSDP). One boolean all-reduce per step.
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: wait for the optimiser step
        self.saved = self.dirpath / f"{PREEMPT_PREFIX}{trainer.global_step}.ckpt"
        trainer.save_checkpoint(self.saved)
        if trainer.is_global_zero:
            log.warning("signal %s: checkpoint %s written", self.signum.name, self.saved)
            cmd = requeue_command() if self.requeue else None
            if cmd is not None:
                try:
                    rc = subprocess.call(cmd)
                except OSError as e:
                    rc = f"not run ({e.__class__.__name__})"
                log.warning("requeue %s: %s", " ".join(cmd), rc)
        trainer.should_stop = True
        self.received = False
