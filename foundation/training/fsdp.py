"""FSDP2 for the transformers: one ``fully_shard`` unit per block, and a Lightning strategy.

``TransformerFSDPStrategy`` (FSDP2, ``fully_shard``) shards each transformer block (vision
``Block``, text ``BertLayer``), optionally checkpoints their activations, casts parameters to
bf16 for compute (``MixedPrecisionPolicy``, fp32 master copy), shards an EMA copy like the
weights it averages, writes reshardable distributed checkpoints; runs on CPU/gloo too; typed so
YAML can select it (``class_path: foundation.training.cluster.TransformerFSDPStrategy``, the
name re-exported there, or ``foundation.training.fsdp.TransformerFSDPStrategy``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

log = logging.getLogger(__name__)


def transformer_block_classes() -> set[type]:
    """The layers FSDP wraps one by one: the vision/decoder ``Block`` and the text ``BertLayer``."""
    from transformers.models.bert.modeling_bert import BertLayer

    from foundation.models.vision import Block

    return {Block, BertLayer}


FSDP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def fsdp_mixed_precision(
    trainer_precision: str,
    param_dtype: Literal["auto", "bfloat16", "float32"] = "auto",
    reduce_dtype: Literal["float32", "bfloat16"] = "float32",
) -> MixedPrecisionPolicy:
    """FSDP2's casting policy for a Trainer ``precision``.

    ``param_dtype="auto"`` is bf16 under ``"bf16-mixed"`` (all-gathers and compute in bf16;
    autocast stays on for the ops it keeps in fp32) and no cast otherwise (``"32-true"``:
    fp32; ``"bf16-true"``: the parameters themselves are bf16). The sharded parameters, the
    optimiser state and the gradients it reads keep the parameters' own dtype (the master
    copy); ``reduce_dtype`` is the dtype gradients are reduce-scattered in. fp16 is refused:
    it needs loss scaling, which is not wired for sharded gradients here.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if trainer_precision.startswith("16"):
        raise ValueError(
            f"precision {trainer_precision!r} is not supported with FSDP here: use "
            "'bf16-mixed' (recommended), '32-true' or 'bf16-true'"
        )
    if param_dtype != "auto" and param_dtype not in FSDP_DTYPES:
        raise ValueError(f"param_dtype must be auto, bfloat16 or float32, got {param_dtype!r}")
    if reduce_dtype not in FSDP_DTYPES:
        raise ValueError(f"reduce_dtype must be float32 or bfloat16, got {reduce_dtype!r}")
    if param_dtype == "auto":
        param = torch.bfloat16 if trainer_precision == "bf16-mixed" else None
    else:
        param = FSDP_DTYPES[param_dtype]
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=FSDP_DTYPES[reduce_dtype])


