"""Retrieval within a modality: the part of recall@1 that is not 'this is a CT report'."""

from __future__ import annotations

import numpy as np
import pytest

from foundation.evaluation.retrieval import chance_r1, recall_at_k, same_text, within_modality


def test_modality_only_model_scores_chance_within_modality():
    # a model that only knows the modality: every same-modality report scores the same
    mods = ["CT", "CT", "CT", "XR", "XR"]
    same = np.array([[1.0 if a == b else 0.0 for b in mods] for a in mods])
    r1, chance = within_modality(same, mods)
    assert r1 == 0.0  # ties count against the query
    assert chance == pytest.approx((3 * (1 / 3) + 2 * (1 / 2)) / 5)


def test_perfect_model_scores_one_and_restriction_can_only_help():
    rng = np.random.default_rng(0)
    mods = ["CT"] * 6 + ["MR"] * 4
    sim = rng.normal(size=(10, 10))
    sim[np.arange(10), np.arange(10)] += 10.0
    assert within_modality(sim, mods)[0] == 1.0
    noisy = rng.normal(size=(10, 10))
    # ranking among fewer candidates never loses a hit the full ranking had
    assert within_modality(noisy, mods)[0] >= recall_at_k(noisy, [1])[1]


def test_an_identical_report_is_the_report():
    # reports 0 and 1 read the same (whitespace aside); 2 and 3 are unique
    texts = ["Examen sans anomalie.", "Examen  sans\nanomalie.", "Cardiomégalie.", "Nodule."]
    same = same_text(texts)
    assert same[0, 1] and same[1, 0] and not same[0, 2] and same.diagonal().all()
    sim = np.array(
        [
            [0.5, 0.9, 0.1, 0.2],  # image 0 retrieves report 1, a copy of its own: found
            [0.9, 0.5, 0.1, 0.2],  # same for image 1
            [0.1, 0.2, 0.5, 0.5],  # image 2: a tie with a different report counts against it
            [0.1, 0.2, 0.3, 0.9],
        ]
    )
    assert recall_at_k(sim, ks=(1,))[1] == pytest.approx(1 / 4)  # diagonal only: image 3
    assert recall_at_k(sim, ks=(1,), same=same)[1] == pytest.approx(3 / 4)
    assert recall_at_k(sim, ks=(2,), same=same)[2] == 1.0
    # a collapsed encoder still scores 0: copies do not make ties count for the query
    assert recall_at_k(np.ones((4, 4)), ks=(1,), same=same)[1] == 0.0
    # chance: queries 0 and 1 have 2 good candidates in 4, queries 2 and 3 one
    assert chance_r1(same, 4) == pytest.approx((2 + 2 + 1 + 1) / 4 / 4)
    assert chance_r1(None, 4) == pytest.approx(1 / 4)
    # within a modality: the same rule
    mods = ["XR", "XR", "CT", "CT"]
    assert within_modality(sim, mods, same)[0] == pytest.approx(3 / 4)
    assert within_modality(sim, mods, same)[1] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_copies_never_lower_recall_and_all_copies_give_recall_one():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(12, 12))
    texts = [f"r{i % 5}" for i in range(12)]
    same = same_text(texts)
    plain, dup = recall_at_k(sim, same=None), recall_at_k(sim, same=same)
    assert all(dup[k] >= plain[k] for k in plain)
    one_text = same_text(["x"] * 12)
    assert recall_at_k(sim, ks=(1,), same=one_text)[1] == 1.0 and chance_r1(one_text, 12) == 1.0
