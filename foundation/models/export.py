"""Encoder weights in and out: read a vision encoder from any checkpoint, export it, load it.

Reading (:func:`load_vision_encoder`) accepts a Lightning pretraining checkpoint (``.ckpt``),
an exported encoder directory, or a bare state dict, and adapts the key prefixes training
wrappers add ("vision.", "model.vision.", "encoder.", "module.", "_orig_mod." from
``torch.compile``). Missing and unexpected keys are reported plainly; a missing weight is an
error, never a silently random layer.

Exporting (:func:`export_encoder`) writes ``vision.safetensors`` + ``config.json`` (the
:class:`VisionConfig` and the data lineage: dataset, manifest and exclusion versions,
preprocessing), and, when a tokenizer directory is given or recorded, the text encoder in
transformers format with its tokenizer. :func:`load_encoder` rebuilds the
:class:`VisionTransformer` in one call, without Lightning. No pseudonymisation key, key file
path or other secret-looking hyperparameter is ever written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from foundation.models.vision import VisionConfig, VisionTransformer

EXPORT_FORMAT = "foundation-encoder"
EXPORT_VERSION = 1
# Wrapper prefixes stripped wherever they sit at the front of a key.
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.", "model.")
# The vision encoder's own prefix inside a larger module; "" for a bare encoder state dict.
VISION_PREFIXES: tuple[str, ...] = ("vision.", "encoder.", "visual.", "image_encoder.", "")
_SECRETISH = ("key", "secret", "password", "token_file")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot give a complete encoder; the message names the file."""


