"""Zero-shot image <-> report retrieval on held-out patients (``foundation evaluate``).

One image embedding per study: the mean of ``encode_image`` over the study's series of its
most common dimensionality (2D or 3D), renormalised; against that study's report through
``encode_text``. Recall@k counts a query as found when fewer than k other candidates score at
least as high as its own pair: ties count against the query, so a collapsed encoder (all
scores equal) gets recall 0, not 1.

Identical reports: "Examen sans anomalie." is written word for word for many exams, and no
model can tell which of several identical texts was the pair. A report whose text (the
sections read, whitespace aside) equals the true one is that report: retrieving it counts as
found, in both directions, and it is not counted among the candidates that outrank the pair.
Chance recall@1 is then the mean over queries of (copies of its report) / n, and 1/n when
every report is unique.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from foundation.data.report_sections import select_sections
from foundation.sample import MODALITIES, Sample

KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_SIZE = {2: (224, 224), 3: (96, 96, 96)}


def same_text(texts: Sequence[str]) -> np.ndarray:
    """``(n, n)`` bool: True where two reports read the same (whitespace runs aside)."""
    codes = _text_codes(texts)
    return codes[:, None] == codes[None, :]


def _text_codes(texts: Sequence[str]) -> np.ndarray:
    """One integer per distinct report text (whitespace runs aside), in order of appearance."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(" ".join(t.split()), len(ids)) for t in texts], dtype=int)


