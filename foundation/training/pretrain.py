"""Pretraining LightningModule: one 2D/3D vision trunk + a report encoder, CLIP/SigLIP + MIM.

Why this shape: a single masked encoder pass feeds both objectives (FLIP): the CLS token of
the kept patches goes to the contrastive loss against the report, the kept tokens go to a light
MAE decoder that reconstructs the dropped patches. Total loss
``w_contrastive * L_contrastive + w_mim * L_mim``. ``contrastive_masked=False`` gives the
contrastive loss its own unmasked pass instead (the encoder then costs 1 + 1 / (1 - mask_ratio)
times the masked pass alone): on small grids (a 2D image of 8x8 patches) a masked view can drop the very
patches a report describes.

``cross_dims_negatives``: batches are all 2D or all 3D, so the loss never ranks a radiograph
against CT reports; at retrieval it must, and on held-out patients of the demo an image's best
report was of another modality in 15-83 % of the queries, a different share in every run. With
the option, the (detached) embeddings of the last batch of the other dimensionality join each
batch's loss as extra negatives (``foundation.objectives.contrastive``).

Batch contract (see the brief / ``foundation.data``): a dict with ``image`` float32
``(B, C, *spatial)``, ``modality`` int64 ``(B,)``, ``input_ids`` and ``attention_mask`` int64
``(B, L)``, plus ``key`` and ``patient`` lists (unused here, never logged).

Exact resume: masks are drawn from a generator seeded by (mask_seed, optimiser step,
micro-batch, rank), so a resumed run draws the same masks as an uninterrupted one. Dropout still
draws from the global RNG (Lightning does not restore it): keep dropout at 0 (the vision default)
or accept a resume that is exact up to dropout noise; the data position is the datamodule's job.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import warnings
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import foundation
from foundation.models.projection import Projection
from foundation.models.text import TextConfig, TextEncoder
from foundation.models.vision import VisionConfig, VisionTransformer
from foundation.objectives.contrastive import build_contrastive_loss
from foundation.objectives.masked_image import MaskedImageDecoder
from foundation.training.ema import ModelEMA
from foundation.training.held_negatives import load_held, save_held
from foundation.training.schedule import build_optimizer

# Lineage entries whose *name* looks like a secret are dropped (a key fingerprint "key_id" is
# fine; the pseudonymisation key itself must never reach a checkpoint).
_SECRET_NAME = re.compile(r"(^|_)(key|secret|password|token|hmac)(_|$)", re.IGNORECASE)
_ALLOWED_NAMES = {"key_id"}


def _clean_lineage(value: Any) -> Any:
    """Copy of ``value`` without secret-looking entries; bytes are refused (keys are bytes)."""
    if isinstance(value, dict):
        return {
            str(k): _clean_lineage(v)
            for k, v in value.items()
            if str(k) in _ALLOWED_NAMES or not _SECRET_NAME.search(str(k))
        }
    if isinstance(value, list | tuple):
        return [_clean_lineage(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return None
    return value


class PretrainModule(L.LightningModule):
    """Contrastive (image, report) + masked-image pretraining of the vision and text encoders."""

    def __init__(
        self,
        vision: VisionConfig | dict | None = None,
        text: TextConfig | dict | None = None,
        embed_dim: int = 512,
        loss: Literal["clip", "siglip"] = "clip",
        w_contrastive: float = 1.0,
        w_mim: float = 1.0,
        mask_ratio: float = 0.75,
        mask_seed: int = 0,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        norm_pix_loss: bool = True,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 1000,
        max_steps: int = 100_000,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        proj_norm: Literal["none", "batchnorm"] = "none",
        contrastive_masked: bool = True,
        negatives: Literal["batch", "same_modality"] = "batch",
        cross_dims_negatives: bool = False,
        ema: bool = False,
        ema_decay: float = 0.999,
        compile: bool = False,
        lineage: dict | None = None,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if negatives not in ("batch", "same_modality"):
            raise ValueError(f"negatives must be 'batch' or 'same_modality', not {negatives!r}")
        if cross_dims_negatives and negatives == "same_modality":
            raise ValueError(
                "cross_dims_negatives needs negatives='batch' (they are another modality)"
            )
        vcfg, tcfg = VisionConfig.from_any(vision), TextConfig.from_any(text)
        # Plain dicts in hparams: checkpoints load with weights_only and YAML dumps stay readable.
        # The lineage is cleaned of secret-looking entries before it reaches hparams/checkpoints.
        self.save_hyperparameters(ignore=["vision", "text", "lineage"])
        self.save_hyperparameters(
            {"vision": asdict(vcfg), "text": asdict(tcfg), "lineage": _clean_lineage(lineage)}
        )

        self.vision = VisionTransformer(vcfg)
        self.text = TextEncoder(tcfg)
        self.vision_proj = Projection(self.vision.embed_dim, embed_dim, proj_norm)
        self.text_proj = Projection(self.text.embed_dim, embed_dim, proj_norm)
        self.contrastive = build_contrastive_loss(loss)
        self.decoder: MaskedImageDecoder | None = None
        if w_mim > 0 and mask_ratio > 0:
            self.decoder = MaskedImageDecoder(
                self.vision.embed_dim,
                in_channels=vcfg.in_channels,
                patch_size_2d=vcfg.patch_size_2d,
                patch_size_3d=vcfg.patch_size_3d,
                dim=decoder_dim,
                depth=decoder_depth,
                heads=decoder_heads,
                norm_pix_loss=norm_pix_loss,
            )
        self.ema = ModelEMA(self._ema_source(), ema_decay) if ema else None
        # cross_dims_negatives: the detached (image, report) embeddings of the last training
        # batch of each dimensionality (saved with a checkpoint, as the loader position is;
        # under DDP every rank's, see foundation.training.held_negatives).
        self._last_batch_of: dict[int, tuple[Tensor, Tensor]] = {}
        self._last_batch_start: float | None = None

    def _ema_source(self) -> nn.ModuleDict:
        return nn.ModuleDict({"vision": self.vision, "proj": self.vision_proj})

    def configure_model(self) -> None:
        # Compile block by block (as torchtitan does): masking, the positional-table cache and
        # the 2D/3D stems stay eager, so nothing breaks the graphs or triggers recompiles, and
        # one compiled block serves every layer. In-place ``nn.Module.compile`` keeps parameter
        # names, so checkpoints do not depend on whether the run was compiled.
        if not self.hparams.compile:
            return
        blocks = list(self.vision.blocks)
        if self.decoder is not None:
            blocks += list(self.decoder.blocks)
        text_layers = getattr(getattr(self.text.model, "encoder", None), "layer", None)
        blocks += list(text_layers) if text_layers is not None else [self.text.model]
        for block in blocks:
            block.compile()

    # ---- encoders (inference API) -------------------------------------------------------------

    def encode_image(self, image: Tensor, modality: Tensor, use_ema: bool = False) -> Tensor:
        """``(B, C, *spatial)`` -> ``(B, embed_dim)`` L2-normalised, no masking.

        Call under ``eval()`` and ``torch.no_grad()`` for inference; ``use_ema`` reads the EMA
        weights when the module was trained with ``ema=True``.
        """
        if use_ema:
            if self.ema is None:
                raise ValueError("this module was not trained with ema=True")
            vision, proj = self.ema.module["vision"], self.ema.module["proj"]
        else:
            vision, proj = self.vision, self.vision_proj
        return F.normalize(proj(vision(image, modality).pooled, image.ndim - 2), dim=-1)

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor, dims: int | None = None
    ) -> Tensor:
        """``(B, L)`` ids and mask -> ``(B, embed_dim)`` L2-normalised.

        ``dims`` (2 or 3): the dimensionality of the images these reports go with; needed when
        ``proj_norm="batchnorm"`` (each dimensionality has its own statistics, see
        ``foundation.models.projection``), ignored otherwise.
        """
        pooled = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled, dims), dim=-1)

    # ---- training -----------------------------------------------------------------------------

    def _mask_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        # Seeded by the optimiser step (restored on resume), the micro-batch within a step
        # (gradient accumulation) and the rank; batch_idx itself restarts differently on resume.
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = batch_idx % accumulate
        seed = np.random.SeedSequence(
            [self.hparams.mask_seed, self.global_step, micro, self.global_rank]
        ).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(seed))

    def compute_losses(
        self, batch: dict, mask_ratio: float, batch_idx: int = 0
    ) -> dict[str, Tensor]:
        """``loss`` (weighted total), ``loss_contrastive``, ``loss_mim`` (when masked), and the
        detached embeddings ``_img``/``_txt``; usable outside a Trainer (benchmarks)."""
        image, modality = batch["image"], batch["modality"]
        if not self.hparams.contrastive_masked and self.decoder is None:
            mask_ratio = 0.0  # no MIM decoder to read a masked pass: one unmasked pass only
        gen = self._mask_generator(image.device, batch_idx) if mask_ratio > 0 else None
        out = self.vision(image, modality, mask_ratio=mask_ratio, generator=gen)
        # FLIP: the masked pass also feeds the contrastive loss; else a second, unmasked pass
        pooled = out.pooled
        if out.mask is not None and not self.hparams.contrastive_masked:
            pooled = self.vision(image, modality).pooled
        dims = len(out.grid)  # batches are homogeneous: all 2D or all 3D
        img = F.normalize(self.vision_proj(pooled, dims), dim=-1)  # (B, E)
        txt = self.encode_text(batch["input_ids"], batch["attention_mask"], dims)  # (B, E)
        groups = modality if self.hparams.get("negatives", "batch") == "same_modality" else None
        extra_img = extra_txt = None
        cross = self.hparams.get("cross_dims_negatives", False) and self.training
        if cross and (5 - dims) in self._last_batch_of:  # the other dimensionality's last batch
            extra_img, extra_txt = (t.to(img.device) for t in self._last_batch_of[5 - dims])
        l_c = self.contrastive(img.float(), txt.float(), groups, extra_img, extra_txt)
        if cross:
            self._last_batch_of[dims] = (img.detach().float(), txt.detach().float())
        hp = self.hparams
        losses = {"loss_contrastive": l_c}
        total = hp.w_contrastive * l_c
        if self.decoder is not None and out.mask is not None:
            l_m = self.decoder(out, image)
            losses["loss_mim"] = l_m
            total = total + hp.w_mim * l_m
        # Batches are 2D or 3D, so one patch stem and one MIM head sit idle each step; a zero-
        # weighted term gives them a (zero) gradient, which keeps DDP's reducer static (no
        # find_unused_parameters) and lets ranks hold batches of different dimensionality.
        losses["loss"] = total + 0.0 * sum(p.sum() for p in self._idle_parameters(dims))
        losses["_img"], losses["_txt"] = img.detach(), txt.detach()
        return losses

    def _idle_parameters(self, spatial_dims: int) -> list[nn.Parameter]:
        idle = [self.vision.patch_embed_3d if spatial_dims == 2 else self.vision.patch_embed_2d]
        if self.decoder is not None:
            idle.append(self.decoder.head_3d if spatial_dims == 2 else self.decoder.head_2d)
        return [p for m in idle for p in m.parameters() if p.requires_grad]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch, self.hparams.mask_ratio, batch_idx)
        bs = batch["image"].shape[0]
        for name, value in losses.items():
            if not name.startswith("_"):
                self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs)
        self.log("train/temperature", 1.0 / self.contrastive.scale().detach(), batch_size=bs)
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return losses["loss"]

    def on_fit_start(self) -> None:
        # A locked text tower stays in eval mode (no dropout) by design: Lightning's caution
        # about modules in eval mode at the start of training would only alarm. Silenced for
        # exactly that count, and only when every module in eval mode is the tower's, so any
        # other module left in eval mode is still reported.
        idle = [m for m in self.modules() if not m.training]
        tower = set(map(id, self.text.modules()))
        if self.text.cfg.freeze and idle and all(id(m) in tower for m in idle):
            warnings.filterwarnings(
                "ignore", message=rf"Found {len(idle)} module\(s\) in eval mode"
            )

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Throughput from batch start to batch start: includes data loading, which is the point.
        now = time.perf_counter()
        if self._last_batch_start is not None:
            dt = now - self._last_batch_start
            n = batch["image"].shape[0] * self.trainer.world_size
            self.log("train/step_time_s", dt, batch_size=n)
            self.log("train/samples_per_s", n / dt, prog_bar=True, batch_size=n)
        self._last_batch_start = now

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        # After each optimiser step only (not after every accumulated micro-batch).
        if self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update(self._ema_source(), self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Unmasked pass: the encoder as it will be used; report-retrieval top-1 in the batch.
        losses = self.compute_losses(batch, 0.0, batch_idx)
        img, txt = losses["_img"], losses["_txt"]
        top1 = (img @ txt.T).argmax(dim=1).eq(torch.arange(len(img), device=img.device))
        bs = img.shape[0]
        self.log("val/loss_contrastive", losses["loss_contrastive"], sync_dist=True, batch_size=bs)
        self.log("val/top1_image_to_text", top1.float().mean(), sync_dist=True, batch_size=bs)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt, sched = build_optimizer(
            self,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            warmup_steps=hp.warmup_steps,
            max_steps=hp.max_steps,
            min_lr_ratio=hp.min_lr_ratio,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- lineage ------------------------------------------------------------------------------

    def lineage(self) -> dict:
        """Data lineage of this run: the ``lineage`` hyperparameter, then the datamodule's."""
        lineage = dict(self.hparams.lineage or {})
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        lineage.update(getattr(dm, "lineage", None) or {})
        return _clean_lineage(lineage)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["foundation"] = {
            "code_version": foundation.__version__,
            "lineage": self.lineage(),
            # when the weights were saved: `foundation audit run` lists requests that came after
            "saved": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        # resume draws the same extra negatives as a straight run; collective under DDP, so
        # the condition is the same on every rank (a rank may hold nothing yet)
        if self.hparams.get("cross_dims_negatives", False):
            save_held(self._last_batch_of, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a Trainer restoring a run resumes; load_from_checkpoint (export, evaluate) does not
        self._last_batch_of = load_held(checkpoint, resuming=self._trainer is not None)
