"""Export a pretraining checkpoint's encoders and load them back without Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from foundation.models.export import (
    CheckpointError,
    export_encoder,
    load_encoder,
    load_vision_encoder,
)
from foundation.training.pretrain import PretrainModule

SECRET = "export-test-secret-key-0123456789"
LINEAGE = {
    "dataset": "unit",
    "manifest_version": "unit-v2",
    "exclusion_version": "excl-7",
    "preprocessing": {"version": "p1", "policy": {"ct_spacing": [1.5, 1.5, 1.5]}},
    "key_id": "fp01",
    "pseudonym_key": SECRET,  # must be dropped by every writer
}


class _Pairs(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "image": torch.rand(1, 16, 16, 16, generator=g),
            "modality": torch.tensor(0),
            "input_ids": torch.randint(5, 60, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
        }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PretrainModule, Path]:
    root = tmp_path_factory.mktemp("export")
    L.seed_everything(0)
    module = PretrainModule(
        vision={"preset": "tiny", "patch_size_2d": 8, "patch_size_3d": 8},
        text={"preset": "tiny", "vocab_size": 64, "max_length": 16},
        embed_dim=32, decoder_dim=32, decoder_depth=1, decoder_heads=2, warmup_steps=1,
        lineage=LINEAGE,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, DataLoader(_Pairs(), batch_size=2))
    path = root / "m.ckpt"
    trainer.save_checkpoint(path)
    return module.eval(), path


def _tokenizer(tmp: Path) -> Path:
    from foundation.data.tokenizer import train_tokenizer

    train_tokenizer(["coeur normal", "cardiomégalie modérée", "calcifications"], tmp, vocab_size=60)
    return tmp


@torch.no_grad()
def test_export_then_load_gives_identical_outputs(trained, tmp_path: Path) -> None:
    module, ckpt = trained
    out = export_encoder(ckpt, tmp_path / "enc")
    assert {p.name for p in out.iterdir()} == {"vision.safetensors", "config.json"}
    encoder = load_encoder(out)  # one call, no Lightning
    assert not encoder.training
    g = torch.Generator().manual_seed(0)
    for image, modality in (
        (torch.rand(2, 1, 16, 16, 16, generator=g), torch.tensor([0, 1])),
        (torch.rand(3, 1, 32, 24, generator=g), torch.tensor([2, 2, 2])),
    ):
        expected = module.vision(image, modality)
        got = encoder(image, modality)
        assert torch.equal(got.tokens, expected.tokens)
        assert torch.equal(got.pooled, expected.pooled)
    config = json.loads((out / "config.json").read_text())
    lineage = config["lineage"]
    assert lineage["manifest_version"] == "unit-v2" and lineage["exclusion_version"] == "excl-7"
    assert lineage["preprocessing"] == LINEAGE["preprocessing"]
    assert config["vision"]["dim"] == module.vision.cfg.dim


def test_export_holds_no_key(trained, tmp_path: Path) -> None:
    _, clean = trained
    # A checkpoint written by older code, with secrets where a lineage or hparams could hold them.
    ckpt = torch.load(clean, weights_only=False)
    ckpt["foundation"]["lineage"]["pseudonym_key"] = SECRET
    ckpt["foundation"]["lineage"]["preprocessing"]["hmac_secret"] = SECRET
    ckpt["hyper_parameters"]["key_file"] = SECRET
    dirty = tmp_path / "dirty.ckpt"
    torch.save(ckpt, dirty)
    assert SECRET.encode() in dirty.read_bytes()
    out = export_encoder(dirty, tmp_path / "enc", tokenizer_dir=_tokenizer(tmp_path / "tok"))
    assert json.loads((out / "config.json").read_text())["lineage"]["key_id"] == "fp01"
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data, path.name
            assert b"pseudonym_key" not in data, path.name


def test_text_encoder_and_tokenizer_are_exported(trained, tmp_path: Path) -> None:
    from transformers import AutoModel

    from foundation.data.tokenizer import load_tokenizer

    module, ckpt = trained
    out = export_encoder(ckpt, tmp_path / "enc", tokenizer_dir=_tokenizer(tmp_path / "tok"))
    config = json.loads((out / "config.json").read_text())
    assert config["text"]["dir"] == "text" and config["text"]["config"]["pooling"] == "cls"
    tok = load_tokenizer(out / "tokenizer")
    text = AutoModel.from_pretrained(str(out / "text"), local_files_only=True).eval()
    enc = tok(["coeur normal"], return_tensors="pt")
    with torch.no_grad():
        got = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        want = module.text.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-6)


def test_the_tokenizer_the_run_trained_with_is_exported_without_asking(trained, tmp_path) -> None:
    _, clean = trained
    ckpt = torch.load(clean, weights_only=False)
    ckpt["datamodule_hyper_parameters"] = {"tokenizer_dir": str(_tokenizer(tmp_path / "tok"))}
    torch.save(ckpt, tmp_path / "with_data.ckpt")
    out = export_encoder(tmp_path / "with_data.ckpt", tmp_path / "enc")
    assert json.loads((out / "config.json").read_text())["text"]["dir"] == "text"
    assert (out / "tokenizer").is_dir()
    # moved since: the vision encoder is exported, the text one is not, and it says why
    ckpt["datamodule_hyper_parameters"] = {"tokenizer_dir": str(tmp_path / "gone")}
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.warns(UserWarning, match="gone.*is not there"):
        out = export_encoder(tmp_path / "moved.ckpt", tmp_path / "enc2")
    assert json.loads((out / "config.json").read_text())["text"] is None


def test_an_export_is_replaced_whole_or_not_at_all(trained, tmp_path: Path) -> None:
    _, ckpt = trained
    out = export_encoder(ckpt, tmp_path / "enc", tokenizer_dir=_tokenizer(tmp_path / "tok"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="tokenizer directory not found"):
        export_encoder(ckpt, out, tokenizer_dir=tmp_path / "missing")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the failed export touched nothing
    assert not list(tmp_path.glob(".enc.*"))
    export_encoder(ckpt, out)  # a vision-only export replaces the earlier one, text and all
    assert not (out / "text").exists() and not (out / "tokenizer").exists()
    for name, files in (
        ("notes", {"readme.txt": "mine"}),  # another library's model folder:
        ("hf", {"config.json": '{"model_type": "bert"}', "model.bin": "w"}),
    ):
        other = tmp_path / name
        other.mkdir()
        for f, text in files.items():
            (other / f).write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match="not an export; refusing"):
            export_encoder(ckpt, other)
        assert {p.name: p.read_text(encoding="utf-8") for p in other.iterdir()} == files
    # an export that died mid-swap: the earlier one is put back before the next export runs
    (out).rename(tmp_path / ".enc.replaced")
    (tmp_path / ".enc.exporting").mkdir()
    export_encoder(ckpt, out)
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".enc.*"))


def test_exported_dir_and_state_dict_files_load_as_encoders(trained, tmp_path: Path) -> None:
    module, ckpt = trained
    out = export_encoder(ckpt, tmp_path / "enc")
    loaded = load_vision_encoder(out)
    assert loaded.lineage["dataset"] == "unit"
    assert torch.equal(loaded.model.cls_token, module.vision.cls_token)
    # A bare safetensors state dict needs the config from the caller.
    loaded = load_vision_encoder(out / "vision.safetensors", module.vision.cfg)
    assert torch.equal(loaded.model.norm.weight, module.vision.norm.weight)


def test_load_encoder_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a foundation-encoder export"):
        load_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_vision_encoder(tmp_path / "missing.ckpt")
