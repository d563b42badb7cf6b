"""Generate docs/configuration.md from the code: config dataclasses and the typed ``__init__``
signatures that LightningCLI turns into YAML sections.

    python scripts/gen_config_reference.py            # rewrite docs/configuration.md
    python scripts/gen_config_reference.py --check    # exit 1 if it is out of date (CI)

Each option's description is the trailing ``# comment`` on its line in the source (dataclass
field or ``__init__`` parameter), else the matching ``name:`` entry of an ``Args:`` docstring
section; add one there, not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "configuration.md"

# (YAML section, "module:object", what it configures). Objects are dataclasses or classes whose
# __init__ is the section's schema.
SECTIONS: list[tuple[str, str, str]] = [
    (
        "pretrain: model",
        "foundation.training.pretrain:PretrainModule",
        "`foundation pretrain --config configs/pretrain/*.yaml`, section `model:`",
    ),
    (
        "pretrain: model.vision",
        "foundation.models.vision:VisionConfig",
        "`model.vision` (also `preset: tiny|small|base|large` plus overrides)",
    ),
    (
        "pretrain: model.text",
        "foundation.models.text:TextConfig",
        "`model.text` (also `preset:`); nothing is downloaded, `pretrained_dir` is local",
    ),
    ("pretrain: data", "foundation.data.datamodule:ShardDataModule", "section `data:`"),
    (
        "pretrain: top level",
        "foundation.training.launch:PretrainCLI.add_arguments_to_parser",
        "run folder and resume options (beside `trainer:`, `model:`, `data:`, `ckpt_path`)",
    ),
    (
        "pretrain: trainer.strategy (FSDP)",
        "foundation.training.cluster:TransformerFSDPStrategy",
        "`class_path: foundation.training.cluster.TransformerFSDPStrategy` (+ ModelParallelStrategy args)",
    ),
    (
        "ingest",
        "foundation.ingest.pipeline:IngestConfig",
        "`foundation ingest --config configs/ingest/*.yaml`",
    ),
    (
        "ingest: preprocess",
        "foundation.ingest.preprocess:PreprocessConfig",
        "section `preprocess:` of an ingest config (recorded in the manifest)",
    ),
    (
        "finetune",
        "foundation.training.finetune:FinetuneConfig",
        "`foundation finetune --config configs/finetune/*.yaml`, top level",
    ),
    ("finetune: tasks[]", "foundation.training.finetune:TaskSpec", "each entry of `tasks:`"),
    ("finetune: data", "foundation.training.finetune:DataConfig", "section `data:`"),
    ("finetune: labels", "foundation.training.finetune:LabelsConfig", "section `labels:`"),
    ("finetune: encoder", "foundation.training.finetune:EncoderConfig", "section `encoder:`"),
    ("finetune: split", "foundation.training.finetune:SplitConfig", "section `split:`"),
    ("finetune: train", "foundation.training.finetune:TrainConfig", "section `train:`"),
    ("finetune: eval", "foundation.training.finetune:EvalConfig", "section `eval:`"),
]


# Meanings for options whose source has no comment or docstring entry yet (the source wins as
# soon as it has one). Keep short; check against the code when editing.
FALLBACK: dict[str, dict[str, str]] = {
    "foundation.training.pretrain:PretrainModule": {
        "vision": "VisionConfig fields (see model.vision)",
        "text": "TextConfig fields (see model.text)",
        "embed_dim": "shared image/report embedding size of the contrastive loss",
        "loss": "contrastive loss: softmax CLIP or sigmoid SigLIP (features gathered across ranks)",
        "w_contrastive": "weight of the contrastive loss",
        "w_mim": "weight of the masked-image loss (0: no decoder)",
        "mask_ratio": "share of patches dropped before the encoder (MAE/FLIP)",
        "mask_seed": "seed of the masks (a function of seed, step, micro-batch, rank: exact resume)",
        "decoder_dim": "width of the light MAE decoder",
        "decoder_depth": "blocks of the MAE decoder",
        "decoder_heads": "attention heads of the MAE decoder",
        "norm_pix_loss": "MAE target: per-patch normalised pixels",
        "lr": "peak learning rate (AdamW)",
        "weight_decay": "AdamW weight decay (not on norms, biases, embeddings)",
        "warmup_steps": "linear warm-up steps",
        "max_steps": "length of the cosine schedule (set equal to trainer.max_steps)",
        "min_lr_ratio": "final learning rate as a share of lr",
        "betas": "AdamW betas",
        "proj_norm": "'batchnorm': standardise pooled features before the projections "
        "(SimCLR/MoCo v3 heads), statistics kept per dimensionality; see researchers.md, "
        "modality plateau",
        "cross_dims_negatives": "the last batch of the other dimensionality (2D/3D) joins each "
        "batch's contrastive loss as detached negatives: an X-ray is ranked against CT reports",
        "contrastive_masked": "contrastive loss on the masked pass (FLIP); false: on its own "
        "unmasked pass (costlier; small 2D grids)",
        "ema": "keep an EMA of the vision encoder and projection",
        "ema_decay": "EMA decay per optimiser step",
        "compile": "torch.compile each transformer block",
        "lineage": "extra lineage entries recorded in checkpoints (secret-looking keys dropped)",
    },
    "foundation.models.vision:VisionConfig": {
        "patch_size_2d": "pixels per patch side (Conv2d stem)",
        "patch_size_3d": "voxels per patch side (Conv3d stem)",
        "in_channels": "1, or the number of CT windows with data.multi_window",
        "dim": "token width",
        "depth": "transformer blocks (shared by 2D and 3D)",
        "heads": "attention heads",
        "mlp_ratio": "MLP hidden width / dim",
        "num_modalities": "size of the modality embedding (CT, MR, XR)",
        "pos_embed": "positional embedding (fixed sin-cos, any grid)",
        "grad_checkpointing": "recompute block activations in backward (off under FSDP's own)",
    },
    "foundation.models.text:TextConfig": {
        "vocab_size": "embedding rows; at least len(tokenizer) (checked at start)",
        "hidden": "BERT hidden size",
        "layers": "BERT layers",
        "heads": "attention heads",
        "intermediate": "BERT MLP width",
        "max_length": "longest report in tokens (longer ones are truncated)",
        "pretrained_dir": "local transformers checkpoint to start from (never a hub name)",
        "freeze": "keep the text encoder fixed",
        "pooling": "cls | mean",
        "grad_checkpointing": "transformers gradient checkpointing",
    },
    "foundation.data.datamodule:ShardDataModule": {
        "manifest": "manifest path, or a list of manifests (same preprocessing and key)",
        "exclusion_list": "opt-out list: its patients are filtered at read time",
        "batch_size": "samples per GPU and step",
        "num_workers": "data-loader processes per GPU",
        "crop_size_3d": "training crop of volumes (X, Y, Z), multiple of patch_size_3d",
        "crop_size_2d": "training size of 2D images (H, W), multiple of patch_size_2d",
        "crop_min_scale_2d": "smallest area share of a random 2D crop (1.0: the whole image, "
        "for findings such as heart size that need both edges of the chest)",
        "ratio_3d": "share of 3D steps (None: in proportion to the data)",
        "crops_per_volume": "random crops taken from each decoded volume",
        "multi_window": "stack every CT window as a channel (set vision.in_channels to match)",
        "ct_windows": "CT windows (level, width) in HU; None: mediastinum, lung, bone. Recorded in "
        "checkpoints: evaluation and fine-tuning reuse them",
        "seed": "seed of shuffling and augmentation (exact resume)",
        "max_report_tokens": "tokens per report given to the text encoder",
        "tokenizer_dir": "tokenizer folder from `foundation tokenizer train`",
        "val_fraction": "share of patients held out for validation (hash of the pseudonym)",
        "shuffle_block": "samples shuffled together within a shard",
        "on_error": "skip (log) or raise on an unreadable sample",
        "shard_url": "URL template for remote shards (webdataset pipe:)",
        "pin_memory": "pin host memory of batches",
        "project": "project id; the dataset must be approved for it (`foundation project`)",
    },
}


def _load(spec: str) -> object:
    module, _, name = spec.partition(":")
    obj: object = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _type_name(t: object) -> str:
    if isinstance(t, str):
        return t
    if t is inspect.Parameter.empty:
        return ""
    text = getattr(t, "__name__", None) if not typing.get_args(t) else None
    return text or str(t).replace("typing.", "")


def _default(value: object) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("'", '"')


def _comments(source: str) -> dict[str, str]:
    """``name: type = default,  # comment`` -> {name: comment} (fields and parameters)."""
    out: dict[str, str] = {}
    for line in source.splitlines():
        m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def _docstring_args(doc: str | None) -> dict[str, str]:
    """``Args:`` entries of a Google-style docstring -> {name: text}."""
    out: dict[str, str] = {}
    if not doc or "Args:" not in doc:
        return out
    current = None
    for line in inspect.cleandoc(doc.split("Args:", 1)[1]).splitlines():
        m = re.match(r"(\w+)(?: \([^)]*\))?: (.*)", line.strip())
        if m and not line.startswith(" " * 8):
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return out


