"""MIG equals a brute-force greedy log-det loop (METHODS §3)."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors import available, make_selector


def _logdet(matrix: np.ndarray) -> float:
    sign, value = np.linalg.slogdet(matrix)
    assert sign > 0
    return value


def _brute_mig(
    candidates: np.ndarray, train: np.ndarray | None, budget: int, sigma: float, lam: float
) -> tuple[list[int], list[float]]:
    """Greedy over log det(H + λ f fᵀ), re-evaluated for every candidate at every step."""
    d = candidates.shape[1]
    h = sigma**2 * np.eye(d)
    if train is not None:
        h += lam * train.T @ train
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(min(budget, len(candidates))):
        base = _logdet(h)
        gains = np.full(len(candidates), -np.inf)
        for i, f in enumerate(candidates):
            if i not in picks:
                gains[i] = 0.5 * (_logdet(h + lam * np.outer(f, f)) - base)
        best = int(np.argmax(gains))
        f = candidates[best]
        scores.append(0.5 * np.log1p(lam * f @ np.linalg.solve(h, f)))
        picks.append(best)
        h += lam * np.outer(f, f)
    return picks, scores


CASES = [
    # (seed, n_candidates, n_train, d, budget, sigma, lam)
    (0, 60, 40, 8, 10, 1e-3, 1.0),
    (1, 50, 5, 12, 12, 1e-3, 1.0),  # d > N_train: rank-deficient training set
    (2, 40, 0, 6, 9, 0.3, 1.0),  # train=None
    (3, 70, 30, 10, 15, 0.1, 2.5),  # weight λ != 1
    (4, 300, 100, 16, 40, 1e-2, 1.0),  # enough candidates for the lazy loop to skip re-scoring
]


@pytest.mark.parametrize("seed,n,n_train,d,budget,sigma,lam", CASES)
def test_mig_equals_brute_force_greedy(seed, n, n_train, d, budget, sigma, lam):
    rng = np.random.default_rng(seed)
    # Unequal scales make the gains well separated, so any rounding-level tie is impossible.
    candidates = rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=(n, 1))
    train = rng.normal(size=(n_train, d)) if n_train else None
    selection = make_selector("mig", regularizer=sigma, weight=lam).select(
        candidates, budget, train=train
    )
    picks, scores = _brute_mig(candidates, train, budget, sigma, lam)
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-8, atol=1e-10)


def test_mig_float32_candidates_match_float64():
    rng = np.random.default_rng(7)
    candidates = rng.normal(size=(80, 10)).astype(np.float32)
    train = rng.normal(size=(20, 10)).astype(np.float32)
    sel32 = make_selector("mig").select(candidates, 10, train=train)
    sel64 = make_selector("mig").select(candidates.astype(np.float64), 10, train=train)
    assert sel32.indices.tolist() == sel64.indices.tolist()
    np.testing.assert_allclose(sel32.scores, sel64.scores, rtol=1e-12)


def test_mig_budget_clamps_and_zero_budget():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(5, 3))
    selection = make_selector("mig").select(candidates, 50, train=rng.normal(size=(4, 3)))
    assert sorted(selection.indices.tolist()) == [0, 1, 2, 3, 4]
    assert np.all(np.diff(selection.scores) <= 1e-12)
    empty = make_selector("mig").select(candidates, 0)
    assert empty.indices.size == 0 and empty.scores.size == 0


def test_mig_bad_shapes_name_the_array():
    mig = make_selector("mig")
    with pytest.raises(ValueError, match="candidates"):
        mig.select(np.zeros(5), 2)
    with pytest.raises(ValueError, match="train"):
        mig.select(np.zeros((5, 3)), 2, train=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="train"):
        mig.select(np.zeros((5, 3)), 2, train=np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="budget"):
        mig.select(np.zeros((5, 3)), -1)
    with pytest.raises(ValueError, match="regularizer"):
        make_selector("mig", regularizer=0.0).select(np.ones((5, 3)), 2)
    with pytest.raises(ValueError, match="weight"):
        make_selector("mig", weight=-1.0).select(np.ones((5, 3)), 2)


def test_mig_registered_and_params_recorded():
    assert {"mig", "mig_label"} <= set(available())
    assert "mig_local" not in available()
    assert make_selector("mig", regularizer=0.1).get_params() == {"regularizer": 0.1, "weight": 1.0}


def test_mig_uses_given_hessian_instead_of_train():
    from alforge.uncertainty.rigidity import Hessian

    rng = np.random.default_rng(11)
    candidates, train = rng.normal(size=(50, 6)), rng.normal(size=(20, 6))
    hessian = Hessian.from_features(train, regularizer=0.05, energy_weight=1.0)
    given = make_selector("mig").select(candidates, 7, train=rng.normal(size=(3, 6)), hessian=hessian)
    built = make_selector("mig", regularizer=0.05).select(candidates, 7, train=train)
    assert given.indices.tolist() == built.indices.tolist()
    np.testing.assert_allclose(given.scores, built.scores, rtol=1e-10)
    with pytest.raises(ValueError, match="hessian"):
        make_selector("mig").select(np.ones((4, 5)), 2, hessian=hessian)
