"""The constant (mean) predictor: the floor a head must beat, on the same folds."""

import math

import numpy as np

from foundation.evaluation.baseline import constant_predictions, split_pairs
from foundation.evaluation.splits import Split
from foundation.models.heads import TaskSpec

ROWS = {
    "s1": {"y": 0.0, "c": 1.0, "k": "a"},
    "s2": {"y": 9.0, "c": 0.0, "k": "b"},
    "s3": {"y": 3.0, "c": 1.0, "k": "a"},
    "s4": {"y": 99.0, "c": math.nan, "k": "a"},
}
POOLED = Split(studies={"fold0": ["s1", "s2"], "fold1": ["s3", "s4"]}, method="kfold:2:pooled")
HOLDOUT = Split(studies={"train": ["s1", "s2"], "val": ["s3"], "test": ["s4"]})


def test_pairs_fit_on_the_other_folds_or_on_train_and_val():
    assert split_pairs(POOLED) == [({"s3", "s4"}, {"s1", "s2"}), ({"s1", "s2"}, {"s3", "s4"})]
    assert split_pairs(HOLDOUT) == [({"s1", "s2", "s3"}, {"s4"})]


def test_regression_falls_back_to_the_fitted_mean_in_target_space():
    plain = constant_predictions(TaskSpec(name="y", type="regression"), ROWS, POOLED)
    assert plain["s1"] == plain["s2"] == [51.0]  # mean of s3, s4
    assert plain["s3"] == [4.5]  # mean of s1, s2
    log = constant_predictions(
        TaskSpec(name="y", type="regression", target_transform="log1p"), ROWS, HOLDOUT
    )
    expected = math.expm1(np.mean(np.log1p([0.0, 9.0, 3.0])))  # not the plain mean, 4.0
    assert math.isclose(log["s4"][0], expected, rel_tol=1e-9)


def test_classification_falls_back_to_the_fitted_class_shares():
    binary = constant_predictions(TaskSpec(name="c", type="binary"), ROWS, POOLED)
    assert binary["s1"] == [1.0]  # s3 positive, s4 unlabelled: left out
    assert binary["s3"] == [0.5]
    multi = constant_predictions(
        TaskSpec(name="k", type="multiclass", classes=["a", "b"]), ROWS, HOLDOUT
    )
    assert np.allclose(multi["s4"], [2 / 3, 1 / 3])


def test_probe_suite_reports_the_mean_predictor(tmp_path):
    """fit_probes + the finetune summary carry the baseline next to the encoders."""
    from foundation.evaluation.probe import POOLED as POOLED_FOLD
    from foundation.evaluation.probe import fit_probes
    from foundation.training.finetune import FinetuneConfig
    from foundation.training.finetune import _finish as finish

    rng = np.random.default_rng(0)
    studies = [f"s{i:02d}" for i in range(24)]
    patients = {s: f"p{i // 2:02d}" for i, s in enumerate(studies)}
    x = rng.normal(size=(24, 8))
    rows = {s: {"y": float(v)} for s, v in zip(studies, rng.normal(size=24), strict=True)}
    cfg = FinetuneConfig.from_dict(
        {
            "name": "t",
            "tasks": [{"name": "y", "type": "regression"}],
            "data": {"manifest": "m.json", "modality": "CT"},
            "labels": {"path": "l.csv", "key_column": "study"},
            "split": {"kfold": 4, "fold": POOLED_FOLD},
            "eval": {"n_bootstrap": 50},
            "out_dir": str(tmp_path),
        }
    )
    result = fit_probes(cfg, studies, x, patients, rows)

    class Loaded:
        identity, report = "random", None

    out = finish(cfg, Loaded(), result, tmp_path)
    base = out["tasks"]["y"]["baseline"]["mae"]["value"]
    pooled = constant_predictions(cfg.tasks[0], rows, result["split"])
    y = np.array([rows[s]["y"] for s in sorted(pooled)])
    assert math.isclose(base, float(np.mean(np.abs(y - [pooled[s][0] for s in sorted(pooled)]))))
