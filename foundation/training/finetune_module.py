"""The Lightning path of fine-tuning: a vision encoder trained through with a multi-task head.

:class:`FinetuneModule` covers ``frozen`` (attention pooling on a fixed encoder), ``last_k``
(the last k blocks and the final norm trainable) and ``full`` (every layer, with layer-wise lr
decay). The unit of training is the series (each carries its study's label);
:func:`predict_studies` averages a study's series predictions into one per study. Probes on
cached embeddings take the other path (``foundation.evaluation.probe``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from foundation.data.labels import LabelledSamples
from foundation.models.heads import MultiTaskHead, TaskSpec
from foundation.models.vision import VisionTransformer
from foundation.training.finetune_config import FREEZE_MODES, TrainConfig


class FinetuneModule(L.LightningModule):
    """Vision encoder + pooled multi-task head, with frozen / last-k / full (LLRD) training."""

    def __init__(
        self,
        vision: VisionTransformer,
        tasks: list[TaskSpec],
        pooling: str = "cls",
        freeze: str = "frozen",
        unfreeze_last_k: int = 1,
        layer_decay: float = 0.75,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ):
        super().__init__()
        if freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, not {freeze!r}")
        self.vision = vision
        self.tasks = tasks
        self.head = MultiTaskHead(vision.embed_dim, tasks, pooling)
        self.freeze, self.layer_decay = freeze, layer_decay
        self.lr, self.weight_decay = lr, weight_decay
        self.losses: list[float] = []  # training loss per step (for tests and reports)
        self.val_losses: list[float] = []  # validation loss per epoch (train_module)
        self.best_epoch: int | None = None  # the epoch whose weights train_module kept
        self.vision.requires_grad_(freeze == "full")
        if freeze == "last_k":
            k = max(1, unfreeze_last_k)
            for block in list(vision.blocks)[-k:]:
                block.requires_grad_(True)
            vision.norm.requires_grad_(True)

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision.parameters())

    def train(self, mode: bool = True) -> FinetuneModule:
        super().train(mode)
        if self.encoder_frozen:
            self.vision.eval()  # a frozen encoder keeps eval behaviour (no dropout)
        return self

    def forward(self, image: Tensor, modality: Tensor) -> dict[str, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            tokens = self.vision(image, modality).tokens  # (B, 1 + N, D)
        return self.head(tokens).outputs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _ = self.head.loss(self(batch["image"], batch["modality"]), batch["targets"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, _ = self.head.loss(self(batch["image"], batch["modality"]), batch["targets"])
        # averaged over ranks: every rank then keeps the same best epoch
        self.log("val/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)

    def layer_id(self, name: str) -> int:
        """0 for embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
        depth = len(self.vision.blocks)
        if name.startswith("vision.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("vision.") and not name.startswith("vision.norm"):
            return 0
        return depth + 1

    def param_groups(self) -> list[dict]:
        """AdamW groups with layer-wise lr decay (full fine-tune) and no decay on 1-d params."""
        depth = len(self.vision.blocks)
        groups: dict[tuple[int, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            lid = self.layer_id(name)
            scale = self.layer_decay ** (depth + 1 - lid) if self.freeze == "full" else 1.0
            no_decay = p.ndim <= 1 or "cls_token" in name or "modality_embed" in name
            g = groups.setdefault(
                (lid, no_decay),
                {
                    "params": [],
                    "lr": self.lr * scale,
                    "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else self.weight_decay,
                },
            )
            g["params"].append(p)
        return list(groups.values())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(), lr=self.lr)


def _collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "modality": torch.stack([i["modality"] for i in items]),
        "targets": {n: torch.stack([i["targets"][n] for i in items]) for n in items[0]["targets"]},
        "study": [i["study"] for i in items],
    }


def series_items(
    data: LabelledSamples, tasks: list[TaskSpec], studies: set[str], modality: int
) -> list[dict]:
    """One training item per series of ``studies``: image, modality index, encoded targets."""
    items = []
    for i, study in enumerate(data.sample_study):
        if study in studies:
            row = data.rows[study]
            items.append(
                {
                    "image": data.images[i],  # type: ignore[index]
                    "modality": torch.tensor(modality, dtype=torch.long),
                    "targets": {
                        t.name: torch.tensor(t.encode(row), dtype=torch.float32) for t in tasks
                    },
                    "study": study,
                }
            )
    return items


class KeepBestWeights(L.Callback):
    """Keeps, in memory, the weights of the epoch with the lowest ``val/loss`` and puts them
    back when fitting ends: the test split is predicted by the model the validation split
    chose, not by whatever the last epoch left (``val_losses``: one per epoch)."""

    def __init__(self) -> None:
        self.best_epoch: int | None = None
        self.val_losses: list[float] = []
        self._best = math.inf
        self._state: dict[str, Tensor] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking:
            return
        value = float(loss)
        self.val_losses.append(value)
        if math.isfinite(value) and value < self._best:  # a diverged (NaN) epoch never wins
            self._best, self.best_epoch = value, trainer.current_epoch
            self._state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)


def train_module(
    module: FinetuneModule, train_items: list[dict], val_items: list[dict], cfg: TrainConfig
) -> FinetuneModule:
    """Fit ``module`` with a CPU/GPU Lightning trainer (no logger, no checkpoints); with
    validation items, the weights of the best validation epoch are the ones returned
    (``module.best_epoch``, ``module.val_losses``)."""
    from torch.utils.data import DataLoader

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loader = DataLoader(train_items, batch_size=cfg.batch_size, shuffle=True, collate_fn=_collate)
    val = (
        DataLoader(val_items, batch_size=cfg.batch_size, collate_fn=_collate) if val_items else None
    )
    best = KeepBestWeights()
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=[best],
    )
    trainer.fit(module, loader, val)
    module.best_epoch, module.val_losses = best.best_epoch, best.val_losses
    return module


@torch.no_grad()
def predict_studies(module: FinetuneModule, items: list[dict], batch_size: int) -> dict[str, dict]:
    """``{task: {study: prediction}}``: the mean of each study's series predictions."""
    module.eval()
    sums: dict[str, dict[str, Tensor]] = {t.name: {} for t in module.tasks}
    counts: dict[str, int] = {}
    for i in range(0, len(items), batch_size):
        batch = _collate(items[i : i + batch_size])
        outputs = module(batch["image"], batch["modality"])
        for t in module.tasks:
            pred = t.decode(outputs[t.name]).reshape(len(batch["study"]), -1)
            for study, p in zip(batch["study"], pred, strict=True):
                sums[t.name][study] = sums[t.name].get(study, 0) + p
        for study in batch["study"]:
            counts[study] = counts.get(study, 0) + 1
    return {n: {s: (v / counts[s]).tolist() for s, v in d.items()} for n, d in sums.items()}
