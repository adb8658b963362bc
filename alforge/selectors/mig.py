"""Greedy batch maximum information gain on structure rows (METHODS §3; 002 §3.5).

With ``H = ς² I + λ Σ_train f fᵀ``, labelling a structure with features ``f`` gains
``ΔI = ½ log(1 + λ fᵀH⁻¹f)``. A batch is built greedily: pick the largest gain, add the pick to
``H`` exactly (``H ← H + λ f fᵀ``), re-score, repeat. This is greedy MaxDet of ``det H``.

How it stays exact and fast:

* ``H`` is factored once in float64; every initial score ``fᵀH⁻¹f = ‖L⁻¹f‖²`` comes from one
  streamed triangular solve over the candidates (O(N d²), chunks of ~32 MB, no whitened copy kept).
* The picks so far are held as ``H_t⁻¹ = H⁻¹ − W Wᵀ`` (Woodbury / pivoted Cholesky: one column of
  ``W`` per picked row), so a candidate's current variance is its initial one minus
  ``Σ_k (w_k·f)²``.
* Scores only decrease as ``H`` grows, so stale scores are upper bounds and only the candidates near
  the top are re-scored (lazy greedy, :mod:`alforge.selectors._greedy`) — the picks are those of the
  plain greedy loop, in the worst case at the plain loop's O(N d) per pick.

Memory beyond the caller's candidate array: O(N) floats plus ``W`` (d × picked rows).

The information a DFT label actually adds (its energy row and 3n force rows together) is scored
by ``mig_label`` (:mod:`alforge.selectors.label_mig`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alforge.selectors import register
from alforge.selectors._greedy import lazy_greedy
from alforge.selectors.base import (
    Selection,
    Selector,
    check_budget,
    check_features,
    check_hessian,
)
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, Hessian


class UpdatedInverse:
    """``H_t⁻¹ = H⁻¹ − W Wᵀ``: the inverse Hessian after adding rows one at a time, unrefactored.

    Adding ``f`` with weight ``λ`` is Sherman–Morrison: ``p = H_t⁻¹ f``, new column
    ``w = p / sqrt(1/λ + fᵀp)`` — the pivoted-Cholesky column of the pick (METHODS §3).
    """

    def __init__(self, hessian: Hessian, capacity: int = 16) -> None:
        self.hessian = hessian
        self._w = np.empty((hessian.dim, max(capacity, 1)))
        self.n_columns = 0

    @property
    def columns(self) -> np.ndarray:
        """``W`` (d, n_columns): one column per row added so far."""
        return self._w[:, : self.n_columns]

    def apply(self, rhs: np.ndarray) -> np.ndarray:
        """``H_t⁻¹ rhs`` for a vector or a (d, k) matrix."""
        w = self.columns
        return self.hessian.solve(rhs) - w @ (w.T @ rhs)

    def add(self, row: np.ndarray, weight: float) -> None:
        """Fold ``H ← H + weight · f fᵀ`` into ``W`` (``weight = inf``: a noiseless observation,
        the posterior covariance ``H_t⁻¹`` loses the direction ``f`` entirely)."""
        row = np.asarray(row, dtype=np.float64)
        p = self.apply(row)
        noise = 0.0 if np.isinf(weight) else 1.0 / weight
        self.append(p[:, None] / np.sqrt(noise + row @ p))

    def append(self, columns: np.ndarray) -> None:
        """Append columns ``Q`` (d, k): ``H_t⁻¹ ← H_t⁻¹ − Q Qᵀ``."""
        k = columns.shape[1]
        if self.n_columns + k > self._w.shape[1]:
            grown = np.empty((self._w.shape[0], max(2 * self._w.shape[1], self.n_columns + k)))
            grown[:, : self.n_columns] = self.columns
            self._w = grown
        self._w[:, self.n_columns : self.n_columns + k] = columns
        self.n_columns += k


def resolve_hessian(
    context: dict[str, Any],
    train: np.ndarray | None,
    dim: int,
    regularizer: float,
    weight: float = 1.0,
) -> Hessian:
    """The ``hessian=`` context when given, else ``ς² I + λ trainᵀtrain`` (see ``Selector``)."""
    given = check_hessian(context.get("hessian"), dim)
    if given is not None:
        return given
    return Hessian.from_features(train, dim=dim, regularizer=regularizer, energy_weight=weight)


def _check_common(
    candidates: np.ndarray, budget: int, train: np.ndarray | None, weight: float
) -> tuple[np.ndarray, np.ndarray | None, int]:
    candidates = check_features("candidates", candidates)
    train = check_features("train", train, dim=candidates.shape[1])
    if weight <= 0:
        raise ValueError(f"weight (λ) must be > 0, got {weight}")
    return candidates, train, check_budget(budget, len(candidates))


@register
class MaxInformationGain(Selector):
    """``mig``: one row per structure (``f_s``), greedy ``½ log(1 + λ fᵀH⁻¹f)`` (METHODS §3).

    Parameters: ``regularizer`` is ``ς`` in ``H = ς² I + λ FᵀF`` (default 1e-3, see
    :data:`~alforge.uncertainty.rigidity.DEFAULT_REGULARIZER`); ``weight`` is ``λ``, the loss weight
    of one label, applied to training rows and picks alike. Scores are the gains in nats.
    Context: ``hessian=`` (used instead of ``train``/``regularizer`` when given; ``weight`` still
    weighs the picks' rows).
    """

    name = "mig"
    uses_hessian = True

    def __init__(self, regularizer: float = DEFAULT_REGULARIZER, weight: float = 1.0) -> None:
        self.regularizer = regularizer
        self.weight = weight

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        candidates, train, b = _check_common(candidates, budget, train, self.weight)
        if b == 0:
            return Selection(np.empty(0, dtype=np.int64), np.empty(0))
        lam = self.weight
        hessian = resolve_hessian(context, train, candidates.shape[1], self.regularizer, lam)
        inverse = UpdatedInverse(hessian, capacity=b)

        def refresh(idx: np.ndarray, stale: np.ndarray, fresh_at: np.ndarray) -> np.ndarray:
            # v_i(t) = v_i(t_i) − Σ_{k ≥ t_i} (w_k·f_i)²: only the columns added since t_i count.
            first = int(fresh_at.min())
            proj = np.asarray(candidates[idx], dtype=np.float64) @ inverse.columns[:, first:]
            since = np.arange(first, inverse.n_columns) >= fresh_at[:, None]
            return stale - np.einsum("ij,ij->i", proj, proj * since)

        def commit(i: int) -> None:
            inverse.add(candidates[i], lam)

        picks, variances, n_refreshed = lazy_greedy(
            hessian.variance(candidates), b, refresh, commit
        )
        gains = 0.5 * np.log1p(lam * np.maximum(variances, 0.0))
        return Selection(picks, gains, info={"n_rescored": n_refreshed})
