"""Zero-shot retrieval of a pretraining checkpoint, against the same model at random init.

Held-out patients are those of the pretraining run's own validation split (the data module's
patient-level hash split), minus excluded patients, so no held-out study was seen in training.
The randomly initialised model has the checkpoint's architecture and is built with a fixed
seed, so the comparison isolates what pretraining learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foundation.data.stream import in_val_split
from foundation.data.tokenizer import load_tokenizer
from foundation.evaluation.retrieval import evaluate_retrieval
from foundation.models.export import lineage_of
from foundation.privacy.exclusion import ExclusionList
from foundation.shards.manifest import Manifest
from foundation.training.pretrain import PretrainModule


def heldout_patients(
    manifest: str | Path, val_fraction: float, exclusion_list: str | Path | None = None
) -> set[str]:
    """Patients of the validation split of ``manifest`` that are not excluded."""
    excluded = ExclusionList.load(exclusion_list).pseudonyms if exclusion_list else frozenset()
    return {
        p
        for p in Manifest.load(manifest).patients()
        if in_val_split(p, val_fraction) and p not in excluded
    }


def data_record(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The data module's hyperparameters and the data lineage a checkpoint records."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return dict(ckpt.get("datamodule_hyper_parameters") or {}), lineage_of(ckpt)


def retrieval_vs_random(
    checkpoint: str | Path,
    manifest: str | Path,
    tokenizer_dir: str | Path,
    *,
    val_fraction: float | None = None,
    exclusion_list: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k on held-out patients for the checkpoint and for a random init of its model."""
    checkpoint = Path(checkpoint)
    data, lineage = data_record(checkpoint)
    fraction = val_fraction if val_fraction is not None else float(data.get("val_fraction", 0.05))
    patients = heldout_patients(manifest, fraction, exclusion_list or data.get("exclusion_list"))
    if not patients:  # retrieval on training patients would measure memory, not transfer
        raise ValueError(
            f"{checkpoint}: no held-out patient of {manifest} to retrieve on (validation share "
            f"{fraction}); pretrain with data.val_fraction > 0 (or give retrieval_vs_random one)"
        )
    sizes = {
        3: tuple(data.get("crop_size_3d", (96, 96, 96))),
        2: tuple(data.get("crop_size_2d", (224, 224))),
    }
    max_length = int(data.get("max_report_tokens", 256))
    tokenizer = load_tokenizer(tokenizer_dir)
    trained = PretrainModule.load_from_checkpoint(checkpoint, map_location="cpu")
    torch.manual_seed(seed)
    random_init = PretrainModule(**{k: v for k, v in trained.hparams.items()})
    out: dict[str, Any] = {"heldout_patients": len(patients)}
    for name, module in (("pretrained", trained), ("random_init", random_init)):
        with torch.no_grad():
            out[name] = evaluate_retrieval(
                module,
                str(manifest),
                tokenizer,
                patients,
                image_size=sizes,
                max_length=max_length,
                report_sections=data.get("report_sections"),
                lineage=lineage,  # the CT windows of pretraining, for both models
                source=str(checkpoint),
            )
    return out
