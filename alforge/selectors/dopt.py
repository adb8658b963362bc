"""D-optimality: MaxVol active sets and the extrapolation grade γ (METHODS §3; 002 §3.5.2).

Per chemical element, the *active set* is the ``d`` training atoms whose feature rows form the
square matrix ``A`` of (locally) maximal ``|det A|``. Every feature row ``f`` then has coefficients
``c = f A⁻¹``; the extrapolation grade ``γ = max_k |c_k|`` says how far outside the active set's
parallelepiped ``f`` lies: ``γ ≤ 1`` interpolation, ``γ > γ_lo`` extrapolation worth labelling,
``γ > γ_hi`` (10–25) a geometry too far out to trust (MD should stop: use
:func:`extrapolation_grade` with the stored active-set inverse, as MTP/ACE do).

MaxVol (Goreinov et al.): start from the rows chosen by LU with partial pivoting, then while some
coefficient ``|C_ij| > tol``, swap row ``j`` into position ``i`` (``|det A|`` grows by
``|C_ij|``) and update all coefficients with one rank-1 correction. The next global max is found
in the same pass over the coefficients as the update (cache-sized column chunks: one BLAS ``ger``
and one ``i?amax`` each), so a swap costs one read-and-write of the ``d × n`` coefficients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import LinAlgWarning, lu_factor, lu_solve
from scipy.linalg.blas import dger, idamax, isamax, sger

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget, check_features
from alforge.uncertainty.blas_threads import single_threaded_blas
from alforge.uncertainty.rigidity import iter_chunks

#: Columns of the coefficient matrix per chunk in the swap pass: ~2 MB, cache-resident.
_SWAP_CHUNK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class MaxVolResult:
    """``rows`` (d,) of the input forming ``A`` (position ``k`` of ``A`` is row ``rows[k]``),
    ``log|det A|``, the number of swaps made, and whether every ``|coefficient| ≤ tol``."""

    rows: np.ndarray
    log_abs_det: float
    n_swaps: int
    converged: bool


def _lu_or_raise(name: str, square: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LU of the active-set matrix; a zero pivot means the rows do not span the feature space."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)  # singularity is tested below
        lu, piv = lu_factor(square, check_finite=False)
    # Rank test as in numpy.linalg.matrix_rank: pivots at rounding level of the largest entry.
    floor = square.shape[0] * np.finfo(np.float64).eps * np.abs(square).max()
    if not np.all(np.isfinite(lu)) or np.any(np.abs(np.diag(lu)) <= floor):
        raise ValueError(
            f"{name} is rank-deficient: its rows do not span all {square.shape[1]} feature "
            "dimensions, so no square active set exists"
        )
    return lu, piv


def maxvol(
    features: np.ndarray,
    tol: float = 1.01,
    start: np.ndarray | None = None,
    max_swaps: int | None = None,
) -> MaxVolResult:
    """Rows of ``features`` (n, d), n ≥ d, whose d×d submatrix has locally maximal ``|det|``.

    On return (when ``converged``) every row ``f`` satisfies ``max |f A⁻¹| ≤ tol``: no single swap
    can grow ``|det A|`` by more than ``tol`` (> 1). ``start`` gives the initial rows (default: LU
    pivots); ``max_swaps`` (default 100·d) is a guard: every swap grows ``|det A|`` by > ``tol``,
    so the loop ends, but ``tol`` barely above 1 can take many swaps.
    Memory: one d × n coefficient matrix (float32 while swapping, then float64 to verify).
    """
    f = check_features("features", features)
    n, d = f.shape
    if n < d:
        raise ValueError(f"features has {n} rows, fewer than its {d} columns: no square active set")
    if not tol > 1.0:
        raise ValueError(
            f"tol must be > 1 (at 1 rounding makes active rows swap forever), got {tol}"
        )
    if start is None:
        # The start only has to be good, not exact: pivots from a float32 LU cost a quarter of
        # a float64 one here. The stopping test is always made on float64 coefficients.
        _, pivots = lu_factor(np.asarray(f, dtype=np.float32), check_finite=False)
        order = np.arange(n)
        for k, p in enumerate(pivots):
            order[k], order[p] = order[p], order[k]
        rows = order[:d].copy()
    else:
        rows = np.asarray(start, dtype=np.int64).copy()
        if rows.shape != (d,) or len(np.unique(rows)) != d or rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"start must hold {d} distinct row indices of features, got {start!r}")
    limit = 100 * d if max_swaps is None else max_swaps
    n_swaps = 0
    # The swap pass is memory-bound BLAS-2 over a d × n coefficient matrix. Swapping first in
    # float32 halves that traffic; the float64 pass that follows recomputes the coefficients from
    # the rows reached, checks every one against `tol` exactly and swaps further if rounding left
    # any above it, so the result carries the same guarantee as an all-float64 run.
    for dtype, ger, iamax in ((np.float32, sger, isamax), (np.float64, dger, idamax)):
        with single_threaded_blas():
            lu, piv = _lu_or_raise("features", np.asarray(f[rows], dtype=np.float64))
            a_inv = lu_solve((lu, piv), np.eye(d), check_finite=False)
        # coef[:, j] = (f_j A⁻¹)ᵀ: one GEMM, whose C-order (n, d) result is the Fortran-order
        # (d, n) layout the swaps need (column chunks contiguous for ger and i?amax).
        coef = (np.asarray(f, dtype=dtype) @ a_inv.astype(dtype)).T
        done, converged = _swaps(coef, rows, tol, limit - n_swaps, ger, iamax)
        n_swaps += done
    with single_threaded_blas():
        lu, _ = _lu_or_raise("features", np.asarray(f[rows], dtype=np.float64))
    log_abs_det = float(np.sum(np.log(np.abs(np.diag(lu)))))
    return MaxVolResult(rows, log_abs_det, n_swaps, converged)


def _swaps(coef: np.ndarray, rows: np.ndarray, tol: float, limit: int, ger, iamax) -> tuple[int, bool]:
    """Greedy swaps in place (``rows`` too) until every ``|coef| ≤ tol``; (swaps made, converged)."""
    d, n = coef.shape
    step = max(1, _SWAP_CHUNK_BYTES // (coef.itemsize * d))
    chunks = [slice(s, min(s + step, n)) for s in range(0, n, step)]
    # Memory-bound BLAS-2 on cache-sized chunks: one thread is as fast.
    with single_threaded_blas():
        i, j = _argmax_abs(coef, chunks, iamax)
        n_swaps = 0
        while abs(coef[i, j]) > tol and n_swaps < limit:
            pivot = coef[i, j]
            column = coef[:, j].copy()
            column[i] -= 1.0
            row = coef[i, :].copy()
            rows[i] = j
            n_swaps += 1
            # coef ← coef − (c_j − e_i) coef[i, :] / pivot, fused with the search for the next max.
            best, i, j = -1.0, 0, 0
            for cols in chunks:
                block = coef[:, cols]
                ger(-1.0 / pivot, column, row[cols], a=block, overwrite_a=True)
                flat = block.ravel(order="F")
                k = int(iamax(flat))
                if abs(flat[k]) > best:
                    best, i, j = abs(flat[k]), k % d, cols.start + k // d
        return n_swaps, bool(abs(coef[i, j]) <= tol)


def _argmax_abs(coef: np.ndarray, chunks: list[slice], iamax) -> tuple[int, int]:
    """(position, row) of the largest ``|coef|`` entry."""
    d = coef.shape[0]
    best, i, j = -1.0, 0, 0
    for cols in chunks:
        flat = coef[:, cols].ravel(order="F")
        k = int(iamax(flat))
        if abs(flat[k]) > best:
            best, i, j = abs(flat[k]), k % d, cols.start + k // d
    return i, j


def extrapolation_grade(active_set_inverse: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``γ_j = max_k |(f_j A⁻¹)_k|`` per row (METHODS §3), streamed in chunks.

    ``active_set_inverse`` is ``A⁻¹`` (d × d) of the row's element; a structure's grade is the
    max over its atoms. γ ≤ 1 for the active rows themselves and, after MaxVol, ≤ tol for every
    training row.
    """
    inverse = np.asarray(active_set_inverse, dtype=np.float64)
    if inverse.ndim != 2 or inverse.shape[0] != inverse.shape[1]:
        raise ValueError(f"active_set_inverse must be square (d, d), got shape {inverse.shape}")
    f = check_features("features", features, dim=inverse.shape[0])
    out = np.empty(len(f))
    for rows in iter_chunks(len(f), inverse.shape[0]):
        out[rows] = np.abs(np.asarray(f[rows], dtype=np.float64) @ inverse).max(axis=1)
    return out


