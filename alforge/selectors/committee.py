"""Query by committee, DP-GEN style (METHODS §9): a baseline every selector must beat.

M models trained on the same data with different seeds disagree most where the data say least.
A candidate's score is its maximum atomic force deviation ``max_i sqrt(<|F_i − <F_i>|²>)`` over the
committee; candidates inside the trust window ``sigma_lo < dev < sigma_hi`` are eligible (below:
already learned; above: likely unphysical), and the batch is drawn from them at random (DP-GEN) or
by decreasing deviation. The deviations arrive as ``force_deviation=`` context computed by the
campaign's adapter, which also trains the ``committee_size − 1`` extra models.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget


@register
class CommitteeSelector(Selector):
    name = "committee"

    def __init__(
        self,
        committee_size: int = 4,
        sigma_lo: float = 0.05,
        sigma_hi: float = 0.5,
        order: Literal["random", "deviation"] = "random",
        seed: int = 0,
    ) -> None:
        if committee_size < 2:
            raise ValueError(f"committee_size must be >= 2, got {committee_size}")
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(f"need 0 <= sigma_lo < sigma_hi, got {sigma_lo}, {sigma_hi}")
        if order not in ("random", "deviation"):
            raise ValueError(f"order must be 'random' or 'deviation', got {order!r}")
        self.committee_size = committee_size
        self.sigma_lo = sigma_lo
        self.sigma_hi = sigma_hi
        self.order = order
        self.seed = seed

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """Picks whose deviation lies inside the trust window (and is ``≥ min_score`` if given)."""
        dev = np.asarray(scores, dtype=np.float64)
        ok = (dev > self.sigma_lo) & (dev < self.sigma_hi)
        if min_score is not None:
            ok &= dev >= min_score
        return int(np.count_nonzero(ok))

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        if context.get("force_deviation") is None:
            raise ValueError("committee needs force_deviation= (max atomic force deviation per candidate, eV/Å)")
        dev = np.asarray(context["force_deviation"], dtype=float)
        if dev.shape != (len(candidates),):
            raise ValueError(f"force_deviation must have shape ({len(candidates)},), got {dev.shape}")
        window = np.flatnonzero((dev > self.sigma_lo) & (dev < self.sigma_hi))
        b = check_budget(budget, len(window))
        if self.order == "deviation":
            picks = window[np.argsort(-dev[window], kind="stable")][:b]
        else:
            picks = np.random.default_rng(self.seed).choice(window, size=b, replace=False)
        info = {
            "in_window": int(len(window)),
            "below": int(np.sum(dev <= self.sigma_lo)),
            "above": int(np.sum(dev >= self.sigma_hi)),
        }
        return Selection(indices=np.asarray(picks, dtype=np.int64), scores=dev[picks], info=info)
