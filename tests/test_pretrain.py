"""PretrainModule with Lightning on CPU: learning, exact resume, DDP, lineage, optimiser groups.

Until the streaming DataModule lands, a stand-in gives a few fixed random samples in the batch
contract: image (B, 1, X, Y, Z) float32, modality (B,), input_ids/attention_mask (B, L), key,
patient. Report i is a fixed token sequence of its own, so (image, report) pairs are learnable.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from fixtures_cluster import cpu_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from foundation.training.pretrain import PretrainModule
from foundation.training.schedule import param_groups, warmup_cosine

VOCAB, LENGTH = 64, 8


class PairDataset(Dataset):
    """``n`` fixed (image, report) pairs; 3D volumes (or 2D images with ``dims=2``)."""

    def __init__(self, n: int, dims: int = 3, side: int = 16):
        g = torch.Generator().manual_seed(1234)
        shape = (n, 1) + (side,) * dims
        self.images = torch.rand(shape, generator=g)
        self.modality = torch.arange(n) % 3
        self.ids = torch.randint(5, VOCAB, (n, LENGTH), generator=g)
        self.ids[:, 0], self.ids[:, -1] = 2, 3  # [CLS] ... [SEP]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "modality": self.modality[i],
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "key": f"s{i}_0",
            "patient": f"p{i}",
        }


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("image", "modality", "input_ids")}
    out["attention_mask"] = torch.stack([it["attention_mask"] for it in items])
    out["key"] = [it["key"] for it in items]
    out["patient"] = [it["patient"] for it in items]
    return out


class StandInDataModule(L.LightningDataModule):
    """Deterministic loader (no shuffle) standing in for the streaming DataModule."""

    def __init__(self, n: int = 8, batch_size: int = 8, dims: int = 3, side: int = 16):
        super().__init__()
        self.n, self.batch_size, self.dims, self.side = n, batch_size, dims, side
        self.lineage = {"exclusion_list_version": "excl-abc", "key_id": "fp01", "secret": "x"}

    def train_dataloader(self) -> DataLoader:
        data = PairDataset(self.n, self.dims, self.side)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, collate_fn=collate)


class StepLoader:
    """An endless stand-in for a streaming loader: batch ``i`` is a fixed function of ``i``."""

    def __init__(
        self,
        start: int,
        n: int = 16,
        batch_size: int = 4,
        mixed: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.data, self.batch_size, self.start = PairDataset(n), batch_size, start
        self.rank, self.world = rank, world  # under DDP each rank reads its own samples
        # mixed: odd steps are 2D batches, as a stream of both dimensionalities gives them
        self.data_2d = PairDataset(n, dims=2, side=32) if mixed else None

    def __iter__(self):
        step = self.start
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            idx = [(first + j) % len(self.data) for j in range(self.batch_size)]
            data = self.data_2d if self.data_2d is not None and step % 2 else self.data
            step += 1
            yield collate([data[i] for i in idx])


class StepDataModule(L.LightningDataModule):
    """Resumes the data where the run was: the loader starts at the restored global step.

    (Lightning builds the loader after restoring the checkpoint. A loader ``state_dict`` would
    be one batch ahead: Lightning prefetches a batch before it saves the state.)
    """

    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        self.mixed = mixed

    def train_dataloader(self) -> StepLoader:
        t = self.trainer
        return StepLoader(t.global_step, mixed=self.mixed, rank=t.global_rank, world=t.world_size)


def tiny_module(**overrides) -> PretrainModule:
    kwargs = dict(
        vision={"preset": "tiny", "patch_size_2d": 8, "patch_size_3d": 8},
        text={"preset": "tiny", "vocab_size": VOCAB, "dropout": 0.0},
        embed_dim=32,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        mask_ratio=0.5,
        lr=2e-3,
        weight_decay=0.01,
        warmup_steps=3,
        max_steps=40,
    )
    kwargs.update(overrides)
    return PretrainModule(**kwargs)


trainer = cpu_trainer


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.losses.append({k: float(metrics[k]) for k in metrics if k.startswith("train/loss")})


def test_tiny_model_learns_the_pairs() -> None:
    L.seed_everything(0)
    rec = LossRecorder()
    trainer(30, callbacks=[rec]).fit(tiny_module(), StandInDataModule())
    first, last = rec.losses[0], rec.losses[-1]
    assert last["train/loss"] < 0.7 * first["train/loss"]
    # 8 pairs: chance is log(8) ~ 2.08; the pairs must be clearly learnt.
    assert first["train/loss_contrastive"] > 1.5
    assert last["train/loss_contrastive"] < 0.5 * first["train/loss_contrastive"]
    assert last["train/loss_mim"] < first["train/loss_mim"]


def _params(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("tiny_yaml_options", [False, True])
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, tiny_yaml_options: bool) -> None:
    # with tiny.yaml's options: 2D and 3D batches, per-dimensionality statistics and the last
    # batch of the other dimensionality as negatives, which the checkpoint must carry
    options = (
        {"proj_norm": "batchnorm", "cross_dims_negatives": True, "contrastive_masked": False}
        if tiny_yaml_options
        else {}
    )
    L.seed_everything(0)
    straight = tiny_module(max_steps=8, **options)
    trainer(8).fit(straight, datamodule=StepDataModule(tiny_yaml_options))

    # The checkpoint is written as a run writes it: by ModelCheckpoint, mid-epoch, at step 4.
    L.seed_everything(0)
    first_half = tiny_module(max_steps=8, **options)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="half", every_n_train_steps=4)
    t = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        callbacks=[saver],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t.fit(first_half, datamodule=StepDataModule(tiny_yaml_options))
    ckpt = tmp_path / "half.ckpt"
    assert ckpt.is_file()
    held = torch.load(ckpt, weights_only=True).get("cross_dims_negatives")
    assert (held is not None and set(held) == {"2", "3"}) is tiny_yaml_options

    L.seed_everything(1)  # a fresh process: other initial weights, other RNG state
    resumed = tiny_module(max_steps=8, **options)
    t2 = trainer(8, tmp_path)
    t2.fit(resumed, datamodule=StepDataModule(tiny_yaml_options), ckpt_path=ckpt)
    assert t2.global_step == 8
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    if tiny_yaml_options:  # the held negatives matter: without them the resumed run differs
        L.seed_everything(1)
        forgetful = tiny_module(max_steps=8, **options)
        forgetful.on_load_checkpoint = lambda checkpoint: None  # type: ignore[method-assign]
        trainer(8, tmp_path).fit(forgetful, datamodule=StepDataModule(True), ckpt_path=ckpt)
        c = _params(forgetful)
        assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert not torch.allclose(a["vision.cls_token"], _params(first_half)["vision.cls_token"])


def test_checkpoint_records_lineage_and_no_secret(tmp_path: Path) -> None:
    module = tiny_module(lineage={"manifest_version": "ds-v3", "hmac_key": "s3cr3t"})
    t = trainer(1, tmp_path)
    t.fit(module, StandInDataModule())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    lineage = ckpt["foundation"]["lineage"]
    assert lineage["manifest_version"] == "ds-v3"
    assert lineage["exclusion_list_version"] == "excl-abc"
    assert lineage["key_id"] == "fp01"
    assert "hmac_key" not in lineage and "secret" not in lineage
    assert "s3cr3t" not in path.read_bytes().decode("latin-1")
    # hparams are plain data: the checkpoint loads and rebuilds the same model
    loaded = PretrainModule.load_from_checkpoint(path)
    assert torch.equal(loaded.vision.cls_token, module.vision.cls_token)


def test_encoders_and_2d_batches() -> None:
    L.seed_everything(0)
    module = tiny_module(loss="siglip", ema=True, ema_decay=0.9)
    trainer(3).fit(module, StandInDataModule(dims=2, side=32))
    module.eval()
    batch = collate([PairDataset(4, dims=2, side=32)[i] for i in range(4)])
    with torch.no_grad():
        img = module.encode_image(batch["image"], batch["modality"])
        ema = module.encode_image(batch["image"], batch["modality"], use_ema=True)
        txt = module.encode_text(batch["input_ids"], batch["attention_mask"], 2)
    assert img.shape == txt.shape == (4, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(img, ema)  # the average lags the last iterate


def test_no_decay_groups_and_schedule() -> None:
    module = tiny_module()
    groups = param_groups(module.named_parameters(), 0.05)
    ids = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(module.named_parameters())
    for name, p in names.items():
        exempt = p.ndim <= 1 or any(
            s in name
            for s in (
                "cls_token",
                "mask_token",
                "modality_embed",
                "position_embeddings",
                "token_type_embeddings",
                "logit_",
            )
        )
        assert ids[id(p)] == (0.0 if exempt else 0.05), name
    assert ids[id(names["vision.blocks.0.attn.qkv.weight"])] == 0.05
    assert ids[id(names["vision.norm.weight"])] == 0.0
    assert ids[id(names["contrastive.logit_scale"])] == 0.0
    # warm-up then cosine to the floor
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert all(
        warmup_cosine(s + 1, 10, 100) <= warmup_cosine(s, 10, 100) + 1e-12 for s in range(10, 99)
    )


def test_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    start = time.perf_counter()
    L.seed_everything(0)
    # tiny.yaml's choices: batch-norm projections and an unmasked contrastive view, plus
    # negatives within a modality (the stand-in batches mix three)
    module = tiny_module(proj_norm="batchnorm", contrastive_masked=False, negatives="same_modality")
    before = module.vision.cls_token.detach().clone()
    t = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    t.fit(module, StandInDataModule(n=8, batch_size=4))
    # ddp_spawn copies the trained weights (not the loop state) back to this process
    after = module.vision.cls_token.detach()
    assert math.isfinite(float(after.sum())) and not torch.equal(before, after)
    norm = module.vision_proj.norms["3d"]  # 3D batches: its running statistics moved off init
    assert int(norm.num_batches_tracked) == 3 and not torch.equal(
        norm.running_var, torch.ones_like(norm.running_var)
    )
    assert time.perf_counter() - start < 120


# ---- text side: tokenizer, encoder, model configs ---------------------------------------------

REPORTS = [
    "Scanner thoracique de [NOM] du [DATE] : nodule de 6 mm du lobe supérieur droit.",
    "Pas d'épanchement pleural. Côtes sans fracture. Contrôle à 3 mois.",
    "IRM cérébrale : pas de lésion ischémique récente. Appeler le [TEL].",
] * 20


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_tokenizer_round_trip(tmp_path: Path, kind: str) -> None:
    from transformers import AutoTokenizer

    from foundation.data.tokenizer import load_tokenizer, train_tokenizer

    tok = train_tokenizer(REPORTS, tmp_path / "tok", vocab_size=400, kind=kind)
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert load_tokenizer(tmp_path / "tok").get_vocab() == tok.get_vocab() == again.get_vocab()
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    enc = again("Vu par [NOM] le [DATE], côte")
    tokens = again.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "[NOM]" in tokens and "[DATE]" in tokens  # placeholders stay whole
    # accents kept (lowercased): the decoded text still reads "côte"
    assert "côte" in again.decode(enc["input_ids"], skip_special_tokens=True)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path / "missing")


def test_text_encoder_pooling_frozen_and_local_checkpoint(tmp_path: Path) -> None:
    from foundation.models.text import TextConfig, TextEncoder

    torch.manual_seed(0)
    cfg = TextConfig.preset("tiny", vocab_size=VOCAB, dropout=0.0, pooling="mean")
    enc = TextEncoder(cfg).eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    out = enc(ids, mask)
    assert out.shape == (2, 64)
    assert torch.allclose(enc(padded_ids, padded_mask), out, atol=1e-5)  # padding is ignored

    enc.model.save_pretrained(tmp_path / "ckpt")
    local = TextEncoder(TextConfig(pretrained_dir=str(tmp_path / "ckpt"), pooling="mean")).eval()
    assert torch.allclose(local(ids, mask), out, atol=1e-5)
    with pytest.raises(OSError):
        TextEncoder(TextConfig(pretrained_dir=str(tmp_path / "nothing-here")))

    frozen = TextEncoder(TextConfig.preset("tiny", vocab_size=VOCAB, freeze=True)).train()
    assert not frozen.model.training and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(ids, mask).requires_grad
    assert frozen.precompute(ids, mask, batch_size=1).shape == (2, 64)


def test_model_configs_build() -> None:
    import yaml

    from foundation.models.text import TextConfig
    from foundation.models.vision import VisionConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "model"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        fields = yaml.safe_load(path.read_text())
        cls = VisionConfig if path.name.startswith("vision") else TextConfig
        assert isinstance(cls.from_any(fields), cls), path.name


def test_no_cloud_tracker_tip_in_training_logs(caplog):
    """Lightning's "try litlogger" tip (a cloud tracker) is dropped; other messages pass."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from foundation.training.launch import _quiet_cloud_tip

    _quiet_cloud_tip()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        rank_zero_info("GPU available: False")
    assert "litlogger" not in caplog.text
    assert "GPU available" in caplog.text


def test_a_locked_text_tower_does_not_alarm_but_a_stray_eval_module_does() -> None:
    import warnings

    def eval_mode_warnings(module: PretrainModule) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(1).fit(module, StandInDataModule())
        return [str(w.message) for w in caught if "in eval mode" in str(w.message)]

    locked = {"preset": "tiny", "vocab_size": VOCAB, "dropout": 0.0, "freeze": True}
    assert eval_mode_warnings(tiny_module(text=locked)) == []
    stray = tiny_module(text=locked)
    stray.vision.blocks[0].eval()  # a mistake the warning exists for
    assert len(eval_mode_warnings(stray)) == 1
