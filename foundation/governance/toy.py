"""A tiny shard dataset built with the real ``ShardWriter`` and ``Manifest`` (tests, benchmarks).

Laid out as an ingest lays out its output: ``<root>/shards/*.tar``, ``<root>/ledger.jsonl``,
``<root>/data_manifests/<dataset>.json``. Samples are ordered by key (a keyed pseudonym), so a
patient's samples are spread over shards as they are in a real ingest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foundation.privacy.pseudonym import PseudonymKey
from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest
from foundation.shards.writer import ShardWriter


@dataclass
class ToyDataset:
    root: Path
    manifest: Path
    key: PseudonymKey
    patient_ids: list[str]  # raw ids (test-only: the real ones never leave the hospital side)

    def accession(self, patient_id: str, study: int = 0) -> str:
        return f"ACC-{patient_id}-{study}"


def toy_samples(
    key: PseudonymKey, patient_ids: list[str], studies: int = 2, site: str = "site-a"
) -> list[Sample]:
    """Per patient ``studies`` studies: a tiny CT volume and an X-ray each (2 series)."""
    samples = []
    rng = np.random.default_rng(0)
    for n, pid in enumerate(patient_ids):
        for s in range(studies):
            study = key.pseudonym("study", f"{pid}/{s}")
            date = key.shift_date(pid, dt.date(2020, 1, 1) + dt.timedelta(days=30 * s))
            common = {
                "patient": key.patient(pid),
                "study": study,
                "key_id": key.key_id,
                "accession": key.pseudonym("accession", f"ACC-{pid}-{s}"),
                "site": key.pseudonym("site", site),
                "study_date": date.isoformat(),
                "age_years": 40 + n % 50,
                "sex": "F" if n % 2 else "M",
                "source_format": "dicom",
            }
            ct = rng.integers(-1024, 3071, size=(4, 4, 3)).astype(np.int16)
            xr = rng.random((6, 5)).astype(np.float16)
            for index, image, modality in ((0, ct, "CT"), (1, xr, "XR")):
                meta = {
                    **common,
                    "series_index": index,
                    "modality": modality,
                    "source_modality": "CT" if modality == "CT" else "DX",
                    "dims": image.ndim,
                    "spacing": [1.0] * image.ndim,
                    "shape": list(image.shape),
                    "orientation": "RAS" if image.ndim == 3 else None,
                    "body_part": "CHEST",
                }
                report = f"Examen {modality} n°{s} : pas d'anomalie décelable."
                samples.append(Sample(sample_key(study, index), image, meta, report))
    return sorted(samples, key=lambda x: x.key)


def build_toy_dataset(
    root: str | Path,
    *,
    n_patients: int = 12,
    studies: int = 2,
    shard_max_samples: int = 4,
    dataset: str = "toy",
    secret: bytes = b"toy-secret-key-0123456789abcdef",
    site: str = "site-a",
    id_prefix: str = "PAT",
    patient_ids: list[str] | None = None,
) -> ToyDataset:
    """Write the dataset under ``root``; returns where it is and its (test) key and ids."""
    root = Path(root)
    key = PseudonymKey(secret)
    ids = patient_ids or [f"{id_prefix}{i:05d}" for i in range(n_patients)]
    with ShardWriter(root / "shards", prefix=dataset, max_samples=shard_max_samples) as writer:
        for sample in toy_samples(key, ids, studies, site):
            writer.write(sample)
    records = writer.close()
    entry = {
        "tasks": [],
        "shards": [dataclasses.asdict(r) for r in records],
        "samples": sum(r.samples for r in records),
        "without_report": [],
        "next_index": 0,
    }
    (root / "ledger.jsonl").write_text(json.dumps(entry) + "\n", encoding="utf-8")
    manifest = Manifest(
        dataset=dataset,
        key_id=key.key_id,
        shards=records,
        preprocessing={"version": "toy"},
        shard_root="../shards",
    )
    path = manifest.save(root / "data_manifests" / f"{dataset}.json")
    return ToyDataset(root, path, key, ids)
