"""MMIG, Q-optimality and PR-guided augmentation equal brute-force loops (METHODS §3, §4)."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors import make_selector


def _brute(
    method: str,
    candidates: np.ndarray,
    targets: np.ndarray,
    train: np.ndarray | None,
    budget: int,
    sigma: float,
    lam: float,
    probs: np.ndarray,
) -> tuple[list[int], list[float]]:
    """Re-invert H + λ f fᵀ for every candidate at every step and score the targets directly."""
    d = candidates.shape[1]
    h = sigma**2 * np.eye(d)
    if train is not None:
        h += lam * train.T @ train
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(min(budget, len(candidates))):
        before = np.einsum("ij,jk,ik->i", targets, np.linalg.inv(h), targets)
        score = np.full(len(candidates), -np.inf)
        for c, f in enumerate(candidates):
            if c in picks:
                continue
            after = np.einsum(
                "ij,jk,ik->i", targets, np.linalg.inv(h + lam * np.outer(f, f)), targets
            )
            if method == "pr_augment":
                score[c] = probs @ (1.0 / after)
            elif method == "qopt":
                score[c] = probs @ (before - after)
            else:
                score[c] = 0.5 * probs @ np.log(before / after)
        best = int(np.argmax(score))
        picks.append(best)
        scores.append(score[best])
        h += lam * np.outer(candidates[best], candidates[best])
    return picks, scores


CASES = [
    # (seed, n, n_train, n_targets, d, budget, sigma, lam, weighted)
    (0, 40, 30, 5, 6, 8, 1e-3, 1.0, False),
    (1, 30, 3, 4, 8, 6, 1e-2, 1.0, True),  # d > N_train
    (2, 25, 0, 6, 5, 7, 0.5, 2.0, False),  # train=None, λ != 1
]


@pytest.mark.parametrize("method", ["pr_augment", "qopt", "mmig"])
@pytest.mark.parametrize("seed,n,n_train,n_targets,d,budget,sigma,lam,weighted", CASES)
def test_target_aware_equals_brute_force(
    method, seed, n, n_train, n_targets, d, budget, sigma, lam, weighted
):
    rng = np.random.default_rng(seed)
    candidates = rng.normal(size=(n, d)) * rng.uniform(0.3, 2.0, size=(n, 1))
    targets = rng.normal(size=(n_targets, d))
    train = rng.normal(size=(n_train, d)) if n_train else None
    weights = rng.uniform(0.1, 1.0, size=n_targets) if weighted else None
    probs = weights / weights.sum() if weighted else np.full(n_targets, 1 / n_targets)
    selection = make_selector(method, regularizer=sigma, weight=lam).select(
        candidates, budget, train=train, targets=targets, target_weights=weights
    )
    picks, scores = _brute(method, candidates, targets, train, budget, sigma, lam, probs)
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-7)


def test_pr_augment_raises_target_rigidity_and_budget_clamps():
    rng = np.random.default_rng(5)
    candidates, targets = rng.normal(size=(6, 4)), rng.normal(size=(3, 4))
    selection = make_selector("pr_augment").select(
        candidates, 99, train=rng.normal(size=(5, 4)), targets=targets
    )
    assert sorted(selection.indices.tolist()) == list(range(6))
    assert np.all(np.diff(selection.scores) > 0)  # each pick raises the mean target PR


def test_target_aware_errors_name_the_input():
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="targets"):
        make_selector("qopt").select(x, 2)
    with pytest.raises(ValueError, match="targets"):
        make_selector("qopt").select(x, 2, targets=np.ones((2, 4)))
    with pytest.raises(ValueError, match="target_weights"):
        make_selector("mmig").select(x, 2, targets=np.ones((2, 3)), target_weights=[1.0])
    with pytest.raises(ValueError, match="train"):
        make_selector("pr_augment").select(x, 2, train=np.ones((2, 2)), targets=np.ones((2, 3)))