def recall_at_k(
    sim: np.ndarray, ks: Iterable[int] = KS, same: np.ndarray | None = None
) -> dict[int, float]:
    """Recall@k of the diagonal pairs in a square similarity matrix ``(n, n)`` (rows = queries).

    ``same`` ``(n, n)`` bool (``same_text``): candidates equivalent to a query's own pair, which
    count as found and never as outranking it; None: only the diagonal.
    """
    sim = np.asarray(sim, float)
    equivalent = np.eye(len(sim), dtype=bool)
    if same is not None:
        equivalent |= np.asarray(same, bool)
    own = np.diag(sim)[:, None]
    best_own = np.where(equivalent, sim, -np.inf).max(axis=1, keepdims=True)
    # a query is ranked by its best equivalent candidate (its own pair, or a copy of its report);
    # the others that score at least as high (ties included) outrank it
    rank = ((sim >= np.maximum(own, best_own)) & ~equivalent).sum(axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def chance_r1(same: np.ndarray | None, n: int) -> float:
    """Expected recall@1 of a random ranking: mean over queries of (copies of its pair) / n."""
    if same is None:
        return 1.0 / n
    return float((np.asarray(same, bool) | np.eye(n, dtype=bool)).sum(axis=1).mean() / n)


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


@torch.no_grad()
def study_image_embeddings(
    module: Any,
    samples: Iterable[Sample],
    transform_for: Callable[[int], Callable[[np.ndarray, dict], Tensor]],
    patients: set[str] | None = None,
    batch_size: int = 16,
) -> tuple[list[str], Tensor, dict[str, str], list[str], list[int]]:
    """Studies (sorted), their image embeddings ``(n, E)``, reports, modalities, and the
    dimensionality (2 or 3) of the series each embedding comes from."""
    sums: dict[tuple[str, int], Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    reports: dict[str, str] = {}
    modality_of: dict[str, str] = {}
    buffers: dict[int, list[tuple[str, Tensor, int]]] = {2: [], 3: []}

    def flush(dims: int) -> None:
        buf = buffers[dims]
        if not buf:
            return
        image = torch.stack([b[1] for b in buf])
        modality = torch.tensor([b[2] for b in buf], dtype=torch.long)
        emb = module.encode_image(image, modality).float()  # (B, E), normalised
        for (study, _, _), e in zip(buf, emb, strict=True):
            sums[(study, dims)] = sums.get((study, dims), 0) + e
            counts[(study, dims)] = counts.get((study, dims), 0) + 1
        buf.clear()

    transforms: dict[int, Callable] = {}
    for s in samples:
        if patients is not None and s.meta.get("patient") not in patients:
            continue
        dims = int(s.meta.get("dims", s.image.ndim))
        if dims not in transforms:
            transforms[dims] = transform_for(dims)
        study = s.meta["study"]
        modality_of.setdefault(study, s.meta["modality"])
        if s.report and s.report.strip():
            reports.setdefault(study, s.report)
        image = transforms[dims](s.image, s.meta)
        buffers[dims].append((study, image, MODALITIES.index(s.meta["modality"])))
        if len(buffers[dims]) == batch_size:
            flush(dims)
    for dims in buffers:
        flush(dims)

    studies = sorted(s for s in {k[0] for k in sums} if s in reports)
    embs, dims_of = [], []
    for study in studies:
        # Most series wins; ties go to 3D (the richer view of the study).
        dims = max((d for d in (3, 2) if (study, d) in counts), key=lambda d: counts[(study, d)])
        embs.append(F.normalize(sums[(study, dims)] / counts[(study, dims)], dim=-1))
        dims_of.append(dims)
    emb = torch.stack(embs) if embs else torch.zeros(0, 1)
    reports_of = {s: reports[s] for s in studies}
    return studies, emb, reports_of, [modality_of[s] for s in studies], dims_of


def within_modality(
    sim: np.ndarray, modalities: list[str], same: np.ndarray | None = None
) -> tuple[float, float]:
    """Image->report recall@1 when each image only ranks reports of its own modality, and the
    chance level of that task. Separates what a model learned about anatomy and findings from
    telling a CT report from an X-ray report (which alone lifts plain recall@1 above 1/n).
    ``same``: equivalent reports, as in ``recall_at_k``."""
    mods = np.asarray(modalities)
    equivalent = np.eye(len(mods), dtype=bool)
    if same is not None:
        equivalent |= np.asarray(same, bool)
    hits, chance = [], []
    for i, m in enumerate(mods):
        cands = np.flatnonzero(mods == m)
        scores = sim[i, cands]
        best = cands[scores == scores.max()]
        hits.append(float(equivalent[i, best].all()))  # ties count against the query
        chance.append(equivalent[i, cands].sum() / len(cands))
    return float(np.mean(hits)), float(np.mean(chance))


def _in_channels(module: Any) -> int:
    """Input channels of the module's vision encoder (1 when it does not say)."""
    cfg = getattr(getattr(module, "vision", None), "cfg", None)
    return int(getattr(cfg, "in_channels", 1))


@torch.no_grad()
def evaluate_retrieval(
    module: Any,
    manifest: str,
    tokenizer: Any,
    patients: set[str] | None = None,
    *,
    image_size: dict[int, tuple[int, ...]] | None = None,
    batch_size: int = 16,
    max_length: int = 256,
    report_sections: Sequence[str] | None = None,
    samples: Iterable[Sample] | None = None,
    transform_for: Callable[[int], Callable[[np.ndarray, dict], Tensor]] | None = None,
    lineage: dict[str, Any] | None = None,
    source: str = "encoder",
) -> dict[str, float | int]:
    """Recall@1/5/10 image->text and text->image over the studies of ``patients`` (None: all).

    ``module`` offers ``encode_image`` and ``encode_text`` (a PretrainModule); ``tokenizer`` is
    a transformers tokenizer; ``report_sections``: the report sections the model was trained
    on (``select_sections``; None: whole reports). ``samples``/``transform_for`` default to the
    manifest's shards and the evaluation transform at ``image_size`` (per dims) that gives the
    vision encoder (``module.vision``) its input channels, with the CT windows ``lineage`` (the
    checkpoint's) records; ``source`` names the checkpoint in errors.
    """
    sizes = {**DEFAULT_SIZE, **(image_size or {})}
    if transform_for is None:
        from foundation.data.encoder_input import encoder_eval_transform, input_windows

        channels = _in_channels(module)
        input_windows(channels, lineage, source)  # a mismatch fails before any image is read

        def transform_for(dims: int) -> Callable[[np.ndarray, dict], Tensor]:
            return encoder_eval_transform(dims, tuple(sizes[dims]), channels, lineage, source)

    if samples is None:
        from foundation.shards.reader import iter_samples

        samples = iter_samples(manifest, decode_image=True)
    was_training = module.training
    module.eval()
    try:
        studies, img, reports, modalities, dims_of = study_image_embeddings(
            module, samples, transform_for, patients, batch_size
        )
        n = len(studies)
        if n == 0:
            raise ValueError(f"{manifest}: no study with an image and a report to retrieve")
        texts = [select_sections(reports[s], report_sections) for s in studies]
        txt = torch.zeros_like(img)
        # a report is encoded for the dimensionality of its own study's images (the projection
        # may keep statistics per dimensionality: foundation.models.projection); so this
        # retrieval takes each report's exam type as known, as its DICOM header makes it
        for dims in sorted(set(dims_of)):
            rows = [i for i, d in enumerate(dims_of) if d == dims]
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                ids, mask = _tokenize(tokenizer, [texts[j] for j in chunk], max_length)
                txt[chunk] = module.encode_text(ids, mask, dims).float()
        sim = (img @ txt.T).numpy()  # (n images, n reports)
    finally:
        module.train(was_training)
    same = same_text(texts)  # symmetric: the same equivalence serves both directions
    out: dict[str, float | int] = {}
    for k, v in recall_at_k(sim, same=same).items():
        out[f"i2t_r{k}"] = v
    for k, v in recall_at_k(sim.T, same=same).items():
        out[f"t2i_r{k}"] = v
    out["i2t_r1_within_modality"], out["chance_r1_within_modality"] = within_modality(
        sim, modalities, same
    )
    out["n"] = n
    out["distinct_reports"] = int(_text_codes(texts).max(initial=-1) + 1)
    out["chance_r1"] = chance_r1(same, n)
    return out
