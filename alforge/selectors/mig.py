"""Greedy batch maximum information gain, structure-level and local (METHODS §3; 002 §3.5).

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

The local variant (``mig_local``) scores a structure by all its atom rows together,
``½ log det(I + λ Z_s Z_sᵀ)`` with ``Z_s`` the whitened rows; it refactors ``H_t`` after each pick
(O(d³)) because a picked structure adds many rows at once, and uses the same lazy greedy loop
(log det is submodular, so its scores only decrease too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alforge.selectors import register
from alforge.selectors._greedy import lazy_greedy
from alforge.selectors.base import Selection, Selector, check_budget, check_features
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, Hessian, chunk_rows


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
        """Fold ``H ← H + weight · f fᵀ`` into ``W``."""
        row = np.asarray(row, dtype=np.float64)
        p = self.apply(row)
        if self.n_columns == self._w.shape[1]:
            grown = np.empty((self._w.shape[0], 2 * self._w.shape[1]))
            grown[:, : self.n_columns] = self.columns
            self._w = grown
        self._w[:, self.n_columns] = p / np.sqrt(1.0 / weight + row @ p)
        self.n_columns += 1


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
    """

    name = "mig"

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
        hessian = Hessian.from_features(
            train, dim=candidates.shape[1], regularizer=self.regularizer, energy_weight=lam
        )
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


@register
class LocalMaxInformationGain(Selector):
    """``mig_local``: per-atom rows, structures scored by all their atoms together (METHODS §3).

    ``select(candidates, budget, train=train_atom_features, groups=structure_ids)``: row ``i`` of
    ``candidates`` is one atom's last-layer features and ``groups[i]`` the id of its structure;
    ``train`` holds the training atoms' rows. A structure ``s`` gains
    ``½ log det(I + λ F_s H⁻¹ F_sᵀ)`` (the Fisher information its force labels add); picking it adds
    all its rows to ``H``. ``indices`` are structure ids (values of ``groups``) in pick order.
    Registered as its own name (rather than a flag on ``mig``) because its rows, context and return
    value all differ: a campaign file switches level by switching name.
    """

    name = "mig_local"
    level = "atom"

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
        groups = context.get("groups")
        if groups is None:
            raise ValueError("mig_local needs groups= (the structure id of each candidate row)")
        groups = np.asarray(groups)
        if groups.shape != (len(candidates),):
            raise ValueError(
                f"groups must have shape ({len(candidates)},) to match candidates, "
                f"got {groups.shape}"
            )
        structure_ids, owner = np.unique(groups, return_inverse=True)
        b = min(b, len(structure_ids))
        if b == 0:
            return Selection(np.empty(0, dtype=structure_ids.dtype), np.empty(0))
        lam = self.weight
        # H_t is refactored after each pick (O(d³), negligible next to scoring): then every gain
        # is a sum of squares of whitened rows, and refreshed scores cost O(n_s d²) whatever the
        # number of atoms picked so far.
        state = {
            "hessian": Hessian.from_features(
                train, dim=candidates.shape[1], regularizer=self.regularizer, energy_weight=lam
            )
        }
        atoms = _GroupedRows(owner, len(structure_ids))

        def gains(structures: np.ndarray) -> np.ndarray:
            return _group_gains(candidates, atoms, structures, state["hessian"], lam)

        def refresh(idx: np.ndarray, stale: np.ndarray, fresh_at: np.ndarray) -> np.ndarray:
            return gains(idx)

        def commit(s: int) -> None:
            state["hessian"] = state["hessian"].updated(candidates[atoms.rows(np.array([s]))], lam)

        picks, scores, n_refreshed = lazy_greedy(
            gains(np.arange(len(structure_ids))), b, refresh, commit
        )
        return Selection(structure_ids[picks], scores, info={"n_rescored": n_refreshed})


class _GroupedRows:
    """Row indices of each group, from a row → group map (groups numbered 0..n_groups-1)."""

    def __init__(self, owner: np.ndarray, n_groups: int) -> None:
        self.order = np.argsort(owner, kind="stable")
        self.sizes = np.bincount(owner, minlength=n_groups)
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))

    def rows(self, groups: np.ndarray) -> np.ndarray:
        """The rows of ``groups``, concatenated group after group."""
        sizes = self.sizes[groups]
        offsets = np.repeat(self.starts[groups] - np.cumsum(sizes) + sizes, sizes)
        return self.order[offsets + np.arange(sizes.sum())]


def _group_gains(
    candidates: np.ndarray,
    atoms: _GroupedRows,
    structures: np.ndarray,
    hessian: Hessian,
    weight: float,
) -> np.ndarray:
    """``½ log det(I + λ Z_s Z_sᵀ)``, ``Z_s = F_s L_t⁻ᵀ``, per structure (METHODS §3, local MIG).

    Structures are batched by similar atom count and zero-padded (padding rows add ``log 1 = 0``);
    one batched Cholesky of the small ``n_s × n_s`` matrices gives every log-determinant. Blocks of
    the padded stack are kept near 32 MB.
    """
    out = np.empty(len(structures))
    by_size = np.argsort(atoms.sizes[structures], kind="stable")
    sorted_sizes = atoms.sizes[structures[by_size]]
    width = hessian.dim
    block_elements = chunk_rows(1)
    start = 0
    while start < len(by_size):
        # Sizes ascend, so the padded block's element count grows with the number of structures.
        rest = sorted_sizes[start:]
        padded_elements = np.arange(1, len(rest) + 1) * rest * (width + rest)
        count = max(1, int(np.searchsorted(padded_elements, block_elements, side="right")))
        block = by_size[start : start + count]
        ids = structures[block]
        sizes = atoms.sizes[ids]
        n_max = int(sizes.max())
        rows = atoms.rows(ids)
        # Scatter each structure's whitened rows into a zero-padded (count, n_max, d) stack.
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        padded = np.zeros((count, n_max, width))
        padded[np.repeat(np.arange(count), sizes), slot] = hessian.whiten(candidates[rows])
        gram = np.matmul(padded, padded.transpose(0, 2, 1))
        gram *= weight
        gram += np.eye(n_max)
        chol = np.linalg.cholesky(gram)
        out[block] = np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        start += count
    return out