@dataclass
class LoadReport:
    """What loading a state dict into the encoder matched, missed and left over."""

    source: str
    prefix: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    other_components: int = 0  # keys of other modules (text encoder, heads): ignored

    def __str__(self) -> str:
        lines = [
            f"{self.source}: loaded {self.loaded} tensors (prefix {self.prefix or '<none>'!r}), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{self.other_components} of other components ignored"
        ]
        if self.missing:
            lines.append("  missing: " + ", ".join(self.missing[:20]))
        if self.unexpected:
            lines.append("  unexpected: " + ", ".join(self.unexpected[:20]))
        return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (checkpoint identity for embedding caches)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip_wrappers(key: str) -> str:
    key = key.replace("._orig_mod.", ".")  # a compiled submodule: vision._orig_mod.blocks...
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def adapt_state_dict(
    state: dict[str, torch.Tensor], expected: set[str], source: str = "state dict"
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map ``state`` onto the ``expected`` encoder keys, choosing the best-matching prefix."""
    cleaned = {_strip_wrappers(k): v for k, v in state.items()}
    best: tuple[int, str, dict[str, torch.Tensor]] | None = None
    for prefix in VISION_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in cleaned.items() if k.startswith(prefix)}
        hits = len(expected & set(sub))
        if best is None or hits > best[0]:
            best = (hits, prefix, sub)
    assert best is not None
    _, prefix, sub = best
    if not prefix:  # bare state dict: keys of modules the encoder does not have are not its own
        roots = {k.split(".")[0] for k in expected}
        sub = {k: v for k, v in sub.items() if k.split(".")[0] in roots}
    report = LoadReport(
        source=source,
        prefix=prefix,
        loaded=len(expected & set(sub)),
        missing=sorted(expected - set(sub)),
        unexpected=sorted(set(sub) - expected),
        other_components=len(cleaned) - len(sub),
    )
    return {k: v for k, v in sub.items() if k in expected}, report


def load_state_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing: bool = False
) -> LoadReport:
    """Load ``state`` into ``model`` after prefix adaptation; raise on missing keys or shapes."""
    own = model.state_dict()
    adapted, report = adapt_state_dict(state, set(own), source)
    bad = [k for k, v in adapted.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for {bad[:10]} (another model size?)")
    if report.missing and not allow_missing:
        raise CheckpointError(str(report))
    if report.unexpected:
        warnings.warn(str(report), stacklevel=2)
    model.load_state_dict(adapted, strict=False)
    return report


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a checkpoint on CPU (full unpickling only for our own .ckpt files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Lightning checkpoints keep hyperparameters as Python objects (dataclass configs).
        return torch.load(path, map_location="cpu", weights_only=False)


def _find_vision_config(hparams: Any) -> VisionConfig | None:
    """A VisionConfig (object or field dict) among the checkpoint's hyperparameters."""
    if isinstance(hparams, VisionConfig):
        return hparams
    if not isinstance(hparams, dict):
        return None
    for name in ("vision", "vision_config", "vision_cfg", "vision_encoder"):
        value = hparams.get(name)
        if isinstance(value, VisionConfig):
            return value
        if isinstance(value, dict):
            try:
                return VisionConfig.from_any(value)
            except (TypeError, ValueError):
                continue
    for value in hparams.values():  # nested (e.g. {"model": {"vision": {...}}})
        if isinstance(value, dict):
            found = _find_vision_config(value)
            if found is not None:
                return found
    return None


def lineage_of(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """``checkpoint["foundation"]["lineage"]``, or None for older checkpoints."""
    info = ckpt.get("foundation")
    return info.get("lineage") if isinstance(info, dict) else None


@dataclass
class LoadedEncoder:
    """A vision encoder and where it came from."""

    model: VisionTransformer
    lineage: dict[str, Any] | None
    identity: str  # content hash of the weights file, or "random:<seed>"
    report: LoadReport | None = None
    source: str = "random init"  # the checkpoint or export it was read from (for errors)


def load_vision_encoder(
    source: str | Path | None,
    vision_cfg: VisionConfig | dict | None = None,
    *,
    seed: int = 0,
    allow_missing: bool = False,
) -> LoadedEncoder:
    """Vision encoder from a ``.ckpt``, an exported directory, or random init (``source=None``).

    ``vision_cfg`` is needed for random init and for checkpoints whose hyperparameters do not
    hold a VisionConfig; otherwise the checkpoint's own config wins.
    """
    if source is None:
        if vision_cfg is None:
            raise ValueError("random init needs a vision config (e.g. {'preset': 'tiny'})")
        torch.manual_seed(seed)
        return LoadedEncoder(
            VisionTransformer(VisionConfig.from_any(vision_cfg)), None, f"random:{seed}"
        )
    path = Path(source)
    if path.is_dir():
        model = load_encoder(path)
        info = json.loads((path / "config.json").read_text(encoding="utf-8"))
        identity = file_sha256(path / "vision.safetensors")
        return LoadedEncoder(model, info.get("lineage"), identity, source=str(path))
    if path.suffix == ".safetensors":
        state, ckpt = load_file(str(path)), {}
    else:
        ckpt = read_checkpoint(path)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    cfg = _find_vision_config(ckpt.get("hyper_parameters", {})) if isinstance(ckpt, dict) else None
    if cfg is None and vision_cfg is not None:
        cfg = VisionConfig.from_any(vision_cfg)
    if cfg is None:
        cfg = _config_via_pretrain_module(path)
    model = VisionTransformer(cfg)
    report = load_state_into(model, state, str(path), allow_missing=allow_missing)
    return LoadedEncoder(model, lineage_of(ckpt), file_sha256(path), report, str(path))


def _config_via_pretrain_module(path: Path) -> VisionConfig:
    try:
        from foundation.training.pretrain import PretrainModule

        module = PretrainModule.load_from_checkpoint(str(path), map_location="cpu")
        return module.vision.cfg
    except Exception as err:  # reported with the file and the reason
        raise CheckpointError(
            f"{path}: no vision config in the checkpoint; give model.vision in the config"
        ) from err


# ---- compatibility with the data ---------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest JSON as a dict (version, preprocessing, key_id ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: manifest is not valid JSON") from err


def manifest_version(manifest: dict[str, Any], path: str | Path) -> str:
    """``<dataset>-v<version>`` from the manifest, else a hash of the manifest file."""
    if manifest.get("version") is not None:
        return f"{manifest.get('dataset', '')}-v{manifest['version']}"
    return file_sha256(path)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_preprocessing(lineage: dict | None, manifest: dict, manifest_path: str | Path) -> None:
    """Refuse an encoder whose recorded preprocessing differs from the manifest's (the diff).

    Encoders without a record (old checkpoints, random init) or manifests without one pass.
    """
    enc = (lineage or {}).get("preprocessing")
    data = manifest.get("preprocessing")
    if not enc or not data:
        return
    flat_e, flat_d = _flatten(enc), _flatten(data)
    diff = {
        k: {"encoder": flat_e.get(k), "data": flat_d.get(k)}
        for k in sorted(set(flat_e) | set(flat_d))
        if flat_e.get(k) != flat_d.get(k)
    }
    if diff:
        raise ValueError(
            f"{manifest_path}: the encoder was pretrained on other preprocessing: {json.dumps(diff)}"
        )


# ---- export -----------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    """JSON-able copy of hyperparameters, without secret-looking entries."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {
            str(k): _json_safe(v)
            for k, v in value.items()
            if str(k) == "key_id" or not any(s in str(k).lower() for s in _SECRETISH)
        }
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return None  # objects (keys, tensors, paths) are dropped rather than stringified


def _recorded_tokenizer(ckpt: Any) -> Path | None:
    """The tokenizer folder a pretraining checkpoint names (its data module's), if any."""
    if not isinstance(ckpt, dict):
        return None
    for section in ("foundation", "datamodule_hyper_parameters", "hyper_parameters"):
        value = (ckpt.get(section) or {}).get("tokenizer_dir")
        if value:
            return Path(value)
    return None


EXPORT_ENTRIES = frozenset({"vision.safetensors", "config.json", "text", "tokenizer"})


def _check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is absent, empty, or an export of ours and nothing
    else (a model folder of another library also has a config.json)."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    others = {p.name for p in out.iterdir()} - EXPORT_ENTRIES
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT or others:
        raise CheckpointError(f"{out}: not empty and not an export; refusing to replace it")


def _replace_export(tmp: Path, out: Path) -> None:
    """Swap the finished export ``tmp`` in at ``out``: the earlier export is moved aside first
    and deleted last, so an interruption leaves one complete export (``_recover`` puts an
    earlier one back)."""
    old = out.with_name(f".{out.name}.replaced")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def _recover(out: Path) -> None:
    """After an export that died mid-swap, put the earlier export back; drop a half build."""
    old = out.with_name(f".{out.name}.replaced")
    if old.exists():
        if out.exists():
            shutil.rmtree(old)
        else:
            old.rename(out)
    tmp = out.with_name(f".{out.name}.exporting")
    if tmp.exists():
        shutil.rmtree(tmp)


def export_encoder(
    ckpt_path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """Export the vision encoder (and text encoder + tokenizer when known) of a checkpoint.

    Writes ``out_dir/vision.safetensors`` and ``out_dir/config.json``; with a tokenizer
    (``tokenizer_dir``, else the one the checkpoint's data module read, when it is still there)
    also ``out_dir/text/`` (transformers format) and ``out_dir/tokenizer/``. The export is
    built beside ``out_dir`` and moved there whole, so a failed export leaves nothing half
    written, and an earlier export at ``out_dir`` is replaced.
    """
    out = Path(out_dir).resolve()  # "." has no name to build beside
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    _check_replaceable(out)  # before any work: a foreign folder is never touched
    tmp = out.with_name(f".{out.name}.exporting")
    tmp.mkdir()
    try:
        loaded = load_vision_encoder(ckpt_path)
        state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(tmp / "vision.safetensors"), metadata={"format": "pt"})
        config: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "vision": dataclasses.asdict(loaded.model.cfg),
            "lineage": _json_safe(loaded.lineage),
            "source_checkpoint_sha256": loaded.identity,
            "text": None,
        }
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else None
        if tok_dir is None:
            recorded = _recorded_tokenizer(read_checkpoint(ckpt_path))
            if recorded is not None and recorded.is_dir():
                tok_dir = recorded
            elif recorded is not None:
                warnings.warn(
                    f"{ckpt_path}: the tokenizer it was trained with ({recorded}) is not there;"
                    " the text encoder is not exported (give --tokenizer)",
                    stacklevel=2,
                )
        if tok_dir is not None:
            config["text"] = _export_text(ckpt_path, tmp, tok_dir)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_export(tmp, out)
    return out


