"""Prediction rigidities (METHODS §2) against explicit inverses."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.uncertainty.rigidity import (
    Hessian,
    calibrated_variance,
    component_prediction_rigidity,
    local_prediction_rigidity,
    prediction_rigidity,
)


def _data(seed: int = 0, n: int = 30, d: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(12, d))


def test_hessian_matches_definition():
    train = np.random.default_rng(1).normal(size=(6, 4))
    h = Hessian.from_features(train, regularizer=0.3, energy_weight=2.0)
    np.testing.assert_allclose(h.matrix, 2.0 * train.T @ train + 0.09 * np.eye(4), rtol=1e-13)
    with pytest.raises(ValueError, match="energy_weight"):
        Hessian.from_features(train, energy_weight=-1.0)


def test_pr_lpr_and_variance_match_explicit_inverse():
    train, queries = _data()
    h = Hessian.from_features(train, regularizer=0.05)
    explicit = np.linalg.inv(train.T @ train + 0.05**2 * np.eye(train.shape[1]))
    quad = np.einsum("ij,jk,ik->i", queries, explicit, queries)
    np.testing.assert_allclose(prediction_rigidity(h, queries), 1 / quad, rtol=1e-10)
    np.testing.assert_allclose(local_prediction_rigidity(h, queries), 1 / quad, rtol=1e-10)
    np.testing.assert_allclose(calibrated_variance(h, queries, 2.5), 2.5 * quad, rtol=1e-10)
    np.testing.assert_allclose(
        h.whiten(queries) @ h.whiten(queries).T, queries @ explicit @ queries.T, atol=1e-10
    )


@pytest.mark.parametrize("seed,n_train,sigma", [(0, 30, 1e-3), (1, 3, 1e-2), (2, 0, 0.5)])
def test_pr_rises_by_exactly_one_when_structure_is_added(seed, n_train, sigma):
    rng = np.random.default_rng(seed)
    d = 6
    train = rng.normal(size=(n_train, d)) if n_train else None
    structures = rng.normal(size=(5, d))
    h = Hessian.from_features(train, dim=d, regularizer=sigma)
    before = prediction_rigidity(h, structures)
    for k, f in enumerate(structures):
        after = prediction_rigidity(h.updated(f[None, :]), f[None, :])[0]
        assert after - before[k] == pytest.approx(1.0, rel=0, abs=1e-8 * max(1.0, after))


def test_cpr_equals_zeroed_feature_vector():
    train, queries = _data(3, d=9)
    h = Hessian.from_features(train, regularizer=0.1)
    blocks = [("readout0", 0, 4), ("readout1", 4, 9), ("overlap", 2, 6)]
    cpr = component_prediction_rigidity(h, queries, blocks)
    explicit = np.linalg.inv(h.matrix)
    for name, start, stop in blocks:
        g = np.zeros_like(queries)
        g[:, start:stop] = queries[:, start:stop]
        expected = 1 / np.einsum("ij,jk,ik->i", g, explicit, g)
        np.testing.assert_allclose(cpr[name], expected, rtol=1e-10)
    # The full block is the PR itself.
    full = component_prediction_rigidity(h, queries, [("all", 0, 9)])["all"]
    np.testing.assert_allclose(full, prediction_rigidity(h, queries), rtol=1e-10)


def test_errors_name_the_input():
    train, queries = _data()
    h = Hessian.from_features(train)
    with pytest.raises(ValueError, match="features"):
        prediction_rigidity(h, queries[:, :3])
    with pytest.raises(ValueError, match="atom_features"):
        local_prediction_rigidity(h, queries[0])
    with pytest.raises(ValueError, match="block 'bad'"):
        component_prediction_rigidity(h, queries, [("bad", 5, 3)])
    with pytest.raises(ValueError, match="regularizer"):
        Hessian.from_features(train, regularizer=0.0)
    with pytest.raises(ValueError, match="dim"):
        Hessian.from_features(None)
    with pytest.raises(ValueError, match="alpha2"):
        calibrated_variance(h, queries, 0.0)
