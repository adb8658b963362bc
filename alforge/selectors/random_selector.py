"""Uniform random selection: the baseline every other selector must beat (METHODS §9)."""

from __future__ import annotations

from typing import Any

import numpy as np

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget


@register
class RandomSelector(Selector):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """Every pick: random selection has no notion of information (its scores are all 0)."""
        return int(len(scores))

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        n = len(candidates)
        b = check_budget(budget, n)
        rng = np.random.default_rng(self.seed)
        picks = rng.choice(n, size=b, replace=False) if b else np.empty(0, dtype=np.int64)
        return Selection(indices=np.asarray(picks, dtype=np.int64), scores=np.zeros(b))
