"""The lazy greedy loop picks exactly what plain greedy picks (METHODS §3, "lazy greedy")."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors._greedy import lazy_greedy


@pytest.mark.parametrize("first_block,first_pool", [(1, 1), (2, 3), (64, 4096), (1, 50)])
def test_lazy_greedy_equals_plain_greedy_for_variance_scores(first_block, first_pool):
    rng = np.random.default_rng(first_block + first_pool)
    features = rng.normal(size=(200, 6)) * rng.uniform(0.2, 3.0, size=(200, 1))
    h = 0.1 * np.eye(6)

    def variance(idx: np.ndarray) -> np.ndarray:
        f = features[idx]
        return np.einsum("ij,jk,ik->i", f, np.linalg.inv(h), f)

    def commit(i: int) -> None:
        h[:] += np.outer(features[i], features[i])

    picks, scores, _ = lazy_greedy(
        variance(np.arange(200)),
        25,
        lambda idx, stale, fresh_at: variance(idx),
        commit,
        first_block=first_block,
        first_pool=first_pool,
    )
    h[:] = 0.1 * np.eye(6)
    expected, expected_scores = [], []
    for _ in range(25):
        v = variance(np.arange(200))
        v[expected] = -np.inf
        expected.append(int(np.argmax(v)))
        expected_scores.append(v[expected[-1]])
        commit(expected[-1])
    assert picks.tolist() == expected
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-10)


def test_lazy_greedy_with_some_initial_scores_only_bounds():
    """``exact_initial`` as a mask: the inexact candidates start from inflated bounds, are
    re-scored before they can be picked, and the picks are still plain greedy's."""
    rng = np.random.default_rng(5)
    features = rng.normal(size=(300, 5)) * rng.uniform(0.2, 3.0, size=(300, 1))
    h = 0.1 * np.eye(5)

    def variance(idx: np.ndarray) -> np.ndarray:
        f = features[idx]
        return np.einsum("ij,jk,ik->i", f, np.linalg.inv(h), f)

    def commit(i: int) -> None:
        h[:] += np.outer(features[i], features[i])

    exact = rng.random(300) < 0.5
    initial = variance(np.arange(300))
    initial[~exact] *= rng.uniform(1.0, 5.0, size=np.count_nonzero(~exact))
    seen_never_exact = []

    def refresh(idx, stale, fresh_at):
        seen_never_exact.extend(idx[fresh_at < 0].tolist())
        return variance(idx)

    picks, _, _ = lazy_greedy(initial, 20, refresh, commit, first_block=4, exact_initial=exact)
    assert not exact[seen_never_exact].any()  # only the inexact ones arrive with fresh_at = -1
    h[:] = 0.1 * np.eye(5)
    expected = []
    for _ in range(20):
        v = variance(np.arange(300))
        v[expected] = -np.inf
        expected.append(int(np.argmax(v)))
        commit(expected[-1])
    assert picks.tolist() == expected
