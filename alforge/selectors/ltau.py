"""Select the structures whose atoms LTAU finds least certain (METHODS §7).

The per-atom LTAU uncertainty ``p`` of every candidate atom comes as context from the campaign's
adapter (alforge/tasks/ltau.py fits :class:`~alforge.uncertainty.ltau.LTAU` on the model's training
atoms' invariant embeddings and stored training-error log, then looks the candidates' atoms up);
this module reduces it per structure and ranks. The LTAU settings (``k``, ``atol``, ``rtol``,
``index``, ``per_element``) are constructor parameters so that a selection's recorded parameters
say how it was scored; the adapter reads them from here.

**Score units:** a structure's score is the max (``reduce="max"``, the default: one badly known
environment is enough to need a label) or mean over its atoms of ``p`` ∈ [0, 1], the fraction of
training epochs in which the nearest training atoms' force errors exceeded the tolerance. A pick is
informative when its score is ``≥ min_score`` (``stopping.min_score``) or, when that is unset
(``None`` or ``≤ 0``), when it is above ``uncertain_above`` (0.5: its neighbours were outside the
tolerance for most of the training).
The quantiles of the training structures' own scores go to ``info`` as a scale for ``min_score``:
``p`` depends on the length of the training and on ``atol``, so a useful threshold is relative.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget, count_over_threshold


def reduce_per_structure(atom_values: np.ndarray, groups: np.ndarray, n: int, how: str) -> np.ndarray:
    """Max or mean of ``atom_values`` over the atoms of each of ``n`` structures (``groups``: the
    structure of each row, 0..n-1); a structure without atoms is an error."""
    counts = np.bincount(groups, minlength=n)
    if len(counts) != n or np.any(counts == 0):
        raise ValueError(f"groups must give every one of the {n} structures at least one atom")
    if how == "mean":
        return np.bincount(groups, weights=atom_values, minlength=n) / counts
    out = np.full(n, -np.inf)
    np.maximum.at(out, groups, atom_values)
    return out


@register
class LTAUSelector(Selector):
    name = "ltau"

    def __init__(
        self,
        reduce: Literal["max", "mean"] = "max",
        k: int = 10,
        atol: float | None = None,
        rtol: float = 0.0,
        index: Literal["auto", "flat", "hnsw"] = "auto",
        per_element: bool = True,
        uncertain_above: float = 0.5,
    ) -> None:
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if atol is not None and not atol > 0:
            raise ValueError(f"atol must be > 0 or None (the final-epoch training MAE), got {atol!r}")
        if not rtol >= 0:
            raise ValueError(f"rtol must be >= 0, got {rtol!r}")
        if index not in ("auto", "flat", "hnsw"):
            raise ValueError(f"index must be 'auto', 'flat' or 'hnsw', got {index!r}")
        if not 0 <= uncertain_above < 1:
            raise ValueError(f"uncertain_above must be in [0, 1), got {uncertain_above}")
        self.reduce = reduce
        self.k = int(k)
        self.atol = atol
        self.rtol = rtol
        self.index = index
        self.per_element = per_element
        self.uncertain_above = uncertain_above

    def ltau_settings(self) -> dict[str, Any]:
        """The :class:`~alforge.uncertainty.ltau.LTAU` settings the adapter fits with."""
        return {"k": self.k, "atol": self.atol, "rtol": self.rtol, "index": self.index, "per_element": self.per_element}

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """Picks scored ``≥ min_score``, or ``> uncertain_above`` when ``min_score`` is unset (``None``
        or ``≤ 0``, the campaign default), like ``dopt``'s γ_lo (module docstring)."""
        return count_over_threshold(scores, min_score, self.uncertain_above)

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        """Rank ``candidates`` (only their number is read) by reduced LTAU ``p``. Context:
        ``atom_p`` (every candidate atom's ``p``), ``groups`` (each atom's candidate row) and,
        optionally, ``train_scores`` (the training structures' reduced ``p_i``, for ``info``)."""
        n = len(candidates)
        atom_p, groups = context.get("atom_p"), context.get("groups")
        if atom_p is None or groups is None:
            raise ValueError("ltau needs atom_p= (LTAU p of every candidate atom) and groups= (its candidate)")
        atom_p = np.asarray(atom_p, dtype=np.float64)
        groups = np.asarray(groups, dtype=np.int64)
        if atom_p.shape != groups.shape or atom_p.ndim != 1:
            raise ValueError(f"atom_p and groups must be 1-D of one length, got {atom_p.shape} and {groups.shape}")
        if not np.all((atom_p >= 0) & (atom_p <= 1)):
            raise ValueError("atom_p must lie in [0, 1]")
        if n == 0:
            return Selection(indices=np.empty(0, dtype=np.int64), scores=np.empty(0), info={})
        if groups.size and (groups.min() < 0 or groups.max() >= n):
            raise ValueError(f"groups must index the {n} candidates")
        score = reduce_per_structure(atom_p, groups, n, self.reduce)
        picks = np.argsort(-score, kind="stable")[: check_budget(budget, n)]
        info: dict[str, Any] = {
            "reduce": self.reduce,
            "mean_score": float(score.mean()),
            "n_uncertain": int(np.count_nonzero(score > self.uncertain_above)),
        }
        train_scores = context.get("train_scores")
        if train_scores is not None and len(train_scores):
            levels = (0.5, 0.9, 0.99)
            info["train_score_quantiles"] = dict(zip(map(str, levels), np.quantile(train_scores, levels).tolist()))
        return Selection(indices=picks.astype(np.int64), scores=score[picks], info=info)
