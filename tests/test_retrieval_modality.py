"""Retrieval within a modality: the part of recall@1 that is not 'this is a CT report'."""

from __future__ import annotations

import numpy as np
import pytest

from foundation.evaluation.retrieval import recall_at_k, within_modality


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
