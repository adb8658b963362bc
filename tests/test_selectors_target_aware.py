"""MMIG (002 eq. 44 as printed), Q-optimality and PR-guided augmentation equal brute-force loops
with explicit inverses (METHODS §3, §4)."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors import make_selector
from alforge.uncertainty.rigidity import Hessian


def _quad(x: np.ndarray, m: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    y = x if y is None else y
    return np.einsum("ij,jk,ik->i", x, m, y)


def _brute(method, candidates, targets, h, budget, lam, probs, blocks=None, average="mean"):
    """Re-invert H + λ f fᵀ for every candidate at every step; update by λ f fᵀ or R_cᵀR_c."""
    h = h.copy()
    picks, scores = [], []
    for _ in range(min(budget, len(candidates))):
        before = _quad(targets, np.linalg.inv(h))
        score = np.full(len(candidates), -np.inf)
        for c, f in enumerate(candidates):
            if c in picks:
                continue
            after = _quad(targets, np.linalg.inv(h + lam * np.outer(f, f)))
            if method == "qopt":
                score[c] = probs @ (before - after)
            elif average == "mean":
                score[c] = probs @ (1.0 / after - 1.0 / before)
            elif average == "log":
                score[c] = probs @ np.log(before / after)
            else:
                score[c] = np.min(1.0 / after) - np.min(1.0 / before)
        best = int(np.argmax(score))
        picks.append(best)
        scores.append(score[best])
        if blocks is None:
            h += lam * np.outer(candidates[best], candidates[best])
        else:
            h += blocks[best].T @ blocks[best]
    return picks, scores


def _eq44(f_star: np.ndarray, targets: np.ndarray, cov: np.ndarray, probs: np.ndarray) -> float:
    """002 eq. 44 as printed, with (FᵀF)⁻¹ the current posterior covariance ``cov``."""
    total = 0.0
    for p, f_u in zip(probs, targets, strict=True):
        cross = f_star @ cov @ f_u
        total += p * np.log(1.0 - cross**2 / ((f_u @ cov @ f_u) * (f_star @ cov @ f_star)))
    return -0.5 * total


def _brute_mmig(candidates, targets, h, budget, probs, blocks=None):
    """Greedy eq. 44; noiseless downdate of the explicit covariance, or H += R_cᵀR_c re-inverted."""
    cov = np.linalg.inv(h)
    h = h.copy()
    picks, scores = [], []
    for _ in range(min(budget, len(candidates))):
        score = np.array(
            [-np.inf if c in picks else _eq44(f, targets, cov, probs) for c, f in enumerate(candidates)]
        )
        best = int(np.argmax(score))
        picks.append(best)
        scores.append(score[best])
        if blocks is None:
            f = candidates[best]
            cov = cov - np.outer(cov @ f, cov @ f) / (f @ cov @ f)
        else:
            h += blocks[best].T @ blocks[best]
            cov = np.linalg.inv(h)
    return picks, scores


CASES = [
    # (seed, n, n_train, n_targets, d, budget, sigma, lam, weighted)
    (0, 40, 30, 5, 6, 8, 1e-3, 1.0, False),
    (1, 30, 3, 4, 8, 6, 1e-2, 1.0, True),  # d > N_train
    (2, 25, 0, 6, 5, 7, 0.5, 2.0, False),  # train=None, λ != 1
]


def _problem(seed, n, n_train, n_targets, d, sigma, lam, weighted):
    rng = np.random.default_rng(seed)
    candidates = rng.normal(size=(n, d)) * rng.uniform(0.3, 2.0, size=(n, 1))
    targets = rng.normal(size=(n_targets, d))
    train = rng.normal(size=(n_train, d)) if n_train else None
    weights = rng.uniform(0.1, 1.0, size=n_targets) if weighted else None
    probs = weights / weights.sum() if weighted else np.full(n_targets, 1 / n_targets)
    h = sigma**2 * np.eye(d) + (lam * train.T @ train if train is not None else 0.0)
    blocks = [rng.normal(size=(int(rng.integers(1, d + 1)), d)) * 0.7 for _ in range(n)]
    return candidates, targets, train, weights, probs, h, blocks


@pytest.mark.parametrize("with_blocks", [False, True])
@pytest.mark.parametrize(
    "method,average",
    [("qopt", None), ("pr_augment", "mean"), ("pr_augment", "log"), ("pr_augment", "min")],
)
@pytest.mark.parametrize("seed,n,n_train,n_targets,d,budget,sigma,lam,weighted", CASES)
def test_qopt_pr_augment_equal_brute_force(
    method, average, with_blocks, seed, n, n_train, n_targets, d, budget, sigma, lam, weighted
):
    candidates, targets, train, weights, probs, h, blocks = _problem(
        seed, n, n_train, n_targets, d, sigma, lam, weighted
    )
    if average == "min" and weighted:
        probs = np.ones(n_targets)  # min over targets ignores the weights (all > 0 here)
    params = {"average": average} if average else {}
    context = {"label_rows": blocks} if with_blocks else {}
    selection = make_selector(method, regularizer=sigma, weight=lam, **params).select(
        candidates, budget, train=train, targets=targets, target_weights=weights, **context
    )
    picks, scores = _brute(
        method, candidates, targets, h, budget, lam, probs,
        blocks if with_blocks else None, average or "mean",
    )
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("with_blocks", [False, True])
@pytest.mark.parametrize("seed,n,n_train,n_targets,d,budget,sigma,lam,weighted", CASES)
def test_mmig_equals_eq44_as_printed(
    with_blocks, seed, n, n_train, n_targets, d, budget, sigma, lam, weighted
):
    candidates, targets, train, weights, probs, h, blocks = _problem(
        seed, n, n_train, n_targets, d, sigma, lam, weighted
    )
    budget = min(budget, d - 1)  # noiseless picks: stay below d, where everything is determined
    context = {"label_rows": blocks} if with_blocks else {}
    selection = make_selector("mmig", regularizer=sigma, weight=lam).select(
        candidates, budget, train=train, targets=targets, target_weights=weights, **context
    )
    picks, scores = _brute_mmig(candidates, targets, h, budget, probs, blocks if with_blocks else None)
    assert selection.indices.tolist() == picks
    # The explicit covariance downdate loses digits when H is ill-conditioned (ς = 1e-2 with 3
    # training rows): a 50-digit mpmath evaluation agrees with the selector to 3e-10 there, with
    # this reference to 3e-6 only.
    np.testing.assert_allclose(selection.scores, scores, rtol=2e-5)


def test_mmig_limits_parallel_is_inf_determined_is_zero():
    rng = np.random.default_rng(3)
    d = 5
    targets = rng.normal(size=(2, d))
    candidates = np.vstack([rng.normal(size=(6, d)), 3.0 * targets[0], -0.5 * targets[0]])
    train = rng.normal(size=(10, d))
    selection = make_selector("mmig").select(candidates, 9, train=train, targets=targets)
    assert selection.indices[0] in (6, 7) and np.isinf(selection.scores[0])
    # the other copy of target 0 is then determined: it scores 0, never nan
    other = 13 - selection.indices[0]
    assert selection.scores[selection.indices.tolist().index(other)] == 0.0
    assert not np.any(np.isnan(selection.scores))
    assert np.all(np.isfinite(selection.scores[1 : d - 1]))
    # after d − 1 noiseless observations the posterior has rank 1: every candidate left with any
    # variance is exactly correlated with the undetermined target (ρ² = 1), so +inf is honest ...
    assert np.isinf(selection.scores[d - 1])
    # ... and d observations determine everything: the remaining picks score 0
    assert np.all(selection.scores[d:] == 0.0)
    # a zero candidate row and a zero target row both mean "nothing to learn": 0, not nan
    zero = make_selector("mmig").select(
        np.vstack([np.zeros(d), candidates[:3]]), 4, targets=np.vstack([targets, np.zeros(d)])
    )
    assert not np.any(np.isnan(zero.scores)) and zero.scores[-1] == 0.0


def test_target_aware_use_given_hessian():
    rng = np.random.default_rng(8)
    candidates, targets, train = rng.normal(size=(30, 6)), rng.normal(size=(4, 6)), rng.normal(size=(12, 6))
    hessian = Hessian.from_features(train, regularizer=0.1)
    for name in ("mmig", "qopt", "pr_augment"):
        given = make_selector(name).select(candidates, 4, targets=targets, hessian=hessian)
        built = make_selector(name, regularizer=0.1).select(candidates, 4, train=train, targets=targets)
        assert given.indices.tolist() == built.indices.tolist()
        np.testing.assert_allclose(given.scores, built.scores, rtol=1e-10)


def test_pr_augment_raises_target_rigidity_and_budget_clamps():
    rng = np.random.default_rng(5)
    candidates, targets = rng.normal(size=(6, 4)), rng.normal(size=(3, 4))
    selection = make_selector("pr_augment").select(
        candidates, 99, train=rng.normal(size=(5, 4)), targets=targets
    )
    assert sorted(selection.indices.tolist()) == list(range(6))
    assert np.all(selection.scores > 0)  # each pick raises the mean target PR ...
    assert np.all(np.diff(selection.info["objective"]) > 0)  # ... and the objective records it


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
    with pytest.raises(ValueError, match="average"):
        make_selector("pr_augment", average="median")
    with pytest.raises(ValueError, match="label_rows"):
        make_selector("qopt").select(x, 2, targets=np.ones((2, 3)), label_rows=[np.ones((1, 3))])