def _rows_dataclass(cls: type) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    notes = _comments(inspect.getsource(cls))
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "location" or not f.init:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                default = "(section below)"
                rows.append(
                    (f.name, _type_name(hints.get(f.name, f.type)), default, notes.get(f.name, ""))
                )
                continue
        rows.append(
            (
                f.name,
                _type_name(hints.get(f.name, f.type)),
                _default(default),
                notes.get(f.name, ""),
            )
        )
    return rows


def _rows_callable(fn: Callable) -> list[tuple[str, str, str, str]]:
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to the annotation text
        hints = {}
    notes = {**_docstring_args(inspect.getdoc(fn)), **_comments(inspect.getsource(fn))}
    rows = []
    for name, p in sig.parameters.items():
        if name in ("self", "args", "kwargs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        rows.append(
            (
                name,
                _type_name(hints.get(name, p.annotation)),
                _default(p.default),
                notes.get(name, ""),
            )
        )
    return rows


def _rows_cli_arguments(fn: Callable) -> list[tuple[str, str, str, str]]:
    """Options a LightningCLI ``add_arguments_to_parser`` adds (recorded on a fake parser)."""
    rows = []

    class Recorder:
        def add_argument(self, flag: str, **kw: object) -> None:
            rows.append(
                (
                    flag.lstrip("-"),
                    _type_name(kw.get("type", str)),
                    _default(kw.get("default")),
                    str(kw.get("help", "")),
                )
            )

    fn(None, Recorder())
    return rows


