"""The lazy greedy loop picks exactly what plain greedy picks (METHODS §3, "lazy greedy")."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors._greedy import lazy_greedy


class VarianceProblem:
    """Scores ``fᵀH⁻¹f`` that only shrink as picked rows are added to ``H``."""

    def __init__(self, rng: np.random.Generator, n: int, d: int) -> None:
        self.features = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=(n, 1))
        self.h = 0.1 * np.eye(d)

    def variance(self, idx: np.ndarray) -> np.ndarray:
        f = self.features[idx]
        return np.einsum("ij,jk,ik->i", f, np.linalg.inv(self.h), f)

    def commit(self, i: int) -> None:
        self.h += np.outer(self.features[i], self.features[i])

    def plain_greedy(self, budget: int) -> tuple[list[int], list[float]]:
        """Every candidate re-scored at every step, from a fresh ``H``."""
        self.h = 0.1 * np.eye(self.features.shape[1])
        picks, scores = [], []
        for _ in range(budget):
            v = self.variance(np.arange(len(self.features)))
            v[picks] = -np.inf
            picks.append(int(np.argmax(v)))
            scores.append(v[picks[-1]])
            self.commit(picks[-1])
        return picks, scores


@pytest.mark.parametrize("first_block,first_pool", [(1, 1), (2, 3), (64, 4096), (1, 50)])
def test_lazy_greedy_equals_plain_greedy_for_variance_scores(first_block, first_pool):
    problem = VarianceProblem(np.random.default_rng(first_block + first_pool), 200, 6)
    picks, scores, _ = lazy_greedy(
        problem.variance(np.arange(200)),
        25,
        lambda idx, stale, fresh_at: problem.variance(idx),
        problem.commit,
        first_block=first_block,
        first_pool=first_pool,
    )
    expected, expected_scores = problem.plain_greedy(25)
    assert picks.tolist() == expected
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-10)


def test_lazy_greedy_with_some_initial_scores_only_bounds():
    """``exact_initial`` as a mask: the inexact candidates start from inflated bounds, are
    re-scored before they can be picked, and the picks are still plain greedy's."""
    rng = np.random.default_rng(5)
    problem = VarianceProblem(rng, 300, 5)
    exact = rng.random(300) < 0.5
    initial = problem.variance(np.arange(300))
    initial[~exact] *= rng.uniform(1.0, 5.0, size=np.count_nonzero(~exact))
    seen_never_exact = []

    def refresh(idx, stale, fresh_at):
        seen_never_exact.extend(idx[fresh_at < 0].tolist())
        return problem.variance(idx)

    picks, _, _ = lazy_greedy(initial, 20, refresh, problem.commit, first_block=4, exact_initial=exact)
    assert seen_never_exact and not exact[seen_never_exact].any()  # only inexact ones had fresh_at -1
    assert picks.tolist() == problem.plain_greedy(20)[0]
