"""Farthest-point sampling (METHODS §9) against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors import make_selector


def _brute_fps(candidates, train, budget):
    covered = list(train) if train is not None else [candidates.mean(axis=0)]
    picks, scores = [], []
    for _ in range(min(budget, len(candidates))):
        dist = np.array(
            [
                -np.inf if i in picks else min(np.linalg.norm(c - r) for r in covered)
                for i, c in enumerate(candidates)
            ]
        )
        best = int(np.argmax(dist))
        picks.append(best)
        scores.append(dist[best])
        covered.append(candidates[best])
    return picks, scores


@pytest.mark.parametrize("seed,n_train", [(0, 20), (1, 0), (2, 1)])
def test_fps_equals_brute_force(seed, n_train):
    rng = np.random.default_rng(seed)
    candidates = rng.normal(size=(50, 5))
    train = rng.normal(size=(n_train, 5)) if n_train else None
    selection = make_selector("fps").select(candidates, 12, train=train)
    picks, scores = _brute_fps(candidates, train, 12)
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-9)


def test_fps_skips_covered_candidates_and_clamps_budget():
    candidates = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    selection = make_selector("fps").select(candidates, 10, train=np.zeros((1, 2)))
    assert selection.indices.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="train"):
        make_selector("fps").select(candidates, 1, train=np.zeros((1, 3)))
