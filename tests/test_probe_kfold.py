"""Probes on cached study embeddings: pooled patient-level k-fold and the CV-tuned linear probe.

No encoder and no shards: the study embeddings are drawn here, with a known linear signal
(or none), and patients hold one to three studies each so a leak across folds would show.
"""

from __future__ import annotations

import numpy as np
import pytest

from foundation.evaluation import probe as probe_mod
from foundation.evaluation.linear_probe import fit_linear_probe, patient_folds, ridge_path
from foundation.evaluation.metrics import compute_metrics
from foundation.evaluation.probe import POOLED, evaluation_mode, fit_probes
from foundation.models.heads import TaskSpec
from foundation.training.finetune import FinetuneConfig, make_run_split

D = 12


def _cohort(n_patients: int = 30, signal: float = 1.0, seed: int = 0) -> dict:
    """Studies with embeddings x (n, D); ``y`` = signal * x[:, 0] + noise; ``c`` = y > median."""
    rng = np.random.default_rng(seed)
    study_patient, studies = {}, []
    for p in range(n_patients):
        for j in range(1 + p % 3):
            s = f"s{p:03d}-{j}"
            studies.append(s)
            study_patient[s] = f"p{p:03d}"
    x = rng.normal(size=(len(studies), D))
    y = signal * x[:, 0] + 0.3 * rng.normal(size=len(studies))
    med = float(np.median(y))
    rows = {s: {"y": float(v), "c": float(v > med)} for s, v in zip(studies, y, strict=True)}
    return {"studies": studies, "x": x, "study_patient": study_patient, "rows": rows, "y": y}


def _cfg(split: dict, freeze: str = "linear_probe") -> FinetuneConfig:
    return FinetuneConfig.from_dict(
        {
            "tasks": [{"name": "y", "type": "regression"}, {"name": "c", "type": "binary"}],
            "encoder": {"freeze": freeze, "probe_hidden": 8},
            "split": split,
            "train": {"probe_steps": 20},
        }
    )


@pytest.mark.parametrize("freeze", ["linear_probe", "mlp_probe"])
def test_pooled_kfold_predicts_every_study_once_from_other_patients(monkeypatch, freeze) -> None:
    c = _cohort()
    calls: list[tuple[set[str], set[str]]] = []  # (patients fitted on, studies predicted)
    real = probe_mod._fit_predict

    def spy(cfg, t, x, groups, rows, studies, part):
        pred, info = real(cfg, t, x, groups, rows, studies, part)
        fitted = {groups[i] for i in np.concatenate([part["train"], part["val"]])}
        calls.append((fitted, set(pred)))
        return pred, info

    monkeypatch.setattr(probe_mod, "_fit_predict", spy)
    cfg = _cfg({"kfold": 5, "fold": POOLED, "seed": 2}, freeze)
    res = fit_probes(cfg, c["studies"], c["x"], c["study_patient"], c["rows"])

    assert len(calls) == 5 * 2  # five folds x two tasks
    for name in ("y", "c"):
        assert sorted(res["predictions"][name]) == sorted(c["studies"])  # every study ...
    predicted = [s for _, studies in calls[::2] for s in studies]
    assert sorted(predicted) == sorted(c["studies"])  # ... exactly once
    for fitted, studies in calls:
        assert fitted and studies
        assert not fitted & {c["study_patient"][s] for s in studies}  # never its own patient
    folds = res["split"].studies
    assert len(folds) == 5 and sum(len(v) for v in folds.values()) == len(c["studies"])
    assert res["split"].method == "kfold:5:pooled:stratified"  # on the first task, "y"