def section_rows(spec: str) -> list[tuple[str, str, str, str]]:
    obj = _load(spec)
    if dataclasses.is_dataclass(obj):
        rows = _rows_dataclass(obj)  # type: ignore[arg-type]
    elif spec.endswith("add_arguments_to_parser"):
        rows = _rows_cli_arguments(obj)  # type: ignore[arg-type]
    else:
        rows = _rows_callable(obj.__init__ if inspect.isclass(obj) else obj)  # type: ignore[misc]
    notes = FALLBACK.get(spec, {})
    return [(n, t, d, m or notes.get(n, "")) for n, t, d, m in rows]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from the code; do not edit. -->",
        "",
        "Every option of the YAML configs, read from the config dataclasses and the typed",
        "`__init__` signatures LightningCLI builds the `foundation pretrain` schema from. Any",
        "pretraining option can be overridden on the command line (`--model.lr=3e-4`,",
        "`--data.batch_size=16`, `--trainer.max_steps=10`); `foundation finetune` takes",
        "`--set section.key=value`. The `trainer:` section is Lightning's `Trainer` (see its",
        "documentation). Regenerate with `python scripts/gen_config_reference.py`.",
        "",
    ]
    for title, spec, what in SECTIONS:
        lines += [f"## {title}", "", f"{what} — `{spec.replace(':', '.')}`", ""]
        lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
        for name, typ, default, note in section_rows(spec):
            lines.append(f"| `{name}` | {_cell(typ)} | {_cell(default)} | {_cell(note)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python scripts/gen_config_reference.py")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
