"""Calibration of predicted uncertainties and the metrics that judge them (METHODS §8).

Inputs are residuals ``r_i = y_i − ŷ_i`` and predicted standard deviations ``σ_i`` (or variances
where the name says so) on a validation / calibration set: plain 1-D arrays. Every function is a
short closed form from 002 §2.4–2.5, so it can be checked by hand on a few numbers.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtri
from scipy.stats import spearmanr


def _vector(name: str, values: np.ndarray, length: int | None = None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {values.shape}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries, expected {length}")
    if len(values) == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains non-finite values")
    return values


def _positive(name: str, values: np.ndarray, length: int) -> np.ndarray:
    values = _vector(name, values, length)
    if np.any(values <= 0):
        raise ValueError(f"{name} must be > 0 everywhere")
    return values


def alpha2(residuals: np.ndarray, variances: np.ndarray) -> float:
    """Global scale ``α² = mean(r²/σ²)`` maximising the Gaussian likelihood (eq. 26).

    Multiply raw variances (e.g. ``fᵀH⁻¹f``) by it to get calibrated ``σ²``.
    """
    r = _vector("residuals", residuals)
    var = _positive("variances", variances, len(r))
    return float(np.mean(r**2 / var))


def alpha2_ensemble(residuals: np.ndarray, variances: np.ndarray, n_members: int) -> float:
    """Bias-corrected scale for an M-member ensemble: ``−1/M + (M−3)/(M−1) · mean(r²/σ²)`` (eq. 27).

    Eq. 26 is biased when ``σ²`` is itself estimated from few members; the correction needs M ≥ 4.
    """
    if n_members < 4:
        raise ValueError(f"n_members must be >= 4 for eq. 27, got {n_members}")
    m = n_members
    return -1.0 / m + (m - 3) / (m - 1) * alpha2(residuals, variances)


def calibration_parity(
    residuals: np.ndarray, sigmas: np.ndarray, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin ``(RMV, RMSE)``: the expected-vs-observed parity data behind ENCE (eq. 28).

    Points are sorted by ``σ`` and split into ``n_bins`` bins of (as near as possible) equal count,
    as in Levi et al.; ``RMV_b = sqrt(mean_b σ²)``, ``RMSE_b = sqrt(mean_b r²)``.
    """
    r = _vector("residuals", residuals)
    s = _positive("sigmas", sigmas, len(r))
    if not 1 <= n_bins <= len(r):
        raise ValueError(f"n_bins must be in [1, {len(r)}], got {n_bins}")
    bins = np.array_split(np.argsort(s, kind="stable"), n_bins)
    rmv = np.array([math.sqrt(np.mean(s[b] ** 2)) for b in bins])
    rmse = np.array([math.sqrt(np.mean(r[b] ** 2)) for b in bins])
    return rmv, rmse


def ence(residuals: np.ndarray, sigmas: np.ndarray, n_bins: int = 10) -> float:
    """Expected normalised calibration error ``mean_b |RMV_b − RMSE_b| / RMV_b`` (eq. 28)."""
    rmv, rmse = calibration_parity(residuals, sigmas, n_bins)
    return float(np.mean(np.abs(rmv - rmse) / rmv))


def miscalibration_area(residuals: np.ndarray, sigmas: np.ndarray, n_levels: int = 101) -> float:
    """Area between expected and observed coverage of central Gaussian intervals (002 §2.4.3).

    For each expected probability ``p`` on a uniform grid of ``n_levels`` points in [0, 1], the
    observed proportion is the fraction of ``|r|/σ ≤ Φ⁻¹((1+p)/2)``; the area is the trapezoid
    integral of ``|observed − p|`` (0 for perfect calibration, at most 1/2). This is the
    "interval" convention of Tran et al. / Uncertainty Toolbox.
    """
    r = _vector("residuals", residuals)
    s = _positive("sigmas", sigmas, len(r))
    if n_levels < 2:
        raise ValueError(f"n_levels must be >= 2, got {n_levels}")
    expected = np.linspace(0.0, 1.0, n_levels)
    bounds = ndtri((1.0 + expected) / 2.0)  # 0 … +inf
    z = np.sort(np.abs(r) / s)
    observed = np.searchsorted(z, bounds, side="right") / len(z)
    return float(np.trapezoid(np.abs(observed - expected), expected))


def gaussian_nll(residuals: np.ndarray, sigmas: np.ndarray) -> float:
    """Mean Gaussian negative log-likelihood ``½ log(2πσ²) + r²/(2σ²)`` (002 §2.4.1)."""
    r = _vector("residuals", residuals)
    s = _positive("sigmas", sigmas, len(r))
    return float(np.mean(0.5 * np.log(2 * np.pi * s**2) + r**2 / (2 * s**2)))


def spearman(residuals: np.ndarray, sigmas: np.ndarray) -> float:
    """Spearman rank correlation of ``σ`` with ``|r|``: does the uncertainty rank errors right?"""
    r = _vector("residuals", residuals)
    s = _vector("sigmas", sigmas, len(r))
    return float(spearmanr(s, np.abs(r)).statistic)


def conformal_quantile(scores: np.ndarray, miscoverage: float) -> float:
    """Split-conformal threshold: the ``⌈(n+1)(1−a)⌉``-th smallest calibration score (002 §2.5).

    ``scores`` are nonconformity scores on the calibration set, ``|r|`` or ``|r|/σ``. Intervals
    ``ŷ ± q`` (or ``ŷ ± q σ``) then cover a new exchangeable point with probability ≥ 1 − a.
    Returns ``inf`` when ``n`` is too small for the requested coverage.
    """
    s = _vector("scores", scores)
    if not 0.0 < miscoverage < 1.0:
        raise ValueError(f"miscoverage must be in (0, 1), got {miscoverage}")
    rank = math.ceil((len(s) + 1) * (1.0 - miscoverage))
    if rank > len(s):
        return math.inf
    return float(np.partition(s, rank - 1)[rank - 1])


def coverage(residuals: np.ndarray, half_widths: np.ndarray | float) -> float:
    """Empirical coverage: the fraction of ``|r| ≤ half_width`` (scalar, or one per point)."""
    r = _vector("residuals", residuals)
    widths = np.broadcast_to(np.asarray(half_widths, dtype=np.float64), r.shape)
    return float(np.mean(np.abs(r) <= widths))