def test_pooled_linear_probe_finds_a_linear_signal_and_ignores_noise() -> None:
    cfg = _cfg({"kfold": 5, "fold": POOLED})
    good = _cohort(signal=1.0)
    res = fit_probes(cfg, good["studies"], good["x"], good["study_patient"], good["rows"])
    pred = np.array([res["predictions"]["y"][s][0] for s in good["studies"]])
    assert compute_metrics("regression", good["y"], pred)["r2"] > 0.7
    prob = np.array([res["predictions"]["c"][s][0] for s in good["studies"]])
    labels = np.array([good["rows"][s]["c"] for s in good["studies"]])
    assert compute_metrics("binary", labels, prob)["auroc"] > 0.85

    noise = _cohort(signal=0.0, seed=1)
    res = fit_probes(cfg, noise["studies"], noise["x"], noise["study_patient"], noise["rows"])
    pred = np.array([res["predictions"]["y"][s][0] for s in noise["studies"]])
    # No signal: the CV picks strong penalties, so predictions stay near the mean target.
    assert pred.std() < 0.5 * noise["y"].std()
    assert len(res["probe"]["lambda"]["y"]) == 5


def test_split_mode_still_predicts_the_test_split_only() -> None:
    c = _cohort()
    cfg = _cfg({"fractions": [0.6, 0.2, 0.2], "seed": 0})
    res = fit_probes(cfg, c["studies"], c["x"], c["study_patient"], c["rows"])
    assert set(res["predictions"]["y"]) == res["split"].of("test")
    assert evaluation_mode({"fractions": [0.6, 0.2, 0.2]}) == "patient-level test split"
    assert "pooled out-of-fold" in evaluation_mode({"kfold": 5, "fold": POOLED})


def test_pooled_fold_is_refused_outside_the_probe_path() -> None:
    cfg = _cfg({"kfold": 5, "fold": POOLED})
    with pytest.raises(ValueError, match=r"split\.fold"):
        make_run_split(cfg, _cohort()["study_patient"])


def test_ridge_path_matches_the_normal_equations() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 1))
    lam = 0.5
    (w, b), *_ = ridge_path(x, y, [lam])
    xc, yc = x - x.mean(0), y - y.mean(0)
    expect = np.linalg.solve(xc.T @ xc + len(x) * lam * np.eye(6), xc.T @ yc)
    np.testing.assert_allclose(w, expect, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ expect, atol=1e-10)


def test_inner_folds_keep_patients_together() -> None:
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    folds = patient_folds(groups, 5)
    assert len(folds) == 4  # fewer patients than folds: one fold per patient
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    for f in folds:
        assert len({groups[i] for i in f}) == 1
    assert patient_folds(["a", "a"], 5) == []
    # One patient only: no CV possible, the probe still fits (middle penalty of the grid).
    task = TaskSpec(name="y")
    predict, info = fit_linear_probe(np.eye(3), np.array([[0.0], [1.0], [2.0]]), ["a"] * 3, task)
    assert predict(np.eye(3)).shape == (3, 1) and info["cv_loss"] == [0.0] * len(info["cv_loss"])


def test_newton_logistic_reaches_the_penalised_optimum() -> None:
    from foundation.evaluation.linear_probe import _newton_binary

    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=50) > 0).astype(float)
    lam = 0.05
    (w, b) = _newton_binary(x, y, lam, None)
    p = 1.0 / (1.0 + np.exp(-(x @ w[:, 0] + b[0])))
    grad_w = x.T @ (p - y) / len(x) + lam * w[:, 0]
    assert np.abs(grad_w).max() < 1e-6 and abs(float(np.mean(p - y))) < 1e-6
    assert w[0, 0] > 0.5  # the informative feature carries the weight


def test_stratified_folds_share_out_classes_and_target_range():
    from foundation.evaluation.splits import kfold_patients, make_kfold, patient_strata

    patients = [f"p{i:02d}" for i in range(23)]
    label = {p: float(i % 3 == 0) for i, p in enumerate(patients)}  # 8 positives, 15 negatives
    folds = kfold_patients(patients, 5, seed=3, strata=label)
    assert sorted(p for f in folds for p in f) == sorted(patients)  # a partition
    positives = [sum(label[p] for p in f) for f in folds]
    assert max(positives) - min(positives) <= 1  # 8 over 5 folds: 1 or 2 each
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert kfold_patients(patients, 5, seed=3, strata=label) == folds  # deterministic
    assert kfold_patients(patients, 5, seed=4, strata=label) != folds

    # continuous target: in value order, every block of k patients sends one to each fold
    value = {p: float((i * 7) % 23) for i, p in enumerate(patients)}
    folds = kfold_patients(patients, 4, seed=0, strata=value)
    fold_of = {p: i for i, f in enumerate(folds) for p in f}
    order = sorted(patients, key=value.__getitem__)
    for b in range(0, 20, 4):
        assert sorted(fold_of[p] for p in order[b : b + 4]) == [0, 1, 2, 3]

    # per-patient strata from study labels (text from a CSV too), studies follow patients
    study_patient = {f"s{i}": f"p{i // 2:02d}" for i in range(46)}
    strata = patient_strata(study_patient, {s: str(i % 4) for i, s in enumerate(study_patient)})
    assert strata["p00"] == 0.5 and strata["p01"] == 2.5
    splits = make_kfold(study_patient, 5, seed=0, strata=strata)
    assert all(s.method.endswith(":stratified") for s in splits)
    for s in splits:
        assert not {study_patient[x] for x in s.of("test")} & {
            study_patient[x] for x in s.of("train") | s.of("val")
        }