def shard_transformer_blocks(
    module: nn.Module,
    mesh: DeviceMesh | None = None,
    activation_checkpointing: bool = True,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    block_classes: set[type] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> list[nn.Parameter]:
    """FSDP2 (``fully_shard``) in place: one unit per transformer block, then ``module`` as root.

    Each block optionally recomputes its activations in backward (composable ``checkpoint``,
    which keeps parameter names, so checkpoints do not depend on it). An EMA copy
    (``ModelEMA``) is one frozen unit of its own: sharded like the weights it averages (so its
    update is local to each rank) and never all-gathered, as it never runs forward. 0-d
    parameters (the contrastive loss's temperature and bias) cannot be sharded: they stay
    replicated on every rank and their gradients are averaged by a hook on a process group of
    their own. ``mp_policy`` (``fsdp_mixed_precision``) applies to every unit. Call it on every
    rank after ``init_process_group``; returns those replicated parameters.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from foundation.training.ema import ModelEMA

    classes = tuple(block_classes or transformer_block_classes())
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    kwargs: dict[str, Any] = {"mesh": mesh, "offload_policy": offload}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    emas = [m for m in module.modules() if isinstance(m, ModelEMA)]
    in_ema = {id(m) for e in emas for m in e.modules()}
    blocks = [m for m in module.modules() if isinstance(m, classes) and id(m) not in in_ema]
    if not blocks:
        raise ValueError(f"no transformer block ({', '.join(c.__name__ for c in classes)}) found")
    for block in blocks:
        if activation_checkpointing:
            checkpoint(block)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    for ema in emas:
        fully_shard(ema, **kwargs)
    scalars = [p for p in module.parameters() if p.ndim == 0 and p.requires_grad]
    fully_shard(module, ignored_params=set(scalars), **kwargs)
    group = torch.distributed.new_group(backend=torch.distributed.get_backend())
    world = torch.distributed.get_world_size(group)
    for p in scalars:
        # Tensor hook (not post-accumulate): each micro-batch's gradient is averaged once, as
        # FSDP averages the sharded ones, so gradient accumulation stays right.
        p.register_hook(lambda g: _all_reduce_mean(g, group, world))
    return scalars


def _all_reduce_mean(grad: Tensor, group: Any, world: int) -> Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=group)  # SUM: gloo has no AVG
    return grad.div_(world)


class TransformerFSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism with one unit per transformer block (vision, decoder and text).

    Built on Lightning's ``ModelParallelStrategy`` (``fully_shard``, 1-D mesh over all ranks):
    parameters are DTensors with their full shapes, so the optimiser's weight-decay groups are
    the same as under DDP, and it runs on CPU (gloo) as on GPU (NCCL). The model's forward is
    entered for every step (``training_step`` is routed through the root module's ``__call__``),
    so FSDP gathers the root's own parameters (stems, projections, embeddings) before use.
    ``activation_checkpointing`` recomputes each block's activations in backward (keep the
    models' own ``grad_checkpointing`` off then). ``state_dict_type="sharded"`` writes a
    distributed checkpoint (a folder), which loads on a different number of ranks.

    Precision: with the Trainer's ``precision="bf16-mixed"`` every unit gets a
    ``MixedPrecisionPolicy`` with bf16 parameters for compute (half the all-gather traffic, no
    per-op weight casts) and fp32 gradient reduction, while the sharded parameters and AdamW
    state stay fp32; Lightning's autocast stays on and only keeps its fp32 ops (norms, softmax,
    losses) in fp32. ``precision="32-true"`` with ``param_dtype="bfloat16"`` is the same without
    autocast (torchtitan's way: every op in bf16 except what the model upcasts itself).
    """

    def __init__(
        self,
        activation_checkpointing: bool = True,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] = "FULL_SHARD",
        cpu_offload: bool = False,
        param_dtype: Literal["auto", "bfloat16", "float32"] = "auto",
        reduce_dtype: Literal["float32", "bfloat16"] = "float32",
        **kwargs: Any,
    ) -> None:
        """Args:
        activation_checkpointing: recompute each block's activations in backward
        state_dict_type: sharded (distributed checkpoint folder, reshardable) or full (rank 0)
        sharding_strategy: FULL_SHARD (ZeRO-3) or SHARD_GRAD_OP (ZeRO-2, blocks kept gathered)
        cpu_offload: keep parameters, gradients and optimiser state on the CPU (slow)
        param_dtype: dtype parameters are all-gathered and computed in; auto: bfloat16 under
            the Trainer's precision bf16-mixed, else the parameters' own (see class docstring)
        reduce_dtype: dtype gradients are reduce-scattered in (float32: sums free of bf16 rounding)
        kwargs: ``ModelParallelStrategy``'s (``process_group_backend``, ``timeout``)
        """
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(
                f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}"
            )
        if sharding_strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise ValueError(f"unsupported sharding_strategy {sharding_strategy!r}")
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.activation_checkpointing = activation_checkpointing
        self.sharding_strategy = sharding_strategy
        self.cpu_offload = cpu_offload
        fsdp_mixed_precision("32-true", param_dtype, reduce_dtype)  # fail at construction
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.block_classes = transformer_block_classes()

    @property
    def _state_dict_type(self) -> str:
        return "sharded" if self._save_distributed_checkpoint else "full"

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = (
                self.num_nodes * self.num_processes
            )  # one mesh dim: all ranks
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        # After configure_model (which may compile blocks), before the optimiser is built.
        mp_policy = self.mixed_precision_policy()
        if self.global_rank == 0:
            log.info(
                "FSDP: compute in %s, gradients reduced in %s (Trainer precision %s)",
                mp_policy.param_dtype or "the parameters' dtype",
                mp_policy.reduce_dtype,
                self.precision_plugin.precision,
            )
        shard_transformer_blocks(
            self.lightning_module,
            self.device_mesh["data_parallel"],
            activation_checkpointing=self.activation_checkpointing,
            reshard_after_forward=self.sharding_strategy == "FULL_SHARD",
            cpu_offload=self.cpu_offload,
            block_classes=self.block_classes,
            mp_policy=mp_policy,
        )
        super().setup(trainer)

    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        """The ``fully_shard`` casting policy for this strategy and the Trainer's precision."""
        precision = getattr(self.precision_plugin, "precision", "32-true")
        return fsdp_mixed_precision(precision, self.param_dtype, self.reduce_dtype)

    def _through_root(self, context: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        # The LightningModule is the root FSDP module: only a call to it runs FSDP's root hooks.
        with context:
            return self._forward_redirection(
                self.model, self.lightning_module, method, *args, **kwargs
            )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.precision_plugin.train_step_context()
        return self._through_root(ctx, "training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.precision_plugin.val_step_context()
        return self._through_root(ctx, "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.precision_plugin.test_step_context()
        return self._through_root(ctx, "test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.precision_plugin.predict_step_context()
        return self._through_root(ctx, "predict_step", *args, **kwargs)
