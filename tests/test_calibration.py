"""Calibration metrics (METHODS §8) against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from alforge.uncertainty.calibration import (
    alpha2,
    alpha2_ensemble,
    calibration_parity,
    conformal_quantile,
    coverage,
    ence,
    gaussian_nll,
    miscalibration_area,
    spearman,
)

R = np.array([1.0, -2.0, 0.5, 3.0])
S = np.array([1.0, 1.0, 0.5, 2.0])


def test_alpha2_eq26_and_eq27():
    # r²/σ² = 1, 4, 1, 2.25 -> mean 8.25/4
    assert alpha2(R, S**2) == pytest.approx(8.25 / 4)
    # M = 5: -1/5 + (2/4) * 2.0625
    assert alpha2_ensemble(R, S**2, 5) == pytest.approx(-0.2 + 0.5 * 2.0625)
    with pytest.raises(ValueError, match="n_members"):
        alpha2_ensemble(R, S**2, 3)


def test_ence_and_parity_by_hand():
    # Two bins sorted by σ: {σ=0.5 (r=0.5), σ=1 (r=1)} and {σ=1 (r=-2), σ=2 (r=3)}.
    rmv, rmse = calibration_parity(R, S, n_bins=2)
    np.testing.assert_allclose(rmv, [math.sqrt((0.25 + 1) / 2), math.sqrt((1 + 4) / 2)])
    np.testing.assert_allclose(rmse, [math.sqrt((0.25 + 1) / 2), math.sqrt((4 + 9) / 2)])
    expected = (0.0 + abs(math.sqrt(2.5) - math.sqrt(6.5)) / math.sqrt(2.5)) / 2
    assert ence(R, S, n_bins=2) == pytest.approx(expected)


def test_miscalibration_area_by_hand():
    # |r|/σ = 1, 2, 1, 1.5. Grid p = 0, 0.5, 1: bounds 0, Φ⁻¹(0.75)=0.674, inf
    # observed 0, 0, 1 -> |obs - p| = 0, 0.5, 0 -> trapezoid = 0.25
    assert miscalibration_area(R, S, n_levels=3) == pytest.approx(0.25)
    # Perfectly calibrated quantiles give an area near 0.
    z = norm.ppf((np.arange(2000) + 0.5) / 2000)
    assert miscalibration_area(z, np.ones_like(z)) < 2e-3


def test_nll_spearman_by_hand():
    expected = np.mean(0.5 * np.log(2 * np.pi * S**2) + R**2 / (2 * S**2))
    assert gaussian_nll(R, S) == pytest.approx(expected)
    # ranks of σ: 1.5,1.5,... tie-aware; |r| = 1,2,0.5,3 -> Spearman of (1,1,.5,2) vs (1,2,.5,3)
    assert spearman(R, S) == pytest.approx(0.9486832980505138)


def test_conformal_quantile_and_coverage():
    scores = np.array([0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.4, 0.8, 0.6])  # n = 9
    # a = 0.2: rank ceil(10 * 0.8) = 8 -> 8th smallest = 0.8
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.8)
    # a = 0.05: rank ceil(9.5) = 10 > 9 -> inf
    assert conformal_quantile(scores, 0.05) == math.inf
    assert coverage(np.array([0.1, -0.5, 0.9, 2.0]), 0.8) == pytest.approx(0.5)
    assert coverage(R, 1.5 * S) == pytest.approx(0.75)
    # Coverage guarantee on exchangeable data.
    rng = np.random.default_rng(0)
    cal, test = np.abs(rng.normal(size=999)), rng.normal(size=20000)
    assert coverage(test, conformal_quantile(cal, 0.1)) >= 0.88


def test_errors_name_the_input():
    with pytest.raises(ValueError, match="variances"):
        alpha2(R, np.zeros(4))
    with pytest.raises(ValueError, match="sigmas"):
        ence(R, S[:3])
    with pytest.raises(ValueError, match="residuals"):
        gaussian_nll(np.full(4, np.nan), S)
    with pytest.raises(ValueError, match="miscoverage"):
        conformal_quantile(S, 1.5)