@dataclass
class _ElementState:
    """One element's active set (or the rows collected towards one) and its candidate atoms."""

    pool: np.ndarray  # rows MaxVol chooses from: the active set, or all rows while < d of them
    inverse: np.ndarray | None  # A⁻¹, None while the pool spans fewer than d directions
    atoms: np.ndarray  # candidate rows of this element


def _build_active_set(
    pool: np.ndarray, tol: float, start: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(active rows, A⁻¹) by MaxVol over ``pool``; ``(pool, None)`` when it cannot span d."""
    d = pool.shape[1]
    if len(pool) < d:
        return pool, None
    try:
        result = maxvol(pool, tol=tol, start=start)
    except ValueError:  # rank-deficient pool: every row stays a candidate for later picks
        return pool, None
    active = pool[result.rows]
    with single_threaded_blas():
        return active, np.linalg.inv(active)


def active_set_inverses(
    train: np.ndarray, train_elements: np.ndarray, tol: float = 1.01
) -> dict[Any, np.ndarray]:
    """``A⁻¹`` per element, from MaxVol over that element's training rows (METHODS §3).

    What MD needs to grade atoms on the fly with :func:`extrapolation_grade` and stop a trajectory
    above ``γ_hi``. Elements whose rows span fewer than ``d`` directions have no active set and are
    left out: treat their atoms as ``γ = inf``.
    """
    train = check_features("train", train)
    train_elements = np.asarray(train_elements)
    if train_elements.shape != (len(train),):
        raise ValueError(
            f"train_elements must have shape ({len(train)},), got {train_elements.shape}"
        )
    out: dict[Any, np.ndarray] = {}
    for element in np.unique(train_elements):
        rows = np.asarray(train[train_elements == element], dtype=np.float64)
        _, inverse = _build_active_set(rows, tol, None)
        if inverse is not None:
            out[element] = inverse
    return out


@register
class DOptimal(Selector):
    """``dopt``: D-optimal batch selection by extrapolation grade, per element (METHODS §3).

    Call ``select(candidates, budget, train=train_atoms, train_elements=..., elements=...,
    groups=...)``: ``candidates`` and ``train`` hold per-atom last-layer feature rows;
    ``elements``/``train_elements`` give each row's element (any hashable labels, e.g. atomic
    numbers); ``groups`` gives each candidate row's structure id. ``indices`` are structure ids.

    Each element's active set is MaxVol over its training rows (``tol``). A structure's grade is
    the max γ over its atoms; the highest-graded structure is picked, its atoms join the active-set
    update (MaxVol over active set ∪ picked atoms, as MTP/ACE do), grades are recomputed, and so
    on — so one batch does not hold many copies of one environment. Picking stops early when no
    structure has γ > ``threshold`` (default 1: anything outside the active sets' hull; use 2 for
    the conservative MTP/ACE ``γ_lo``). An element with fewer than ``d`` training rows (or rows
    spanning fewer than ``d`` directions) has no active set yet: its atoms grade ``inf`` until the
    picked atoms complete one. Scores are the picked structures' γ at the moment of picking.
    Cost per pick: a MaxVol over d + (picked atoms) rows and one GEMM re-grading the candidate
    atoms of the picked structure's elements.
    """

    name = "dopt"
    level = "atom"

    def __init__(self, tol: float = 1.01, threshold: float = 1.0) -> None:
        self.tol = tol
        self.threshold = threshold

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        candidates = check_features("candidates", candidates)
        d = candidates.shape[1]
        train = check_features("train", train, dim=d)
        if train is None:
            train = np.empty((0, d))
        groups = _labels(context, "groups", len(candidates))
        elements = _labels(context, "elements", len(candidates))
        train_elements = _labels(context, "train_elements", len(train))
        if not self.tol > 1.0:
            raise ValueError(f"tol must be > 1, got {self.tol}")
        structure_ids, owner = np.unique(groups, return_inverse=True)
        b = check_budget(budget, len(structure_ids))

        states: dict[Any, _ElementState] = {}
        grade = np.empty(len(candidates))
        for element in np.unique(elements):
            atoms = np.flatnonzero(elements == element)
            pool, inverse = _build_active_set(
                np.asarray(train[train_elements == element], dtype=np.float64), self.tol, None
            )
            states[element] = _ElementState(pool, inverse, atoms)
            grade[atoms] = _grades(inverse, candidates[atoms])

        by_structure = np.argsort(owner, kind="stable")
        first_atom = np.searchsorted(owner[by_structure], np.arange(len(structure_ids)))
        picked = np.zeros(len(structure_ids), dtype=bool)
        picks: list[int] = []
        scores: list[float] = []
        for _ in range(b):
            structure_grade = np.maximum.reduceat(grade[by_structure], first_atom)
            structure_grade[picked] = -np.inf
            s = int(np.argmax(structure_grade))
            if not structure_grade[s] > self.threshold:
                break
            picked[s] = True
            picks.append(s)
            scores.append(float(structure_grade[s]))
            rows = np.flatnonzero(owner == s)
            for element in np.unique(elements[rows]):
                state = states[element]
                new = np.asarray(candidates[rows[elements[rows] == element]], dtype=np.float64)
                # Start from the current active set (its first d rows) when there is one.
                start = np.arange(d) if state.inverse is not None else None
                pool, inverse = _build_active_set(np.vstack([state.pool, new]), self.tol, start)
                state.pool, state.inverse = pool, inverse
                grade[state.atoms] = _grades(inverse, candidates[state.atoms])
        return Selection(
            structure_ids[np.asarray(picks, dtype=np.int64)],
            np.asarray(scores),
            info={"stopped_at_threshold": len(picks) < b},
        )


def _grades(inverse: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    return np.full(len(rows), np.inf) if inverse is None else extrapolation_grade(inverse, rows)


def _labels(context: dict[str, Any], key: str, length: int) -> np.ndarray:
    if context.get(key) is None:
        raise ValueError(f"dopt needs {key}= (one label per row)")
    values = np.asarray(context[key])
    if values.shape != (length,):
        raise ValueError(f"{key} must have shape ({length},), got {values.shape}")
    return values
