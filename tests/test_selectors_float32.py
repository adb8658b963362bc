"""Float32 inputs and the float32 fast paths give the float64 picks (issue 12).

``mig`` whitens in float32 only to bound the scores, MaxVol swaps in float32 and checks in float64,
and ``dopt`` keeps float32 features float32: each is checked here against the brute-force
references of the selectors' own test files, on the same (float32-representable) values.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_selectors_dopt import _lu_rows, _naive_dopt, _naive_maxvol
from test_selectors_mig import CASES, _brute_mig

import alforge.selectors.mig as mig_module
import alforge.uncertainty.rigidity as rigidity
from alforge.selectors import make_selector
from alforge.selectors.dopt import _singular_values, build_active_set, maxvol
from alforge.selectors.mig import float32_variance_bounds
from alforge.uncertainty.rigidity import Hessian


@pytest.mark.parametrize("seed,n,n_train,d,budget,sigma,lam", CASES)
def test_mig_float32_candidates_equal_brute_force(seed, n, n_train, d, budget, sigma, lam):
    rng = np.random.default_rng(seed)
    candidates = (rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=(n, 1))).astype(np.float32)
    train = rng.normal(size=(n_train, d)).astype(np.float32) if n_train else None
    selection = make_selector("mig", regularizer=sigma, weight=lam).select(
        candidates, budget, train=train
    )
    train64 = None if train is None else train.astype(np.float64)
    picks, scores = _brute_mig(candidates.astype(np.float64), train64, budget, sigma, lam)
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-8, atol=1e-10)


def _exact_variance(hessian: Hessian, rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return np.einsum("ij,ji->i", rows, np.linalg.solve(hessian.matrix, rows.T))


def test_float32_bounds_bound_the_float64_variance_and_are_tight_when_well_conditioned():
    rng = np.random.default_rng(3)
    d = 24
    train = rng.normal(size=(200, d))
    hessian = Hessian.from_features(train, regularizer=1e-3)
    candidates = rng.normal(size=(500, d))
    bounds = float32_variance_bounds(hessian, candidates)
    exact = _exact_variance(hessian, candidates)
    assert np.all(bounds >= exact)
    # Tight enough that only near-ties are re-scored: within 0.1 % here.
    assert np.all(bounds <= exact * 1.001)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_bounds_hold_for_hard_inputs(dtype, monkeypatch):
    # Several chunks with a short last one, an ill-conditioned H (σ = 1e-3, train spanning 3 of
    # 16 directions), a large common mean and rows over six decades of scale.
    monkeypatch.setattr(mig_module, "_BOUND_CHUNK_VALUES", 16 * 7)
    rng = np.random.default_rng(5)
    d = 16
    train = rng.normal(size=(40, 3)) @ rng.normal(size=(3, d))
    hessian = Hessian.from_features(train, regularizer=1e-3)
    mean = 50.0 * rng.normal(size=d)
    candidates = (mean + 1e-3 * rng.normal(size=(300, d))) * 10.0 ** rng.uniform(-3, 3, (300, 1))
    candidates = candidates.astype(dtype)
    bounds = float32_variance_bounds(hessian, candidates)
    assert np.all(bounds >= _exact_variance(hessian, candidates))


def test_float32_bounds_fall_back_to_float64_beyond_the_float32_range():
    rng = np.random.default_rng(6)
    hessian = Hessian.from_features(rng.normal(size=(30, 5)), regularizer=1e-3)
    candidates = rng.normal(size=(20, 5))
    candidates[3] *= 1e30  # finite in float64, inf in float32
    bounds = float32_variance_bounds(hessian, candidates)
    exact = _exact_variance(hessian, candidates)
    assert bounds[3] == pytest.approx(exact[3], rel=1e-10)
    assert np.all(bounds >= exact * (1 - 1e-12))


def test_mig_ill_conditioned_hessian_still_equals_brute_force():
    rng = np.random.default_rng(8)
    d = 10
    train = rng.normal(size=(30, 2)) @ rng.normal(size=(2, d))
    mean = 20.0 * rng.normal(size=d)
    candidates = (mean + rng.normal(size=(120, d))).astype(np.float32)
    selection = make_selector("mig", regularizer=1e-3).select(candidates, 12, train=train)
    picks, scores = _brute_mig(candidates.astype(np.float64), train, 12, 1e-3, 1.0)
    assert selection.indices.tolist() == picks
    # cond(H) ~ 1e9: the late gains are small differences, good to ~1e-6 in float64 either way
    # (the float64-only implementation this replaced was off by the same amount).
    np.testing.assert_allclose(selection.scores, scores, rtol=2e-6)


def test_mig_non_finite_candidates_name_the_array():
    candidates = np.ones((6, 3), dtype=np.float32)
    candidates[4, 1] = np.nan
    with pytest.raises(ValueError, match="candidates contains non-finite"):
        make_selector("mig").select(candidates, 2)
    with pytest.raises(ValueError, match="candidates"):
        make_selector("mig").select(np.ones(4, dtype=np.float32), 2)


@pytest.mark.parametrize("seed,n,d,tol", [(0, 400, 10, 1.01), (1, 60, 12, 1.05), (2, 300, 5, 1.3)])
def test_maxvol_float32_input_equals_naive_swaps(seed, n, d, tol):
    rng = np.random.default_rng(seed)
    features = (rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))).astype(np.float32)
    result = maxvol(features, tol=tol)
    exact = features.astype(np.float64)
    assert result.converged
    assert np.abs(exact @ np.linalg.inv(exact[result.rows])).max() <= tol
    assert result.rows.tolist() == _naive_maxvol(exact, tol, _lu_rows(exact))


def test_maxvol_ill_conditioned_active_set_is_checked_in_float64():
    # Columns over ten decades: cond(A) is far beyond what the float32 check can clear, so every
    # row is checked in float64 and the guarantee still holds.
    rng = np.random.default_rng(4)
    features = rng.normal(size=(300, 6)) * np.logspace(0, 10, 6)
    result = maxvol(features, tol=1.05)
    assert result.converged
    assert np.abs(features @ np.linalg.inv(features[result.rows])).max() <= 1.05


def test_streamed_singular_values_equal_numpy_svd(monkeypatch):
    monkeypatch.setattr(rigidity, "_CHUNK_BYTES", 8 * 6 * 13)  # 13 rows per chunk
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(100, 6)) @ np.diag([5.0, 1.0, 1.0, 0.1, 1e-3, 1e-9])
    sing, vt = _singular_values(pool.astype(np.float32))
    exact = pool.astype(np.float32).astype(np.float64)
    ref_sing, ref_vt = np.linalg.svd(exact, full_matrices=False)[1:]
    np.testing.assert_allclose(sing, ref_sing, rtol=1e-9, atol=1e-12 * ref_sing[0])
    # Right singular vectors agree up to sign where the singular values are well separated.
    np.testing.assert_allclose(np.abs(np.sum(vt[:4] * ref_vt[:4], axis=1)), 1.0, rtol=1e-9)
    active = build_active_set(pool.astype(np.float32))
    assert active.rows.dtype == np.float64 and active.rank == 5


@pytest.mark.parametrize("seed,n_train_b,threshold", [(0, 40, 1.0), (1, 3, 1.0), (2, 40, 2.0)])
def test_dopt_float32_inputs_equal_naive_reference(seed, n_train_b, threshold):
    rng = np.random.default_rng(seed)
    d = 4
    train = rng.normal(size=(60 + n_train_b, d)).astype(np.float32)
    train_elements = np.array([1] * 60 + [8] * n_train_b)
    sizes = rng.integers(1, 5, size=15)
    groups = np.repeat(np.arange(200, 215), sizes)
    elements = rng.choice([1, 8], size=len(groups))
    cand = rng.normal(size=(len(groups), d)) * rng.uniform(0.5, 2.5, size=(len(groups), 1))
    cand = cand.astype(np.float32)
    selection = make_selector("dopt", threshold=threshold).select(
        cand, 8, train=train, train_elements=train_elements, groups=groups, elements=elements
    )
    picks, scores = _naive_dopt(
        cand.astype(np.float64), groups, elements, train.astype(np.float64), train_elements, 8,
        1.01, threshold,
    )
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-6)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_maxvol_split_swap_pass_equals_naive_swaps(workers, monkeypatch):
    # Many small column chunks shared among 1–3 worker threads: the same swaps as the naive loop.
    import alforge.selectors.dopt as dopt

    monkeypatch.setattr(dopt, "_SWAP_CHUNK_BYTES", 4 * 10 * 7)  # 7 columns per chunk at d = 10
    monkeypatch.setattr(dopt, "blas_thread_count", lambda: workers)
    rng = np.random.default_rng(9)
    features = rng.normal(size=(400, 10)) * rng.uniform(0.5, 2.0, size=(400, 1))
    result = maxvol(features, tol=1.01)
    assert result.converged and result.n_swaps > 0
    assert result.rows.tolist() == _naive_maxvol(features, 1.01, _lu_rows(features))
