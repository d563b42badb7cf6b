"""FSDP on CPU: ``TransformerFSDPStrategy`` (FSDP2, gloo) trains a tiny PretrainModule on two
processes with one unit per transformer block and activation checkpointing, writes a sharded
checkpoint, and one process resumes it (resharding on load) with the same parameters. Under
bf16 the blocks compute in bf16 from fp32 shards, and an EMA kept shard by shard equals the
EMA of the full weights, resumes from the sharded checkpoint and encodes once gathered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import PairDataset, collate, tiny_module

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


def test_mixed_precision_policy_follows_trainer_precision():
    bf16, fp32 = torch.bfloat16, torch.float32
    mixed = cluster.fsdp_mixed_precision("bf16-mixed")
    assert (mixed.param_dtype, mixed.reduce_dtype) == (bf16, fp32)
    assert cluster.fsdp_mixed_precision("32-true").param_dtype is None  # no cast: fp32
    assert cluster.fsdp_mixed_precision("bf16-true").param_dtype is None  # already bf16
    pure = cluster.fsdp_mixed_precision("32-true", "bfloat16", "bfloat16")
    assert (pure.param_dtype, pure.reduce_dtype) == (bf16, bf16)
    assert cluster.fsdp_mixed_precision("bf16-mixed", "float32").param_dtype == fp32
    with pytest.raises(ValueError, match="16-mixed"):
        cluster.fsdp_mixed_precision("16-mixed")
    with pytest.raises(ValueError, match="param_dtype"):
        cluster.TransformerFSDPStrategy(param_dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce_dtype"):
        cluster.TransformerFSDPStrategy(reduce_dtype="float16")  # type: ignore[arg-type]


EMA_PROBE = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from foundation.training.ema import ModelEMA

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
live = nn.Linear(4, 4, bias=False)
ema = ModelEMA(live, decay=0.5)
live.weight = nn.Parameter(distribute_tensor(live.weight.detach() + 1, mesh, [Shard(0)]))
try:
    ema.update(live, step=100)
except RuntimeError as e:
    print("refused:", e)
w = distribute_tensor(ema.module.weight.detach(), mesh, [Shard(0)])
ema.module.weight = nn.Parameter(w, requires_grad=False)
before = w.full_tensor().clone()
ema.update(live, step=100)
print("moved:", float((ema.module.weight.full_tensor() - before).abs().max()))
dist.destroy_process_group()
"""


def test_ema_refuses_weights_sharded_unlike_it():
    r = subprocess.run(
        [sys.executable, "-c", EMA_PROBE],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused: EMA parameter weight is not sharded like the weight" in r.stdout
    assert "moved: 0.5" in r.stdout  # sharded alike: lerp of the local shards, decay 0.5


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


def _ema_of(history: list, start: dict[str, torch.Tensor], decay: float) -> dict:
    """The EMA of the full weights, step by step, as ``ModelEMA.update`` defines it."""
    ema = {k: start[k].clone() for k in history[0][1]}
    for step, params in history:
        d = min(decay, (1 + step) / (10 + step))
        for k in ema:
            ema[k].lerp_(params[k], 1.0 - d)
    rename = {"vision_proj.": "ema.module.proj.", "vision.": "ema.module.vision."}
    out = {}
    for k, v in ema.items():
        prefix = next(p for p in rename if k.startswith(p))
        out[rename[prefix] + k[len(prefix) :]] = v
    return out


@pytest.mark.slow
def test_bf16_policy_and_sharded_ema_then_resume(tmp_path):
    run_worker(tmp_path, "--devices", "2", "--steps", "3", "--precision", "bf16-mixed", "--ema")
    two = json.loads((tmp_path / "report-3.json").read_text())
    # bf16-mixed -> bf16 all-gathers and compute, fp32 shards (master copy) and fp32 gradients
    assert two["policy"] == ["torch.bfloat16", "torch.float32"]
    assert two["compute_dtypes"] == [["torch.bfloat16", "torch.bfloat16"]]  # (input, weight)
    assert two["param_dtypes"] == ["torch.float32"] and two["grad_dtypes"] == ["torch.float32"]
    assert all(map(torch.isfinite, torch.tensor(two["losses"])))
    # the EMA is one frozen unit (its blocks are neither units nor checkpointed), sharded as
    # the weights it averages
    assert two["ema_is_unit"] and two["ema_units"] == 1 and two["ema_checkpointed"] == 0
    assert two["blocks"] == 5 and two["ema_qkv_local_shape"] == two["qkv_local_shape"]

    # resume on 2 ranks without autocast: bf16 compute and bf16 reduce-scatter (gloo has it)
    ckpt = tmp_path / "step=3.ckpt"
    pure = ["--param-dtype", "bfloat16", "--reduce-dtype", "bfloat16", "--ema"]
    run_worker(tmp_path, "--devices", "2", "--steps", "5", "--resume", str(ckpt), *pure)
    resumed = json.loads((tmp_path / "report-5.json").read_text())
    assert resumed["policy"] == ["torch.bfloat16", "torch.bfloat16"]
    assert resumed["compute_dtypes"] == [["torch.bfloat16", "torch.bfloat16"]]
    assert resumed["param_dtypes"] == ["torch.float32"]
    assert resumed["start_step"] == 3 and all(map(torch.isfinite, torch.tensor(resumed["losses"])))

    first, second = torch.load(tmp_path / "params-3.pt"), torch.load(tmp_path / "params-5.pt")
    assert any(k.startswith("ema.module.vision.blocks.0.") for k in first["end"])
    for k in first["end"]:  # weights and EMA restored from the sharded checkpoint
        assert torch.equal(first["end"][k], second["start"][k]), k
    # the per-shard EMA, gathered, is the EMA of the full weights over the 5 steps
    expected = _ema_of(first["history"] + second["history"], first["start"], decay=0.9)
    assert [s for s, _ in first["history"] + second["history"]] == [1, 2, 3, 4, 5]
    for k, v in expected.items():
        assert torch.allclose(second["end"][k], v, rtol=0, atol=1e-6), k
    live = "vision.blocks.0.attn.qkv.weight"
    assert not torch.allclose(second["end"]["ema.module." + live], second["end"][live])

    # gathered into a plain module, the EMA encodes: as a model holding the EMA's weights does
    full = second["end"]
    module = tiny_module(ema=True).eval()
    module.load_state_dict(full)
    ema_weights = {k: v for k, v in full.items() if not k.startswith("ema.")}
    for k in ema_weights:
        if k.startswith("vision_proj."):
            ema_weights[k] = full["ema.module.proj." + k.removeprefix("vision_proj.")]
        elif k.startswith("vision."):
            ema_weights[k] = full["ema.module." + k]
    as_live = tiny_module().eval()
    as_live.load_state_dict(ema_weights)
    batch = collate([PairDataset(2, dims=3, side=16)[i] for i in range(2)])
    with torch.no_grad():
        ema = module.encode_image(batch["image"], batch["modality"], use_ema=True)
        last = module.encode_image(batch["image"], batch["modality"])
        expected_ema = as_live.encode_image(batch["image"], batch["modality"])
    assert torch.isfinite(ema).all() and torch.allclose(ema, expected_ema, atol=1e-6)
    assert not torch.allclose(ema, last, atol=1e-4)  # the average lags the last iterate
