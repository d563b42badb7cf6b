"""Patient-level splits, deterministic from a seed.

Every patient pseudonym gets a rank from ``sha256(seed:pseudonym)``; patients sorted by that
rank are cut into train/val/test by the fractions (or dealt round-robin into k folds). K folds
may be stratified by a per-patient value (a label): patients sorted by it are dealt k at a
time, so each fold holds a like share of every class and of the range of a continuous target.
On tens of patients this matters: without it a fold that draws most of the positives leaves
the others' training sets short of them, and pooled out-of-fold predictions of an encoder
that carries no signal come out anti-correlated with the truth (AUROC well under 0.5). All
studies of a patient follow the patient, so no patient is ever on both sides of a split, and
the same cohort with the same seed always gives the same split, on any machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
POOLED = -1  # split.fold value: run every fold and pool the out-of-fold predictions (probes)


def _rank(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def _hash_order(patients: Iterable[str], seed: int) -> list[str]:
    return sorted(set(patients), key=lambda p: (_rank(seed, p), p))


@dataclass
class Split:
    """Study pseudonyms per split, and the patients behind them."""

    studies: dict[str, list[str]] = field(default_factory=dict)
    patients: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0
    method: str = "fractions"

    def of(self, name: str) -> set[str]:
        """Study pseudonyms of split ``name``."""
        return set(self.studies.get(name, []))

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "method": self.method,
            "unit": "patient",
            "studies": {k: sorted(v) for k, v in self.studies.items()},
            "n_patients": {k: len(v) for k, v in self.patients.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write ``split.json`` (study pseudonyms per split; pseudonyms only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


def assign_patients(
    patients: Iterable[str],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Cut hash-ordered patients into train/val/test by ``fractions`` (normalised to sum 1).

    Each split with a non-zero fraction gets at least one patient when there are enough
    patients, so tiny cohorts still have a test set.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError("split fractions must be three non-negative numbers (train, val, test)")
    order = _hash_order(patients, seed)
    n = len(order)
    total = float(sum(fractions))
    counts = [round(f / total * n) for f in fractions]
    # Guarantee one patient per requested split, taken from the largest one.
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and n >= sum(1 for x in fractions if x > 0):
            counts[i] = 1
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    counts[0] += n - sum(counts)  # rounding remainder goes to train
    bounds = [0, counts[0], counts[0] + counts[1], n]
    return {name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLIT_NAMES)}


def kfold_patients(
    patients: Iterable[str], k: int, seed: int = 0, strata: Mapping[str, float] | None = None
) -> list[list[str]]:
    """``k`` disjoint folds of patients covering each patient exactly once.

    ``strata``: a value per patient (class index or continuous label; patients without one
    come last); consecutive blocks of ``k`` patients in value order go one to each fold, in a
    seeded order per block, so folds differ by at most one patient per block.
    """
    if k < 2:
        raise ValueError("k-fold needs k >= 2")
    order = _hash_order(patients, seed)
    if strata is None:
        return [order[i::k] for i in range(k)]
    rank = {p: i for i, p in enumerate(order)}
    order.sort(key=lambda p: (0, float(strata[p]), rank[p]) if p in strata else (1, 0.0, rank[p]))
    folds: list[list[str]] = [[] for _ in range(k)]
    for b in range(0, len(order), k):
        block = order[b : b + k]
        # which fold takes which member of the block: a seeded permutation per block, and the
        # short last block goes to the folds that are smallest so far
        perm = sorted(range(k), key=lambda i: (len(folds[i]), _rank(seed, f"{b}:{i}")))
        for fold, patient in zip(perm, block, strict=False):
            folds[fold].append(patient)
    return [sorted(f, key=rank.__getitem__) for f in folds]


def patient_strata(
    study_patient: Mapping[str, str], study_value: Mapping[str, object]
) -> dict[str, float]:
    """Per patient, the mean of its studies' values (numbers; other values by class index):
    the ``strata`` of ``kfold_patients``. Studies without a value are left out."""
    values: dict[str, object] = {
        s: v
        for s, v in study_value.items()
        if v is not None and v == v and v != ""  # not NaN
    }
    try:  # numbers, or numbers read as text from a CSV
        numbers = {s: float(v) for s, v in values.items()}  # type: ignore[arg-type]
    except (TypeError, ValueError):  # class names: stratify by class index
        classes = {c: i for i, c in enumerate(sorted({str(v) for v in values.values()}))}
        numbers = {s: float(classes[str(v)]) for s, v in values.items()}
    numbers = {s: x for s, x in numbers.items() if x == x}  # "nan" read as text
    sums: dict[str, list[float]] = {}
    for study, value in numbers.items():
        if study in study_patient:
            sums.setdefault(study_patient[study], []).append(value)
    return {p: sum(v) / len(v) for p, v in sums.items()}


def _studies_by_patient(study_patient: Mapping[str, str]) -> dict[str, list[str]]:
    by_patient: dict[str, list[str]] = {}
    for study, patient in study_patient.items():
        by_patient.setdefault(patient, []).append(study)
    return by_patient


def make_split(
    study_patient: Mapping[str, str],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Split:
    """Train/val/test split of studies, by patient. ``study_patient``: study -> patient."""
    by_patient = _studies_by_patient(study_patient)
    groups = assign_patients(by_patient, fractions, seed)
    return Split(
        studies={
            name: sorted(s for p in pats for s in by_patient[p]) for name, pats in groups.items()
        },
        patients={name: sorted(pats) for name, pats in groups.items()},
        seed=seed,
        method="fractions",
    )


def make_kfold(
    study_patient: Mapping[str, str],
    k: int,
    seed: int = 0,
    val_fraction: float = 0.15,
    strata: Mapping[str, float] | None = None,
) -> list[Split]:
    """``k`` splits: fold i is the test set; the rest is cut into train/val by patient.

    ``strata``: per-patient values to stratify the folds by (``patient_strata``)."""
    by_patient = _studies_by_patient(study_patient)
    folds = kfold_patients(by_patient, k, seed, strata)
    splits = []
    for i, test in enumerate(folds):
        rest = [p for j, fold in enumerate(folds) if j != i for p in fold]
        inner = assign_patients(rest, (1.0 - val_fraction, val_fraction, 0.0), seed + 1 + i)
        groups = {"train": inner["train"], "val": inner["val"], "test": test}
        splits.append(
            Split(
                studies={n: sorted(s for p in g for s in by_patient[p]) for n, g in groups.items()},
                patients={n: sorted(g) for n, g in groups.items()},
                seed=seed,
                method=f"kfold:{i}/{k}" + (":stratified" if strata is not None else ""),
            )
        )
    return splits
