"""FSDP on CPU: ``TransformerFSDPStrategy`` (FSDP2, gloo) trains a tiny PretrainModule on two
processes with one unit per transformer block and activation checkpointing, writes a sharded
checkpoint, and one process resumes it (resharding on load) with the same parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foundation.training import cluster

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_worker(out: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)  # Lightning must start the other rank itself
    r = subprocess.run(
        [sys.executable, str(WORKER), str(out), *args],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_strategy_settings():
    s = cluster.TransformerFSDPStrategy()
    assert s._state_dict_type == "sharded" and s._save_distributed_checkpoint
    assert s.activation_checkpointing and s.sharding_strategy == "FULL_SHARD"
    full = cluster.TransformerFSDPStrategy(
        state_dict_type="full", sharding_strategy="SHARD_GRAD_OP"
    )
    assert full._state_dict_type == "full" and not full._save_distributed_checkpoint
    with pytest.raises(ValueError, match="sharding_strategy"):
        cluster.TransformerFSDPStrategy(sharding_strategy="NO_SHARD")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict_type"):
        cluster.TransformerFSDPStrategy(state_dict_type="local")  # type: ignore[arg-type]


@pytest.mark.slow
def test_two_rank_fsdp_then_resume_on_one_rank(tmp_path):
    run_worker(tmp_path, "--devices", "2", "--steps", "3")
    two = json.loads((tmp_path / "report-3.json").read_text())
    # vision 2 blocks + decoder 1 + BERT 2 layers: each its own FSDP unit, each checkpointed
    assert two["world_size"] == 2 and two["blocks"] == 5
    assert two["blocks_sharded"] == 5 and two["blocks_checkpointed"] == 5 and two["root_sharded"]
    # sharded along dim 0 across the two ranks; the optimiser sees full shapes (decay groups)
    assert two["qkv_local_shape"][0] * 2 == two["qkv_shape"][0]
    assert two["decay_group_min_ndim"] == 2
    assert two["plain_params"] == ["contrastive.logit_scale"]  # 0-d: replicated, not sharded
    scales = two["logit_scale_per_rank"]
    assert len(scales) == 2 and scales[0] == scales[1]  # its gradient was averaged over ranks
    assert two["end_step"] == 3 and all(map(torch.isfinite, torch.tensor(two["losses"])))

    ckpt = tmp_path / "step=3.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank

    run_worker(tmp_path, "--devices", "1", "--steps", "5", "--resume", str(ckpt))
    one = json.loads((tmp_path / "report-5.json").read_text())
    assert one["world_size"] == 1 and one["start_step"] == 3 and one["end_step"] == 5
    assert one["qkv_local_shape"] == one["qkv_shape"]  # the whole tensor on the one rank
    assert one["optimizer_steps"] == [3]  # AdamW moments restored too
    assert len(one["losses"]) == 2

    saved = torch.load(tmp_path / "params-3.pt")["end"]
    resumed = torch.load(tmp_path / "params-5.pt")
    assert saved.keys() == resumed["start"].keys()
    for k in saved:
        assert torch.equal(saved[k], resumed["start"][k]), k
    moved = [k for k in saved if not torch.equal(saved[k], resumed["end"][k])]
    assert "vision.blocks.0.attn.qkv.weight" in moved and len(moved) > len(saved) // 2
