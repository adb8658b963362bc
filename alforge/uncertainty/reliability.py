"""How good a binary reliability signal is (METHODS §6; the evaluation seed 003 found missing in 004).

Arrays in, numbers out, numpy/scipy only. ``labels`` are 1 for reliable (error at most the class
boundary), ``p`` the predicted probability of reliable, ``errors`` the true absolute errors.

- :func:`binary_metrics`: accuracy, MCC, F1 of the *reliable* class, from hard predictions.
- :func:`reliability_report`: those at ``p ≥ 0.5`` plus ROC-AUC (ties count ½), ECE (equal-width
  bins of ``p`` against the observed reliable fraction, weighted by bin size), Brier, Spearman of
  ``1 − p`` with the error, and per cutoff ``c`` the selective-prediction table: predictions with
  confidence ``max(p, 1 − p) ≥ c`` are kept; their coverage, accuracy, MCC, F1 and the mean true
  error of the kept "reliable" (``p ≥ c``) and kept "unreliable" (``p ≤ 1 − c``) subsets.
- Baselines on the same labels: :func:`ensemble_std_baseline` (committee energy std / √n,
  unreliable above its median, as 004 §2.2) and :func:`majority_baseline`.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr

__all__ = [
    "CUTOFFS",
    "binary_metrics",
    "ensemble_std_baseline",
    "expected_calibration_error",
    "majority_baseline",
    "reliability_report",
    "roc_auc",
]

CUTOFFS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.5 … 0.95


def _vectors(labels: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be a 1-D array of 0/1, got shape {y.shape}")
    out = [y.astype(np.int64)]
    for name, v in zip(("p", "errors"), others):
        v = np.asarray(v, dtype=np.float64)
        if v.shape != y.shape or not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be a finite array of shape {y.shape}, got {v.shape}")
        out.append(v)
    return tuple(out)


def binary_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy, MCC (0 when a row or column of the confusion matrix is empty) and F1 of class 1."""
    y, yhat = _vectors(labels)[0], _vectors(predicted)[0]
    if y.shape != yhat.shape:
        raise ValueError(f"labels {y.shape} and predictions {yhat.shape} differ in shape")
    if y.size == 0:
        return {"n": 0, "accuracy": float("nan"), "mcc": float("nan"), "f1": float("nan")}
    tp = float(np.sum((y == 1) & (yhat == 1)))
    tn = float(np.sum((y == 0) & (yhat == 0)))
    fp = float(np.sum((y == 0) & (yhat == 1)))
    fn = float(np.sum((y == 1) & (yhat == 0)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "n": int(y.size),
        "accuracy": (tp + tn) / y.size,
        "mcc": float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0,
    }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random reliable structure scores above a random unreliable one (ties ½);
    NaN when a class is missing. The Mann–Whitney U statistic over average ranks."""
    y, s = _vectors(labels, scores)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def expected_calibration_error(labels: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """``Σ_b (n_b / N) |mean p_b − fraction reliable_b|`` over equal-width bins of ``p`` in [0, 1]."""
    y, p = _vectors(labels, p)
    if y.size == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() / y.size * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def reliability_report(
    labels: np.ndarray, p: np.ndarray, errors: np.ndarray, cutoffs: tuple[float, ...] = CUTOFFS, n_bins: int = 10
) -> dict:
    """Every metric of METHODS §6 for one signal on one test set (see the module docstring)."""
    y, p, errors = _vectors(labels, p, errors)
    predicted = (p >= 0.5).astype(np.int64)
    confidence = np.maximum(p, 1 - p)
    table = []
    for c in cutoffs:
        kept = confidence >= c
        row = {"cutoff": float(c), "coverage": float(kept.mean()) if y.size else float("nan")}
        row |= binary_metrics(y[kept], predicted[kept])
        row["mean_error_reliable"] = _mean(errors[kept & (p >= c)])
        row["mean_error_unreliable"] = _mean(errors[kept & (p <= 1 - c)])
        table.append(row)
    return {
        **binary_metrics(y, predicted),
        "roc_auc": roc_auc(y, p),
        "ece": expected_calibration_error(y, p, n_bins),
        "brier": float(np.mean((p - y) ** 2)) if y.size else float("nan"),
        "spearman": _spearman(1 - p, errors),
        "reliable_fraction": float(y.mean()) if y.size else float("nan"),
        "coverage_accuracy": table,
    }


def ensemble_std_baseline(
    labels: np.ndarray, committee_energies: np.ndarray, n_atoms: np.ndarray, errors: np.ndarray
) -> dict:
    """The ensemble baseline of 004 §2.2: ``σ_s = std_m(E_ms) / √n_s`` (ddof 1), reliable where
    ``σ ≤ median(σ)``; its accuracy, MCC, F1, ROC-AUC of ``−σ`` and Spearman of ``σ`` with the error."""
    energies = np.asarray(committee_energies, dtype=np.float64)
    y, errors = _vectors(labels, errors)[0], np.asarray(errors, dtype=np.float64)
    if energies.ndim != 2 or energies.shape[1] != y.size or energies.shape[0] < 2:
        raise ValueError(f"committee_energies must be (M >= 2 models, {y.size} structures), got {energies.shape}")
    sigma = energies.std(axis=0, ddof=1) / np.sqrt(np.asarray(n_atoms, dtype=np.float64))
    predicted = (sigma <= np.median(sigma)).astype(np.int64)
    return {
        **binary_metrics(y, predicted),
        "roc_auc": roc_auc(y, -sigma),
        "spearman": _spearman(sigma, errors),
        "members": int(energies.shape[0]),
    }


def majority_baseline(labels: np.ndarray) -> dict:
    """Always predict the test set's majority class: accuracy = that class's rate, MCC 0."""
    y = _vectors(labels)[0]
    majority = int(y.mean() >= 0.5) if y.size else 1
    return {**binary_metrics(y, np.full(y.size, majority)), "majority_class": majority}
