"""Metrics against hand-computed values and their defining properties; patient-level splits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from foundation.evaluation.metrics import (
    average_ranks,
    balanced_accuracy_labels,
    binary_auprc,
    binary_auroc,
    bootstrap_ci,
    compute_metrics,
    evaluate_predictions,
    mae,
    pearson,
    r2,
    rmse,
    roc_curve,
)
from foundation.evaluation.report import json_clean
from foundation.evaluation.retrieval import recall_at_k
from foundation.evaluation.splits import assign_patients, kfold_patients, make_kfold, make_split


# ---- regression -------------------------------------------------------------------------------
def test_regression_metrics_by_hand() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.0, 5.0])  # errors 0.5, 0, -1, 1
    assert mae(y, p) == pytest.approx(2.5 / 4)
    assert rmse(y, p) == pytest.approx(math.sqrt(2.25 / 4))
    assert r2(y, p) == pytest.approx(1 - 2.25 / 5.0)  # SS_tot = 2.25+0.25+0.25+2.25
    # Pearson by hand: deviations y (-1.5,-.5,.5,1.5), p (-1.125,-.625,-.625,2.375)
    yc, pc = np.array([-1.5, -0.5, 0.5, 1.5]), np.array([-1.125, -0.625, -0.625, 2.375])
    assert pearson(y, p) == pytest.approx((yc @ pc) / math.sqrt((yc @ yc) * (pc @ pc)))


def test_regression_properties() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    m = compute_metrics("regression", y, y)
    assert m["mae"] == 0 and m["rmse"] == 0 and m["r2"] == 1 and m["pearson"] == pytest.approx(1)
    assert pearson(y, -2 * y + 3) == pytest.approx(-1)
    assert r2(y, np.full_like(y, y.mean())) == pytest.approx(0)
    assert math.isnan(r2(np.ones(4), np.arange(4.0)))  # undefined, not an error
    assert math.isnan(pearson(np.arange(4.0), np.ones(4)))


# ---- classification ---------------------------------------------------------------------------
def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([10, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]


def test_auroc_and_auprc_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): (.35,.1) win, (.35,.4) lose, (.8,.1) win, (.8,.4) win -> 3/4
    assert binary_auroc(y, s) == pytest.approx(0.75)
    # descending: .8 (P, prec 1, rec .5), .4 (N), .35 (P, prec 2/3, rec 1) -> .5*1 + .5*2/3
    assert binary_auprc(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    fpr, tpr = roc_curve(y, s)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_auroc_properties_and_ties() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.3, 0.7, 0.8, 0.2])
    assert binary_auroc(y, s) == 1.0 and binary_auprc(y, s) == 1.0
    assert binary_auroc(y, -s) == 0.0
    assert binary_auroc(y, np.full(6, 0.5)) == 0.5  # all tied: half credit per pair
    # one tie across classes: pos .5 vs neg .5 counts 1/2 -> (3 + 3 + 2.5) / 9
    s2 = np.array([0.1, 0.9, 0.5, 0.5, 0.8, 0.2])
    assert binary_auroc(y, s2) == pytest.approx(8.5 / 9)
    assert math.isnan(binary_auroc(np.ones(3), np.arange(3.0)))
    # tied scores enter the PR curve together: precision 2/4 at recall 1
    assert binary_auprc(np.array([1, 0, 1, 0]), np.zeros(4)) == pytest.approx(0.5)


def test_accuracy_and_balanced_accuracy() -> None:
    y = np.array([0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])  # all predicted 0
    m = compute_metrics("binary", y, p)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.5
    assert balanced_accuracy_labels(
        np.array([0, 1, 1, 2]), np.array([0, 1, 0, 0])
    ) == pytest.approx((1 + 0.5 + 0) / 3)


def test_multiclass_and_multilabel() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    m = compute_metrics("multiclass", y, probs)
    assert m["accuracy"] == 1 and m["auroc"] == 1 and m["balanced_accuracy"] == 1
    m = compute_metrics("multiclass", y, probs[:, ::-1])
    assert m["accuracy"] == pytest.approx(0.25)
    yl = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    m = compute_metrics("multilabel", yl, yl * 0.9 + 0.05)
    assert m["auroc"] == 1 and m["accuracy"] == 1
    m = compute_metrics("multilabel", yl, 1 - yl)
    assert m["auroc"] == 0 and m["accuracy"] == 0


def test_against_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert binary_auroc(y, s) == pytest.approx(metrics.roc_auc_score(y, s))
    assert binary_auprc(y, s) == pytest.approx(metrics.average_precision_score(y, s))
    lab = (s >= 0.5).astype(int)
    assert balanced_accuracy_labels(y, lab) == pytest.approx(
        metrics.balanced_accuracy_score(y, lab)
    )
    t, p = rng.normal(size=50), rng.normal(size=50)
    assert r2(t, p) == pytest.approx(metrics.r2_score(t, p))


def test_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 5, 40).astype(float)
    assert average_ranks(x).tolist() == pytest.approx(stats.rankdata(x).tolist())
    t, p = rng.normal(size=30), rng.normal(size=30)
    assert pearson(t, p) == pytest.approx(stats.pearsonr(t, p)[0])


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    s = rng.random(80) + 0.5 * y
    a = evaluate_predictions("binary", y, s, n_bootstrap=300, seed=7)
    b = evaluate_predictions("binary", y, s, n_bootstrap=300, seed=7)
    c = evaluate_predictions("binary", y, s, n_bootstrap=300, seed=8)
    assert a == b and a["auroc"]["ci"] != c["auroc"]["ci"]
    lo, hi = a["auroc"]["ci"]
    assert lo < a["auroc"]["value"] < hi and hi - lo < 0.4
    # Percentiles by hand: with a constant metric the interval collapses onto it.
    ci = bootstrap_ci(lambda t, p: {"m": 1.0}, y, s, n=20)
    assert ci["m"] == (1.0, 1.0)
    # More data, narrower interval.
    y_big, s_big = np.tile(y, 8), np.tile(s, 8)
    big = evaluate_predictions("binary", y_big, s_big, n_bootstrap=300, seed=7)["auroc"]["ci"]
    assert big[1] - big[0] < hi - lo


def test_log1p_metrics_of_a_heavy_tailed_target() -> None:
    # scores 0, 9, 99, 999; predictions off by a factor of 10 on the small ones and exact on
    # the tail: log1p errors 0, ln 10 / ~ln 10, 0 by hand
    y = np.array([0.0, 9.0, 99.0, 999.0])
    p = np.array([0.0, 99.0, 9.0, 999.0])
    m = evaluate_predictions("regression", y, p, n_bootstrap=50, target_transform="log1p")
    assert m["mae"]["value"] == pytest.approx(180 / 4)  # the original units stay
    assert m["mae_log1p"]["value"] == pytest.approx(2 * math.log(10) / 4)
    assert m["pearson_log1p"]["value"] == pytest.approx(pearson(np.log1p(y), np.log1p(p)))
    lo, hi = m["mae_log1p"]["ci"]
    assert lo <= m["mae_log1p"]["value"] <= hi
    # a negative prediction (a head's linear output) counts as 0, as the decoded head clamps
    neg = evaluate_predictions("regression", y, p - 100, n_bootstrap=0, target_transform="log1p")
    assert neg["rmse_log1p"]["value"] == pytest.approx(
        rmse(np.log1p(y), np.log1p(np.clip(p - 100, 0, None)))
    )
    assert "mae_log1p" not in evaluate_predictions("regression", y, p, n_bootstrap=0)


def test_a_task_names_its_headline_metric() -> None:
    from foundation.models.heads import TaskSpec

    assert TaskSpec("ctr").metric == "mae" and TaskSpec("c", "binary").metric == "auroc"
    log = TaskSpec("calcium", target_transform="log1p", metric="mae_log1p")
    assert log.metric == "mae_log1p"
    with pytest.raises(ValueError, match="metric must be one of"):
        TaskSpec("ctr", metric="mae_log1p")  # not fitted on log1p: no such metric
    with pytest.raises(ValueError, match="metric must be one of"):
        TaskSpec("c", "binary", metric="mae")


# ---- retrieval --------------------------------------------------------------------------------
def test_recall_at_k() -> None:
    sim = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.3, 0.4, 0.2]])
    # own-pair ranks: row0 0, row1 1, row2 2
    r = recall_at_k(sim, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert recall_at_k(np.ones((4, 4)), ks=(1,))[1] == 0.0  # ties count against the query


# ---- splits -----------------------------------------------------------------------------------
def _cohort(n_patients: int = 40) -> dict[str, str]:
    """study -> patient, with 1-3 studies per patient."""
    return {f"s{p}_{j}": f"p{p}" for p in range(n_patients) for j in range(1 + p % 3)}


def test_split_by_patient_is_disjoint_and_deterministic() -> None:
    study_patient = _cohort()
    split = make_split(study_patient, (0.6, 0.2, 0.2), seed=5)
    sides = {name: {study_patient[s] for s in split.of(name)} for name in ("train", "val", "test")}
    assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"]
    assert not sides["val"] & sides["test"]
    assert set().union(*split.studies.values()) == set(study_patient)
    assert [len(v) for v in sides.values()] == [24, 8, 8]
    assert make_split(study_patient, (0.6, 0.2, 0.2), seed=5).studies == split.studies
    assert make_split(study_patient, (0.6, 0.2, 0.2), seed=6).studies != split.studies
    # Order of the input does not matter, only the pseudonyms and the seed.
    shuffled = dict(reversed(list(study_patient.items())))
    assert make_split(shuffled, (0.6, 0.2, 0.2), seed=5).studies == split.studies


def test_tiny_cohort_still_gets_every_split() -> None:
    groups = assign_patients(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
    assert all(len(g) == 1 for g in groups.values())


def test_kfold_covers_each_patient_once_as_test(tmp_path) -> None:
    study_patient = _cohort(23)
    folds = kfold_patients(set(study_patient.values()), 5, seed=0)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted(set(study_patient.values()))
    splits = make_kfold(study_patient, 5, seed=0)
    tests = [s.of("test") for s in splits]
    assert set().union(*tests) == set(study_patient) and sum(map(len, tests)) == len(study_patient)
    for s in splits:
        train = {study_patient[x] for x in s.of("train") | s.of("val")}
        assert not train & {study_patient[x] for x in s.of("test")}
    path = splits[0].save(tmp_path / "split.json")
    assert "p0" not in path.read_text()  # studies and counts, not patient lists


def test_json_clean_leaves_strict_json() -> None:
    # a one-class test split gives NaN AUROC; metrics.json must still parse as strict JSON
    clean = json_clean({"auroc": {"value": math.nan, "ci": [math.nan, math.inf]}, "n": [1, 2.5]})
    assert clean == {"auroc": {"value": None, "ci": [None, None]}, "n": [1, 2.5]}
    json.dumps(clean, allow_nan=False)


def test_a_grouped_bootstrap_resamples_whole_patients() -> None:
    # patient A has two studies (targets 1, 1), patient B one (target 0)
    y = np.array([1.0, 1.0, 0.0])
    seen: list[tuple[int, float]] = []

    def record(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        seen.append((len(a), float(a.sum())))
        return {"mean": float(a.mean())}

    bootstrap_ci(record, y, y, n=200, seed=0, groups=np.array(["A", "A", "B"]))
    assert set(seen) == {(4, 4.0), (3, 2.0), (2, 0.0)}  # AA, AB, BB: never half a patient
    seen.clear()
    bootstrap_ci(record, y, y, n=200, seed=0)  # by study: three draws of single studies
    assert {n for n, _ in seen} == {3} and (3, 1.0) in seen
    # one patient: every resample is the whole set, so there is no interval to give
    one = bootstrap_ci(record, y, y, n=20, groups=np.array(["A", "A", "A"]))
    assert all(math.isnan(v) for v in one["mean"])
    with pytest.raises(ValueError, match="2 group labels for 3 cases"):
        bootstrap_ci(record, y, y, n=20, groups=np.array(["A", "B"]))
