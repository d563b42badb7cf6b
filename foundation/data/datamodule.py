"""LightningDataModule over one or more shard manifests (typed for LightningCLI).

- Train/validation split by patient: a stable hash of the pseudonym (``val_fraction``), so no
  patient is in both.
- The stream position travels in Lightning checkpoints (``state_dict``): batches are counted in
  ``on_before_batch_transfer`` of training steps, in the main process, i.e. what was trained on.
- ``preprocessing`` exposes the manifests' preprocessing spec so the LightningModule records it;
  manifests with different specs or keys are refused, and so is a revoked manifest (the error
  names the version to use instead).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L

from foundation.data.encoder_input import LINEAGE_KEY, windows_record
from foundation.data.report_lengths import budget_warning
from foundation.data.report_sections import select_sections
from foundation.data.stream import EpochLoader, ShardStream
from foundation.data.transforms import DEFAULT_CT_WINDOWS, eval_transform, train_transform
from foundation.shards.manifest import Manifest, ManifestError

log = logging.getLogger(__name__)


def merge_manifests(paths: list[str], project: str | None = None) -> Manifest:
    """One manifest over several (shard paths made absolute); refuses revoked, purged or
    merged-away manifests, datasets not approved for ``project``, and mixtures of
    preprocessing specs or pseudonymisation keys."""
    from foundation.governance.projects import check_usable

    manifests = [Manifest.load(p) for p in paths]
    for m in manifests:
        check_usable(m, project)
    if len(manifests) == 1:
        return manifests[0]
    first = manifests[0]
    for m in manifests[1:]:
        if m.preprocessing != first.preprocessing:
            raise ManifestError(
                f"{m.location}: preprocessing spec differs from {first.location}; refusing to mix"
            )
        if m.key_id != first.key_id:
            raise ManifestError(f"{m.location}: built under another pseudonymisation key")
    shards = [
        dataclasses.replace(rec, path=str(path))
        for m in manifests
        for rec, path in zip(m.shards, m.shard_paths(), strict=True)
    ]
    return Manifest(
        dataset="+".join(f"{m.dataset}@v{m.version}" for m in manifests),
        key_id=first.key_id,
        shards=shards,
        version=1,
        preprocessing=first.preprocessing,
        exclusion_version=first.exclusion_version,
        shard_root="/",
        location=first.location,
    )


class _HFTokenize:
    """A transformers tokenizer as ``tokenize(list[str]) -> {input_ids, attention_mask}``,
    reading the chosen report sections only (see ``report_sections``)."""

    def __init__(
        self, tokenizer_dir: str, max_tokens: int, sections: Sequence[str] | None = None
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.max_tokens = max_tokens
        self.sections = tuple(sections) if sections else None

    def __call__(self, texts: list[str]) -> Any:
        return self.tokenizer(
            [select_sections(t, self.sections) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )


class ShardDataModule(L.LightningDataModule):
    """Training and validation batches streamed from shard manifests."""

    def __init__(
        self,
        manifest: str | list[str],
        exclusion_list: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        crop_size_3d: tuple[int, int, int] = (96, 96, 96),
        crop_size_2d: tuple[int, int] = (224, 224),
        crop_min_scale_2d: float = 0.4,
        ratio_3d: float | None = None,
        crops_per_volume: int = 1,
        multi_window: bool = False,
        ct_windows: list[tuple[float, float]] | None = None,
        seed: int = 0,
        max_report_tokens: int = 256,
        report_sections: list[str] | None = None,
        tokenizer_dir: str | None = None,
        val_fraction: float = 0.05,
        shuffle_block: int = 16,
        on_error: Literal["skip", "raise"] = "skip",
        shard_url: str | None = None,
        pin_memory: bool = True,
        project: str | None = None,
        flips: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.manifest_paths = [manifest] if isinstance(manifest, str) else list(manifest)
        self.exclusion_list = exclusion_list
        self.batch_size, self.num_workers = batch_size, num_workers
        self.crop_size_3d, self.crop_size_2d = tuple(crop_size_3d), tuple(crop_size_2d)
        if not 0.0 < crop_min_scale_2d <= 1.0:
            raise ValueError(f"crop_min_scale_2d must be in (0, 1], got {crop_min_scale_2d}")
        self.crop_min_scale_2d = crop_min_scale_2d
        self.ratio_3d, self.crops_per_volume, self.multi_window = (
            ratio_3d,
            crops_per_volume,
            multi_window,
        )
        # (level, width) HU; recorded in the lineage so evaluation reuses them (encoder_input)
        self.ct_windows = tuple(
            (float(lv), float(wd)) for lv, wd in (ct_windows or DEFAULT_CT_WINDOWS)
        )
        if not all(wd > 0 for _, wd in self.ct_windows):
            raise ValueError(f"ct_windows need widths > 0, got {list(self.ct_windows)}")
        self.seed, self.max_report_tokens, self.tokenizer_dir = (
            seed,
            max_report_tokens,
            tokenizer_dir,
        )
        # the report text the model reads: None, the whole report; else these sections
        # (e.g. [findings, conclusion]: headings found in French or English), the whole report
        # when it has none of them
        self.report_sections = list(report_sections) if report_sections else None
        if self.report_sections:
            select_sections("", self.report_sections)  # unknown section names fail here
        self.val_fraction, self.shuffle_block = val_fraction, shuffle_block
        self.on_error, self.shard_url, self.pin_memory = on_error, shard_url, pin_memory
        # the research project this run serves: the dataset must be approved for it
        self.project = project
        # off by default: reports name sides ("lobe inférieur droit"), and a flipped image
        # contradicts its own report in the contrastive pairs
        self.flips = flips
        # A tokenizer callable may also be set directly (the lead's code passes one).
        self.tokenize: Callable[[list[str]], Any] | None = None
        self._manifest: Manifest | None = None
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = merge_manifests(self.manifest_paths, self.project)
        return self._manifest

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing spec of the data (to record in checkpoints)."""
        return dict(self.manifest.preprocessing)

    @property
    def lineage(self) -> dict[str, Any]:
        """Dataset, version, key id, preprocessing spec, the CT windows of the image transform
        and the exclusion-list version of the current epoch (None before the first epoch
        starts), for checkpoints."""
        m = self.manifest
        stream = self.train_stream
        epoch_state = stream.state_dict() if stream is not None else {}
        return {
            "dataset": m.dataset,
            "version": m.version,
            "manifest_version": m.version,
            "project": self.project,
            "key_id": m.key_id,
            "preprocessing": dict(m.preprocessing),
            LINEAGE_KEY: windows_record(self.ct_windows),
            "exclusion_version": epoch_state.get("exclusion_version"),
        }

    def _stream(self, split: Literal["train", "val"]) -> ShardStream:
        train = split == "train"
        if self.tokenize is None and self.tokenizer_dir is not None:
            self.tokenize = _HFTokenize(
                self.tokenizer_dir, self.max_report_tokens, self.report_sections
            )
            # measured on whole reports: with report_sections the text read is shorter
            warning = (
                None
                if self.report_sections
                else budget_warning(self.tokenizer_dir, self.max_report_tokens)
            )
            if warning:
                log.warning(warning)
        windows = self.ct_windows
        if train:
            t3 = train_transform(
                3,
                self.crop_size_3d,
                ct_windows=windows,
                multi_window=self.multi_window,
                crops_per_volume=self.crops_per_volume,
                flips=self.flips,
            )
            t2 = train_transform(
                2,
                self.crop_size_2d,
                ct_windows=windows,
                multi_window=self.multi_window,
                flips=self.flips,
                min_scale_2d=self.crop_min_scale_2d,
            )
        else:
            t3 = eval_transform(
                3, self.crop_size_3d, ct_windows=windows, multi_window=self.multi_window
            )
            t2 = eval_transform(
                2, self.crop_size_2d, ct_windows=windows, multi_window=self.multi_window
            )
        return ShardStream(
            self.manifest,
            self.exclusion_list,
            transform_2d=t2,
            transform_3d=t3,
            tokenize=self.tokenize,
            seed=self.seed,
            batch_size=self.batch_size,
            crops_per_volume=self.crops_per_volume if train else 1,
            ratio_3d=self.ratio_3d if train else None,  # validation reads every batch
            shuffle=train,
            shuffle_block=self.shuffle_block,
            num_workers=self.num_workers,
            split=split if self.val_fraction > 0 else "all",
            val_fraction=self.val_fraction,
            on_error=self.on_error,
            shard_url=self.shard_url,
            count_yielded=False,  # counted in on_before_batch_transfer
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is None and stage in (None, "fit"):
            self.train_stream = self._stream("train")
            if self._pending_state is not None:
                self.train_stream.load_state_dict(self._pending_state)
                self._pending_state = None
        if self.val_stream is None and self.val_fraction > 0:
            self.val_stream = self._stream("val")

    def _loader(self, stream: ShardStream) -> EpochLoader:
        return EpochLoader(stream, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> EpochLoader:
        self.setup("fit")
        assert self.train_stream is not None
        return self._loader(self.train_stream)

    def val_dataloader(self) -> EpochLoader | list:
        self.setup("validate")
        return [] if self.val_stream is None else self._loader(self.val_stream)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self.train_stream is not None:
            self.train_stream.consumed(1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.train_stream is None:
            return {} if self._pending_state is None else {"train": self._pending_state}
        return {"train": self.train_stream.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train" not in state_dict:
            return
        if self.train_stream is None:
            self._pending_state = state_dict["train"]
        else:
            self.train_stream.load_state_dict(state_dict["train"])

    def describe(self) -> str:
        """One line for logs: the data's lineage (no pseudonym)."""
        names = ", ".join(Path(p).name for p in self.manifest_paths)
        return f"{names}: {self.manifest.num_samples} samples in {len(self.manifest.shards)} shards"
