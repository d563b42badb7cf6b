"""Cluster runs: run folders, requeue on SIGUSR1 with resume, two torchrun "nodes" on CPU,
FSDP strategy and the cluster configs, the SLURM ingest array's submission."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from fixtures_cluster import (  # noqa: F401
    REPO,
    TINY_CONFIG,
    cpu_trainer,
    tiny_dataset,
    tiny_overrides,
)
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.demos.boring_classes import BoringModel

from foundation.training import cluster

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "pretrain",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    path.chmod(0o755)


def steps_logged(run_dir: Path, version: int) -> list[int]:
    path = run_dir / "logs" / f"version_{version}" / "metrics.csv"
    with path.open(newline="", encoding="utf-8") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")})


# ---- run folders, plugins, requeue command -----------------------------------------------------


def test_run_dir_is_stable_across_requeues(tmp_path):
    env = {"SLURM_JOB_ID": "77"}
    first = cluster.resolve_run_dir("configs/pretrain/ct_base.yaml", runs_root=tmp_path, env=env)
    assert first.name.startswith("ct_base-") and first.name.endswith("-j77")
    first.mkdir()
    time.sleep(1.1)  # a later attempt gets a later time but must find the same folder
    again = cluster.resolve_run_dir("configs/pretrain/ct_base.yaml", runs_root=tmp_path, env=env)
    assert again == first
    other = cluster.resolve_run_dir("ct_base.yaml", runs_root=tmp_path, env={"SLURM_JOB_ID": "78"})
    assert other != first
    explicit = cluster.resolve_run_dir("x.yaml", tmp_path / "mine", runs_root=tmp_path, env=env)
    assert explicit == tmp_path / "mine"
    from_env = cluster.resolve_run_dir("x.yaml", env={"FOUNDATION_RUN_DIR": "/r/x"})
    assert from_env == Path("/r/x")


def test_job_token():
    assert cluster.job_token({"SLURM_JOB_ID": "5"}) == "j5"
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}
    assert cluster.job_token(array) == "j5_2"
    assert cluster.job_token({"TORCHELASTIC_RUN_ID": "none"}) is None  # torchrun's default
    assert cluster.job_token({"TORCHELASTIC_RUN_ID": "abc"}) == "tabc"
    assert cluster.job_token({}) is None


def test_latest_checkpoint_is_the_newest(tmp_path):
    assert cluster.latest_checkpoint(tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for i, name in enumerate(["last.ckpt", "preempted-step=7.ckpt", "notes.txt"]):
        (ckpts / name).write_text("x")
        os.utime(ckpts / name, ns=(i * 10**9, i * 10**9))
    assert cluster.latest_checkpoint(tmp_path).name == "preempted-step=7.ckpt"
    (ckpts / "sharded.ckpt").mkdir()  # FSDP distributed checkpoints are folders
    assert cluster.latest_checkpoint(tmp_path).name == "sharded.ckpt"


def test_cluster_plugins_and_requeue_command():
    (plugin,) = cluster.cluster_plugins(SLURM_ENV)
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    assert cluster.cluster_plugins({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "bash"}) == []
    assert cluster.cluster_plugins({}) == []
    assert cluster.requeue_command(SLURM_ENV) == ["scontrol", "requeue", "4242"]
    array = {"SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}
    assert cluster.requeue_command(array) == ["scontrol", "requeue", "5_2"]
    assert cluster.requeue_command({}) is None
    with pytest.raises(ValueError):
        cluster.requeue_command({"SLURM_JOB_ID": "1; rm -rf /"})


# ---- requeue on SIGUSR1 -------------------------------------------------------------------------


class SignalAt(L.Callback):
    """Sends SIGUSR1 to this process after training batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_saves_requeues_stops_and_resumes(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/requeued')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    ckpts = tmp_path / "run" / "checkpoints"
    requeue = cluster.RequeueOnSignal(ckpts)

    def trainer(max_steps, callbacks):
        return cpu_trainer(max_steps, callbacks=callbacks)

    torch.manual_seed(0)
    t1 = trainer(50, [SignalAt(3), requeue])
    t1.fit(BoringModel())
    # The signal arrived after step 3's batch: checkpoint at that boundary, then a clean stop
    # (the handler only sets a flag; the callback acts at the next batch end).
    assert t1.global_step < 50
    assert requeue.saved is not None and requeue.saved.is_file()
    assert requeue.saved.name == f"preempted-step={t1.global_step}.ckpt"
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is not requeue._handler  # handler restored

    latest = cluster.latest_checkpoint(tmp_path / "run")
    assert latest == requeue.saved
    t2 = trainer(t1.global_step + 2, [])
    seen: list[int] = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.global_step)

    t2.callbacks.append(Steps())
    t2.fit(BoringModel(), ckpt_path=latest)
    assert seen == [t1.global_step, t1.global_step + 1]  # resumed, not restarted