def test_unlabelled_patients_and_class_names_in_strata():
    from foundation.evaluation.splits import kfold_patients, patient_strata

    strata = patient_strata({"a": "p1", "b": "p2", "c": "p3"}, {"a": "yes", "b": "no", "c": None})
    assert strata == {"p1": 1.0, "p2": 0.0}  # class index; no value: left out
    folds = kfold_patients(["p1", "p2", "p3"], 2, seed=0, strata=strata)
    assert sorted(p for f in folds for p in f) == ["p1", "p2", "p3"]


def test_ridge_probe_stays_within_the_fitted_target_range():
    """A log1p calcium probe must not turn one outlying study into an absurd score."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    score = np.expm1(np.clip(2.0 + 1.5 * x[:, 0] + 0.1 * rng.normal(size=40), 0.0, None))
    task = TaskSpec(name="calcium", type="regression", target_transform="log1p")
    task.fit_normalisation(score.tolist())
    t = np.array([task.encode({"calcium": v}) for v in score])
    predict, _ = fit_linear_probe(x, t, [f"p{i}" for i in range(40)], task)
    inside = predict(x[:5])[:, 0]
    assert np.corrcoef(inside, score[:5])[0, 1] > 0.9  # the probe does learn the signal
    far = np.zeros((1, 4))
    far[0, 0] = 50.0  # 50 standard deviations out: unclipped, expm1 of ~77
    assert predict(far)[0, 0] == pytest.approx(score.max(), rel=1e-4)
    assert predict(-far)[0, 0] == pytest.approx(score.min(), abs=1e-3)


@pytest.mark.parametrize("hidden", [0, 16])
def test_mlp_probe_stays_within_the_fitted_target_range(hidden: int) -> None:
    """As the ridge probe: an MLP probe extrapolates linearly too (ReLU), and must not turn one
    outlying study into an absurd log1p score."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    score = np.expm1(np.clip(2.0 + 1.5 * x[:, 0] + 0.1 * rng.normal(size=60), 0.0, None))
    task = TaskSpec(name="calcium", type="regression", target_transform="log1p")
    task.fit_normalisation(score[:40].tolist())
    t = np.array([task.encode({"calcium": v}) for v in score])
    t[3] = np.nan  # a missing target is left out of the range, not NaN-poisoning it
    predict, _ = probe_mod.fit_probe(x[:40], t[:40], x[40:], t[40:], task, hidden, steps=300)
    inside = predict(x[40:])[:, 0]
    assert np.corrcoef(inside, score[40:])[0, 1] > 0.9  # the probe does learn the signal
    fitted = np.delete(score[:40], 3)
    far = np.zeros((1, 4))
    far[0, 0] = 50.0  # 50 standard deviations out: unclipped, expm1 of tens
    assert predict(far)[0, 0] == pytest.approx(fitted.max(), rel=1e-4)
    assert predict(-far)[0, 0] == pytest.approx(fitted.min(), abs=1e-3)


def test_target_range_leaves_missing_targets_out() -> None:
    from foundation.evaluation.linear_probe import target_range

    lo, hi = target_range(np.array([[1.0, np.nan], [np.nan, np.nan], [3.0, np.nan]]))
    assert lo.tolist() == [1.0, -np.inf] and hi.tolist() == [3.0, np.inf]
