"""The probe suite: every biomarker task probed on a pretrained encoder and on a random init.

``run_probe_suite`` turns a list of finetune configs into probe jobs (``run_finetune`` with
``freeze: linear_probe`` or ``mlp_probe``), the same ones for the pretrained encoder and for a
randomly initialised encoder of the same shape, so the comparison isolates what pretraining
learned; the mean predictor of the same split is the floor both must beat. It collects the
metrics with their intervals per task and writes ``results.md``, ``results.json`` and plots
(``foundation.evaluation.report``). The probes themselves and their embedding cache live in
``foundation.evaluation.probe``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from foundation.evaluation.splits import POOLED
from foundation.sample import Sample


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for p in path:
        cfg = cfg.setdefault(p, {})
    cfg[last] = value


def evaluation_mode(split: dict[str, Any]) -> str:
    """How a config's metrics are computed, in words (``split``: its split section)."""
    k, fold = split.get("kfold") or 0, split.get("fold", 0)
    kind = "stratified " if split.get("stratify", True) else ""
    if k > 1 and fold == POOLED:
        return f"{k}-fold {kind}patient-level cross-validation, pooled out-of-fold predictions"
    if k > 1:
        return f"fold {fold} of a {k}-fold {kind}patient-level split"
    return "patient-level test split"


def run_probe_suite(
    checkpoint: str | Path | None,
    manifest: str | Path,
    label_table: str | Path,
    tasks: Sequence[Any],
    key: Any,
    out_dir: str | Path,
    *,
    probe: str = "linear",
    cache_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    vision: dict | None = None,
    samples_fn: Callable[[], Iterable[Sample]] | None = None,
    transform: Callable[[np.ndarray, dict], Tensor] | None = None,
    kfold: int | None = None,
    exclusion_list: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Probe every task on the pretrained encoder (if given) and on a random init of it.

    ``tasks``: finetune configs (paths, dicts or FinetuneConfig); ``exclusion_list``: the
    patients no probe reads (its version is recorded in each run's metrics), else each task
    config's ``data.exclusion_list``. ``overrides``:
    dotted config keys set on every task (e.g. ``{"data.image_size": [64, 64]}``). ``kfold``: ``k > 1``
    evaluates by patient-level k-fold cross-validation: a probe per fold, fitted on the other
    folds, predicts its fold, and the metrics and bootstrap intervals are computed on the
    pooled out-of-fold predictions of every study; else on each config's test split. Returns
    per task ``{"metric", "type", "evaluation", "n_test", "pretrained", "pretrained_ci",
    "random_init", "random_init_ci", "metrics"}`` and writes ``out_dir/results.{md,json}``
    and plots.
    """
    from foundation.evaluation.report import write_report
    from foundation.training.finetune import FinetuneConfig, run_finetune

    out = Path(out_dir)
    inits = (["pretrained"] if checkpoint is not None else []) + ["random_init"]
    summary: dict[str, dict[str, Any]] = {}
    plots: dict[str, dict[str, dict]] = {}
    for task in tasks:
        base = FinetuneConfig.from_any(task).to_dict()
        # the suite's data and table; its exclusion list, else the one the task config names
        base["data"]["manifest"] = str(manifest)
        if exclusion_list:
            base["data"]["exclusion_list"] = str(exclusion_list)
        base["labels"]["path"] = str(label_table)
        base["encoder"].update(
            freeze=f"{probe}_probe", checkpoint=str(checkpoint) if checkpoint else None
        )
        if vision is not None:
            base["encoder"]["vision"] = vision
        base["eval"].update(n_bootstrap=n_bootstrap, seed=seed)
        base["cache_dir"] = str(cache_dir or out / "embedding_cache")
        if kfold is not None and kfold > 1:
            base["split"].update(kfold=int(kfold), fold=POOLED)
        for dotted, value in (overrides or {}).items():
            _set(base, dotted, value)
        evaluation = evaluation_mode(base["split"])
        for init in inits:
            cfg = copy.deepcopy(base)
            cfg["encoder"]["init"] = "pretrained" if init == "pretrained" else "random"
            cfg["out_dir"] = str(out / base["name"] / init)
            samples = samples_fn() if samples_fn else None
            res = run_finetune(cfg, key, samples=samples, transform=transform)
            for name, tr in res["tasks"].items():
                m = tr["metrics"][tr["metric"]]
                entry = summary.setdefault(
                    name,
                    {
                        "metric": tr["metric"],
                        "type": tr["type"],
                        "evaluation": evaluation,
                        "n_test": tr["n_test"],
                        "pretrained": None,
                        "pretrained_ci": None,
                        "metrics": {},
                    },
                )
                entry[init], entry[f"{init}_ci"] = m["value"], m["ci"]
                if "baseline" in tr and "baseline" not in entry:  # same split, same studies
                    b = tr["baseline"][tr["metric"]]
                    entry["baseline"], entry["baseline_ci"] = b["value"], b["ci"]
                    entry["metrics"]["baseline"] = tr["baseline"]
                entry["target_transform"] = tr.get("target_transform")
                entry["metrics"][init] = tr["metrics"]
                plots.setdefault(name, {})[init] = res["predictions"][name]
    write_report(summary, plots, out)
    return summary