@pytest.mark.slow
def test_sigusr1_to_a_slurm_training_process_then_requeued_run_resumes(tiny_dataset, tmp_path):  # noqa: F811
    """The real command under a faked SLURM step: SIGUSR1 -> checkpoint, `scontrol requeue`,
    exit 0; the relaunch (same job id) finds the run folder and resumes from that step."""
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/requeued')
    env = {**os.environ, **SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable,
        "-m",
        "foundation.cli",
        "pretrain",
        "--config",
        str(TINY_CONFIG),
        *tiny_overrides(tiny_dataset),
        f"--runs_root={tmp_path / 'runs'}",
        "--model.max_steps=1000",
    ]
    proc = subprocess.Popen(
        [*cmd, "--trainer.max_steps=1000"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("tiny-*-j4242/logs/version_0/hparams.yaml")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    (run_dir,) = (tmp_path / "runs").glob("tiny-*-j4242")
    (saved,) = (run_dir / "checkpoints").glob("preempted-step=*.ckpt")
    step = int(saved.stem.split("=")[1])
    assert 0 < step < 1000
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]

    rerun = subprocess.run(
        [*cmd, f"--trainer.max_steps={step + 2}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Resumed at the preemption step: exactly the two steps left to max_steps=step+2 ran (a
    # restart from an earlier step would run more). The logger's step label is Lightning's
    # batches-that-stepped counter, which its restart adds one to when the signal landed on an
    # epoch's last batch (short epochs under tiny.yaml's ratio_3d): [step, step+1] or one later.
    logged = steps_logged(run_dir, 1)
    assert len(logged) == 2 and logged[0] in (step, step + 1) and logged[1] == logged[0] + 1


# ---- two torchrun "nodes" on CPU ----------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_nodes_then_one_process_resumes(tiny_dataset, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(tiny_dataset), "--model.max_steps=20"]
    env = {**os.environ, "PYTHON": sys.executable}
    two = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "torchrun_local.sh"),
            str(run_dir),
            *args,
            "--trainer.max_steps=3",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    log0 = (run_dir / "node0.log").read_text()
    assert "MEMBER: 1/2" in log0 and "MEMBER: 2/2" in (run_dir / "node1.log").read_text()
    assert steps_logged(run_dir, 0) == [0, 1, 2]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3

    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "foundation.cli",
            "pretrain",
            *args,
            f"--run_dir={run_dir}",
            "--trainer.max_steps=5",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "Restored all states" in one.stderr + one.stdout
    assert steps_logged(run_dir, 1) == [3, 4]


# ---- FSDP and the cluster configs ---------------------------------------------------------------


def test_fsdp_strategy_wraps_every_transformer_block():
    """Settings only; tests/test_fsdp.py trains, saves sharded and resumes on CPU (gloo)."""
    from transformers.models.bert.modeling_bert import BertLayer

    from foundation.models.vision import Block

    s = cluster.TransformerFSDPStrategy(activation_checkpointing=True)
    assert s._state_dict_type == "sharded"
    assert s.block_classes == {Block, BertLayer} and s.activation_checkpointing
    off = cluster.TransformerFSDPStrategy(activation_checkpointing=False, state_dict_type="full")
    assert not off.activation_checkpointing and off._state_dict_type == "full"


@pytest.mark.parametrize("name", ["tiny", "ct_base", "multimodal_large"])
def test_pretrain_configs_parse(name):
    """Every shipped pretraining config parses against the code (no model is built)."""
    from jsonargparse import ActionConfigFile

    from foundation.data.datamodule import ShardDataModule
    from foundation.models.text import TextConfig
    from foundation.models.vision import VisionConfig
    from foundation.training.launch import PretrainCLI
    from foundation.training.pretrain import PretrainModule

    parser = L.pytorch.cli.LightningArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(PretrainModule, "model")
    parser.add_lightning_class_args(ShardDataModule, "data")
    PretrainCLI.add_arguments_to_parser(None, parser)  # type: ignore[arg-type]
    cfg = parser.parse_args(["--config", str(REPO / "configs" / "pretrain" / f"{name}.yaml")])
    VisionConfig.from_any(
        cfg.model.vision.as_dict() if hasattr(cfg.model.vision, "as_dict") else cfg.model.vision
    )
    TextConfig.from_any(
        cfg.model.text.as_dict() if hasattr(cfg.model.text, "as_dict") else cfg.model.text
    )
    strategy = cfg.trainer.strategy
    if name != "tiny":
        assert cfg.trainer.precision == "bf16-mixed"
    if name == "multimodal_large":
        assert strategy.class_path.endswith("TransformerFSDPStrategy")
        s = cluster.TransformerFSDPStrategy(**strategy.init_args.as_dict())
        assert s._state_dict_type == "sharded"
        # bf16-mixed: bf16 all-gathers and compute, fp32 gradient reduction
        policy = cluster.fsdp_mixed_precision(cfg.trainer.precision, s.param_dtype, s.reduce_dtype)
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
        # FSDP checkpoints the blocks: the models' own checkpointing would do it twice
        assert not cfg.model.vision.get("grad_checkpointing", False)


# ---- SLURM ingest array --------------------------------------------------------------------------


def test_ingest_array_submits_parts_then_a_dependent_merge(tmp_path):
    bin_dir = tmp_path / "bin"
    log = tmp_path / "sbatch.log"
    # fake sbatch: log one line per call, answer a job id (array first, then merge)
    fake_command(bin_dir, "sbatch", f'echo "$@" >> {log}; wc -l < {log} | tr -d " "')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    script = REPO / "scripts" / "slurm" / "ingest_array.sbatch"
    r = subprocess.run(
        [
            "bash",
            str(script),
            "submit",
            "3",
            "--input",
            "/pacs",
            "--out",
            "/d/ct",
            "--dataset",
            "ct",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    array_call, merge_call = log.read_text().splitlines()
    assert "--array=0-2" in array_call and "--input /pacs --out /d/ct" in array_call
    assert "--dependency=afterok:1" in merge_call
    parts = [f"/d/ct/data_manifests/ct.part{i:03d}of003.json" for i in range(3)]
    assert f"foundation dataset merge {' '.join(parts)} --out /d/ct/data_manifests/ct.json" in (
        merge_call
    )

    # an array task runs its part: `foundation ingest ... --part i/N`
    fake_command(bin_dir, "foundation", f'echo "$@" > {tmp_path}/ingest.args')
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    task_env = {
        **env,
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_CPUS_PER_TASK": "4",
        "VENV": str(tmp_path / "venv"),
    }
    r = subprocess.run(
        ["bash", str(script), "--input", "/pacs", "--out", "/d/ct"],
        env=task_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "ingest.args").read_text().split()
    assert args[0] == "ingest" and args[-2:] == ["--part", "1/3"]
    assert args[args.index("--workers") + 1] == "4"


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the code; regenerate when a config changes."""
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