def _export_text(ckpt_path: str | Path, out: Path, tok_dir: Path) -> dict[str, Any]:
    """Text encoder in transformers format + its tokenizer; returns the config entry."""
    if not tok_dir.is_dir():
        raise CheckpointError(f"{tok_dir}: tokenizer directory not found")
    from foundation.training.pretrain import PretrainModule

    module = PretrainModule.load_from_checkpoint(str(ckpt_path), map_location="cpu")
    text = module.text
    text.model.save_pretrained(str(out / "text"), safe_serialization=True)
    shutil.copytree(tok_dir, out / "tokenizer", dirs_exist_ok=True)
    cfg = _json_safe(getattr(text, "cfg", {}))
    if isinstance(cfg, dict):
        cfg["pretrained_dir"] = "text"  # relative to the export directory
    return {"dir": "text", "tokenizer_dir": "tokenizer", "config": cfg}


def load_encoder(directory: str | Path) -> VisionTransformer:
    """Rebuild the exported :class:`VisionTransformer` from ``directory`` (eval mode)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not an exported encoder)")
    info = json.loads(cfg_path.read_text(encoding="utf-8"))
    if info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{cfg_path}: not a {EXPORT_FORMAT} export")
    model = VisionTransformer(VisionConfig(**info["vision"]))
    state = load_file(str(directory / "vision.safetensors"))
    load_state_into(model, state, str(directory / "vision.safetensors"))
    return model.eval()
