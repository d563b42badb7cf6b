"""Regularised linear probes, the penalty chosen by cross-validation over training patients.

The standard linear probe of representation learning: features standardised on the training
studies, then ridge regression (regression tasks: closed form, one SVD per fit) or
L2-penalised logistic regression (binary and multi-label: Newton steps per label;
multi-class: full-batch L-BFGS), with the penalty picked from a log grid by k-fold
cross-validation grouped by patient, inside the training studies only. A probe fitted by a fixed number of gradient steps with a fixed weight
decay overfits tens of studies in a few hundred dimensions and is untuned for thousands; a
CV-chosen penalty is right for both, and a large penalty lets a probe fall back to the mean
when the features carry nothing.

Penalty convention (``lam``, per study, on standardised features): ridge minimises
``mean((y - Xw - b)^2) + lam * |w|^2``; logistic ``mean(loss) + lam / 2 * |W|^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from foundation.evaluation.splits import kfold_patients
from foundation.models.heads import TaskSpec

LAMBDAS: tuple[float, ...] = tuple(float(v) for v in np.logspace(-4, 4, 17))
INNER_FOLDS = 5


def patient_folds(groups: Sequence[str], k: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``min(k, n_patients)`` patient-disjoint folds ([] if < 2 patients)."""
    groups = np.asarray(groups)
    patients = sorted(set(groups.tolist()))
    if len(patients) < 2:
        return []
    folds = kfold_patients(patients, min(k, len(patients)), seed)
    return [np.flatnonzero(np.isin(groups, fold)) for fold in folds]


def _standardiser(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)  # constant features stay at 0 instead of blowing up
    return lambda z: (np.asarray(z, np.float64) - mu) / sd


def target_range(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(min, max)`` of encoded targets ``(n, T)``, NaN (missing) left out; a
    column without any target is unbounded. Regression probes clip predictions to it."""
    t = np.asarray(t, np.float64).reshape(len(t), -1)
    seen = ~np.isnan(t)
    lo = np.where(seen, t, np.inf).min(axis=0, initial=np.inf)
    hi = np.where(seen, t, -np.inf).max(axis=0, initial=-np.inf)
    empty = ~seen.any(axis=0)
    return np.where(empty, -np.inf, lo), np.where(empty, np.inf, hi)


# ---- ridge ------------------------------------------------------------------------------------
def ridge_path(
    x: np.ndarray, y: np.ndarray, lambdas: Sequence[float]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge weights ``(D, T)`` and intercepts ``(T,)`` for every penalty; x (n, D), y (n, T)."""
    n = len(x)
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)  # (r, T)
    out = []
    for lam in lambdas:
        w = vt.T @ ((s / (s**2 + n * lam))[:, None] * uty)
        out.append((w, ym - xm @ w))
    return out


# ---- logistic ---------------------------------------------------------------------------------
Fit = tuple[np.ndarray, np.ndarray]  # weights (D, K), intercepts (K,)


