"""Select what PROBE calls unreliable (METHODS §6): rank candidates by ``1 − p_reliable``.

``p_reliable`` comes as context from the campaign's adapter (alforge/tasks/probe.py runs the
model's probe on the candidates' stored invariant features and energies); this module only ranks.
The constructor's training settings (``target``, ``percentile``, ``per_atom``, ``max_epochs``,
``patience``, ``train_seed``) are those the adapter trains the model's probe with, so a selection's
recorded parameters say which probe scored it. ``importance`` (per candidate, the attention's
per-atom importance) is optional: the atom that weighed most in each pick is noted in ``info``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget, count_over_threshold


@register
class ProbeSelector(Selector):
    name = "probe"

    def __init__(
        self,
        target: Literal["energy", "forces"] = "energy",
        percentile: float = 50.0,
        per_atom: bool = False,
        max_epochs: int = 300,
        patience: int = 25,
        train_seed: int = 0,
        unreliable_above: float = 0.5,
    ) -> None:
        if target not in ("energy", "forces"):
            raise ValueError(f"target must be 'energy' or 'forces', got {target!r}")
        if not 0 < percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile}")
        if max_epochs < 1 or patience < 1:
            raise ValueError(f"max_epochs and patience must be >= 1, got {max_epochs}, {patience}")
        if not 0 <= unreliable_above < 1:
            raise ValueError(f"unreliable_above must be in [0, 1), got {unreliable_above}")
        self.target = target
        self.percentile = percentile
        self.per_atom = per_atom
        self.max_epochs = max_epochs
        self.patience = patience
        self.train_seed = train_seed
        self.unreliable_above = unreliable_above

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """Picks the probe calls unreliable, ``1 − p_reliable > unreliable_above`` (0.5: the
        classifier's own decision), when ``min_score`` is unset (``None`` or ``≤ 0``, the campaign
        default), like ``dopt``'s γ_lo; else ``1 − p_reliable ≥ min_score``."""
        return count_over_threshold(scores, min_score, self.unreliable_above)

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        if context.get("p_reliable") is None:
            raise ValueError("probe needs p_reliable= (the probe's reliability probability per candidate)")
        p = np.asarray(context["p_reliable"], dtype=np.float64)
        if p.shape != (len(candidates),) or not np.all((p >= 0) & (p <= 1)):
            raise ValueError(f"p_reliable must be {len(candidates)} probabilities in [0, 1], got shape {p.shape}")
        score = 1.0 - p
        picks = np.argsort(-score, kind="stable")[: check_budget(budget, len(p))]
        info: dict[str, Any] = {
            "predicted_unreliable": int(np.count_nonzero(score > 0.5)),
            "mean_p_reliable": float(p.mean()) if p.size else None,
        }
        importance = context.get("importance")
        if importance is not None:
            info["top_atom"] = [int(np.argmax(importance[int(i)])) for i in picks]
        return Selection(indices=picks.astype(np.int64), scores=score[picks], info=info)