def _newton_binary(
    x: np.ndarray, y: np.ndarray, lam: float, init: Fit | None, max_iter: int = 50
) -> Fit:
    """Penalised logistic regression, one output, by damped Newton steps (x: (n, D), y: (n,))."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])  # the intercept is the last column
    pen = np.full(d + 1, lam)
    pen[-1] = 1e-8  # all but unpenalised; finite when a fold holds one class only
    beta = np.zeros(d + 1) if init is None else np.r_[init[0][:, 0], init[1]]

    def objective(bt: np.ndarray) -> float:
        z = xa @ bt
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * (pen * bt * bt).sum())

    f = objective(beta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(xa @ beta)))
        grad = xa.T @ (p - y) / n + pen * beta
        hess = (xa * (p * (1 - p))[:, None]).T @ xa / n + np.diag(pen)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking: Newton may overshoot far from the optimum
            f_new = objective(beta - t * step)
            if f_new <= f:
                break
            t *= 0.5
        beta, f_old, f = beta - t * step, f, f_new
        if f_old - f < 1e-12 or np.abs(t * step).max() < 1e-9:
            break
    return beta[:d, None], beta[d:]


def _lbfgs_multiclass(x: np.ndarray, t: np.ndarray, task: TaskSpec, lam: float) -> Fit:
    """Penalised softmax regression under the task's (masked) loss, full-batch L-BFGS."""
    xt, tt = torch.tensor(x), torch.tensor(t)
    w = torch.zeros(x.shape[1], task.out_features, dtype=xt.dtype, requires_grad=True)
    b = torch.zeros(task.out_features, dtype=xt.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.loss(xt @ w + b, tt) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def _logistic(x: np.ndarray, t: np.ndarray, task: TaskSpec, lam: float, init: Fit | None) -> Fit:
    """Binary / multi-label: one Newton fit per label on its non-missing rows; multi-class."""
    if task.type == "multiclass":
        return _lbfgs_multiclass(x, t, task, lam)
    ws, bs = [], []
    for j in range(t.shape[1]):
        rows = ~np.isnan(t[:, j])
        start = None if init is None else (init[0][:, j : j + 1], init[1][j : j + 1])
        w, b = _newton_binary(x[rows], t[rows, j], lam, start)
        ws.append(w)
        bs.append(b)
    return np.hstack(ws), np.concatenate(bs)


def _logistic_path(
    x: np.ndarray, t: np.ndarray, task: TaskSpec, lambdas: Sequence[float]
) -> list[Fit]:
    """Fits for every penalty, strongest first, each warm-started from the previous one."""
    fits: dict[float, Fit] = {}
    prev = None
    for lam in sorted(lambdas, reverse=True):
        prev = fits[lam] = _logistic(x, t, task, lam, prev)
    return [fits[lam] for lam in lambdas]


# ---- the probe --------------------------------------------------------------------------------
def fit_linear_probe(
    x: np.ndarray,
    t: np.ndarray,
    groups: Sequence[str],
    task: TaskSpec,
    *,
    lambdas: Sequence[float] = LAMBDAS,
    inner_folds: int = INNER_FOLDS,
    seed: int = 0,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Fit a ridge / logistic probe on ``x`` (n, D) and encoded targets ``t`` (n, 1 or L);
    ridge predictions are clipped to the range of the fitted targets.

    ``groups``: the patient of each row; the inner folds keep a patient on one side. NaN
    targets are left out (regression) or masked (classification). Returns ``predict(x) ->
    decoded`` predictions (n, out) and ``{"lambda", "cv_loss"}`` (mean inner-fold loss per
    penalty; the chosen penalty is the smallest loss, the strongest one on ties).
    """
    t = np.asarray(t, np.float64).reshape(len(x), -1)
    keep = ~np.isnan(t).all(axis=1)
    if task.type == "regression":
        keep &= ~np.isnan(t).any(axis=1)
    x, t, groups = np.asarray(x)[keep], t[keep], np.asarray(groups)[keep]
    if not len(x):
        raise ValueError(f"task {task.name!r}: no training targets")
    scale = _standardiser(x)
    xs = scale(x)
    ridge = task.type == "regression"

    def path(rows: np.ndarray) -> list:
        return (
            ridge_path(xs[rows], t[rows], lambdas)
            if ridge
            else _logistic_path(xs[rows], t[rows], task, lambdas)
        )

    def loss(fit: Fit, rows: np.ndarray) -> float:
        w, b = fit
        if ridge:
            return float(np.mean((xs[rows] @ w + b - t[rows]) ** 2))
        return float(task.loss(torch.tensor(xs[rows] @ w + b), torch.tensor(t[rows])))

    folds = patient_folds(groups, inner_folds, seed)
    cv = np.zeros(len(lambdas))
    for val in folds:
        train = np.setdiff1d(np.arange(len(x)), val)
        cv += [loss(fit, val) for fit in path(train)]
    cv /= max(len(folds), 1)
    # Ties: the strongest penalty, the simplest probe. No CV possible: the grid's middle.
    order = np.argsort(-np.asarray(lambdas))
    best = (
        int(order[np.argmin(cv[order])]) if folds else int(np.argsort(lambdas)[len(lambdas) // 2])
    )
    lam = float(lambdas[best])
    if ridge:
        w, b = ridge_path(xs, t, [lam])[0]
    else:
        w, b = _logistic(xs, t, task, lam, None)

    # A ridge probe extrapolates linearly; under a log1p target one study far outside the
    # training features becomes an absurd score (expm1 of it). Predictions stay within the range
    # of the targets the probe was fitted on, as a head without evidence beyond it should.
    lo, hi = target_range(t) if ridge else (None, None)

    def predict(z: np.ndarray) -> np.ndarray:
        zs = scale(z)
        out = zs @ w + b
        if ridge:
            out = np.clip(out, lo, hi)
        with torch.no_grad():
            return task.decode(torch.tensor(out, dtype=torch.float32)).reshape(len(z), -1).numpy()

    return predict, {"lambda": lam, "cv_loss": cv.tolist()}
