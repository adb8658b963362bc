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
The swaps run in float32 (half the memory traffic) with the chunks shared among the BLAS threads;
a float64 check of the final coefficients, needed only for the rows a rigorous float32 error bound
cannot clear, keeps the float64 guarantee (:func:`maxvol`).

**Float32 features** (as the store hands them over) stay float32: MaxVol makes its float32 copy
either way, span bases come from a tall-skinny QR over row chunks, and grades upcast one chunk at
a time, so no full float64 copy of the candidates or of a training pool is made. The exception is a
rank-deficient pool, whose (n, r) span coordinates are float64.

**Rank-deficient element blocks** (fewer atoms of an element than ``d``, or linearly dependent
features): no square ``d × d`` active set exists. Rather than regularising (which would invent
rows), the active set is built in the *numerical span* of the element's rows: an orthonormal basis
``V`` (d × r) from an SVD, keeping singular values ``> span_tol · σ_max``; MaxVol runs on the
coordinates ``X V`` and picks ``r`` active rows. A feature row ``f`` then has in-span coefficients
``c = (f V) A_r⁻¹`` and an out-of-span residual ``e = f − f V Vᵀ``, a direction no training atom
has; it counts as if the missing directions held pseudo-rows of length ``s = span_tol · rms‖a_k‖``
(the smallest extent still trusted as "seen", relative to the active rows' size):
``γ = max(max_k |c_k|, ‖e‖/s)`` (``norm="max"``; ``‖e‖/s`` is the max over every orthonormal
completion of the basis), or ``γ = sqrt(‖c‖² + ‖e‖²/s²)`` (``norm="2"``, exact). So an atom in
an unseen direction grades very high (the old ``inf``, but finite and ordered by how far out it is),
a training row grades ≤ ``tol``, and a finite feature never grades ``inf``.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import LinAlgWarning, lu_factor, lu_solve, qr
from scipy.linalg.blas import dgemm, dger, idamax, isamax, sgemm, sger

from alforge.selectors import register
from alforge.selectors._greedy import blas_thread_count
from alforge.selectors._rounding import U32, U64, abs_norm_bound
from alforge.selectors.base import Selection, Selector, check_budget, check_features, count_over_threshold
from alforge.uncertainty.blas_threads import single_threaded_blas
from alforge.uncertainty.rigidity import iter_chunks

#: Columns of the coefficient matrix per chunk in the swap pass: ~2 MB, cache-resident.
_SWAP_CHUNK_BYTES = 2 * 2**20
#: Rows per block of the float32 Fortran-order copy made for the starting LU.
_TRANSPOSE_ROWS = 2048
#: Values per chunk of the streamed coefficient passes (2 MB of float64).
_PASS_CHUNK_VALUES = 2**18


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
    Memory: a float32 copy of ``features`` and one float32 d × n coefficient matrix (a float64
    one only if the float64 check finds a coefficient above ``tol``).
    """
    f = check_features("features", features)
    n, d = f.shape
    if n < d:
        raise ValueError(f"features has {n} rows, fewer than its {d} columns: no square active set")
    if not tol > 1.0:
        raise ValueError(
            f"tol must be > 1 (at 1 rounding makes active rows swap forever), got {tol}"
        )
    # One float32 Fortran-order copy serves the starting LU and both coefficient GEMMs.
    x32 = _fortran_float32(f)
    if start is None:
        # The start only has to be good, not exact: pivots from a float32 LU cost a quarter of
        # a float64 one here. The stopping test is always made on float64 coefficients.
        _, pivots = lu_factor(x32, check_finite=False)
        order = np.arange(n)
        for k, p in enumerate(pivots):
            order[k], order[p] = order[p], order[k]
        rows = order[:d].copy()
    else:
        rows = np.asarray(start, dtype=np.int64).copy()
        if rows.shape != (d,) or len(np.unique(rows)) != d or rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"start must hold {d} distinct row indices of features, got {start!r}")
    limit = 100 * d if max_swaps is None else max_swaps
    # The swap pass is memory-bound BLAS-2 over a d × n coefficient matrix: float32 halves that
    # traffic. The check that follows recomputes the coefficients of the rows reached from
    # scratch (float32 GEMM), bounds their rounding error rigorously and recomputes in float64
    # every row the bound cannot clear (_rows_to_check); only if one of those is above `tol`
    # does it build the float64 matrix and swap further. So the result carries the same
    # guarantee as an all-float64 run.
    coef = np.empty((d, n), dtype=np.float32, order="F")
    np.matmul(x32, _active_inverse(f, rows).astype(np.float32), out=coef.T)
    n_swaps, converged = _swaps(coef, rows, tol, limit, sger, isamax)
    a_inv = _active_inverse(f, rows)
    np.matmul(x32, a_inv.astype(np.float32), out=coef.T)
    del x32
    suspects = _rows_to_check(coef, np.asarray(f[rows], dtype=np.float64), a_inv, tol)
    del coef
    if _any_above(f, suspects, a_inv, tol):
        coef64 = np.empty((d, n), dtype=np.float64, order="F")
        _coefficients(f, a_inv, coef64)
        done, converged = _swaps(coef64, rows, tol, limit - n_swaps, dger, idamax)
        n_swaps += done
    else:
        converged = True
    with single_threaded_blas():
        lu, _ = _lu_or_raise("features", np.asarray(f[rows], dtype=np.float64))
    log_abs_det = float(np.sum(np.log(np.abs(np.diag(lu)))))
    return MaxVolResult(rows, log_abs_det, n_swaps, converged)


def _rows_to_check(
    coef: np.ndarray, active: np.ndarray, a_inv: np.ndarray, tol: float
) -> np.ndarray:
    """Rows whose float32 coefficients ``coef`` (d, n) = fl32(fl32(F) fl32(A⁻¹)) cannot prove
    ``max_i |(f_j A⁻¹)_i| ≤ tol``.

    Rounding model: ``|ĉ_ji − c_ji| ≤ κ ‖f_j‖`` with ``κ = 2((d + 2) u₃₂ + d u₆₄ cond(A)) ν``,
    ``ν`` the largest column norm of ``A⁻¹`` (the casts and the length-d dot products, plus the
    float64 inverse's own error; doubled for safety). Since ``f_j = c_j A``,
    ``‖f_j‖ ≤ √d ‖A‖₂ ‖c_j‖∞``, so with ``ρ = κ √d ‖A‖₂ < 1`` the true largest coefficient is at
    most ``m_j / (1 − ρ)`` (``m_j`` the float32 one): only rows with ``m_j > tol (1 − ρ)`` need
    float64. ``ρ`` grows with ``cond(A)``; an ill-conditioned active set checks every row.
    """
    d, n = coef.shape
    a_norm = abs_norm_bound(active)
    cond = a_norm * abs_norm_bound(a_inv)
    nu = float(np.sqrt(np.einsum("ij,ij->j", a_inv, a_inv).max()))
    rho = 2.0 * ((d + 2) * U32 + d * U64 * cond) * nu * np.sqrt(d) * a_norm
    if not rho < 0.5:
        return np.arange(n)
    largest = np.empty(n, dtype=np.float32)
    for cols in _cache_chunks(n, d):
        block = coef[:, cols]
        np.maximum(block.max(axis=0), -block.min(axis=0), out=largest[cols])
    return np.flatnonzero(largest > tol * (1.0 - rho))


def _fortran_float32(f: np.ndarray) -> np.ndarray:
    """``f`` as a Fortran-order float32 copy (LAPACK's layout), cast and transposed in row blocks
    (a whole-array ``asfortranarray`` is a cache-hostile strided copy, ~3× slower here)."""
    out = np.empty(f.shape, dtype=np.float32, order="F")
    step = max(1, _TRANSPOSE_ROWS)
    for start in range(0, len(f), step):
        out[start : start + step] = f[start : start + step]
    return out


def _active_inverse(f: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``A⁻¹`` (float64) of the active rows, with the rank test of :func:`_lu_or_raise`."""
    with single_threaded_blas():
        lu, piv = _lu_or_raise("features", np.asarray(f[rows], dtype=np.float64))
        return lu_solve((lu, piv), np.eye(len(rows)), check_finite=False)


def _coefficients(f: np.ndarray, a_inv: np.ndarray, out: np.ndarray) -> None:
    """``out[:, j] = (f_j A⁻¹)ᵀ`` into the Fortran-order (d, n) ``out``, in row chunks: the
    C-order (m, d) product of a chunk is exactly the memory of ``out[:, chunk]``, so each GEMM
    writes in place, and float64 input is cast to ``out``'s dtype a chunk at a time."""
    buf = None
    for rows in _cache_chunks(len(f), f.shape[1]):
        block = f[rows]
        if block.dtype != out.dtype:
            if buf is None:
                buf = np.empty((rows.stop - rows.start, f.shape[1]), dtype=out.dtype)
            np.copyto(buf[: len(block)], block, casting="same_kind")
            block = buf[: len(block)]
        np.matmul(block, a_inv, out=out[:, rows].T)


def _any_above(f: np.ndarray, rows: np.ndarray, a_inv: np.ndarray, tol: float) -> bool:
    """Whether some float64 coefficient ``|f_j A⁻¹|`` of the rows ``rows`` exceeds ``tol``
    (streamed in chunks, nothing kept)."""
    for part in _cache_chunks(len(rows), f.shape[1]):
        block = np.asarray(f[rows[part]], dtype=np.float64) @ a_inv
        if block.max() > tol or -block.min() > tol:
            return True
    return False


def _cache_chunks(n: int, d: int) -> list[slice]:
    """Row slices of about 2 MB of float64 each, so a chunk and its product stay in cache."""
    step = max(1, _PASS_CHUNK_VALUES // max(d, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _swaps(
    coef: np.ndarray, rows: np.ndarray, tol: float, limit: int, ger, iamax
) -> tuple[int, bool]:
    """Greedy swaps in place (``rows`` too) until every ``|coef| ≤ tol``; (swaps made, converged).

    Each swap is one pass over ``coef`` in cache-sized column chunks (a BLAS ``ger`` and an
    ``i?amax`` each). The pass is memory-bound, so the chunks are split into contiguous groups,
    one per BLAS thread in force (the BLAS calls release the GIL; each runs on one BLAS thread):
    on a shared machine one group, elsewhere the memory bandwidth of every core. The groups'
    maxima are combined in column order, so the pick is the sequential loop's.
    """
    d, n = coef.shape
    step = max(1, _SWAP_CHUNK_BYTES // (coef.itemsize * d))
    chunks = [slice(s, min(s + step, n)) for s in range(0, n, step)]
    workers = max(1, min(blas_thread_count(), len(chunks)))
    bounds = np.linspace(0, len(chunks), workers + 1).astype(int)
    groups = [chunks[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def update(group: list[slice], scale: float, column: np.ndarray, row: np.ndarray):
        # coef ← coef + scale · column ⊗ row on the group's chunks, and its largest |entry|.
        best, i, j = -1.0, 0, 0
        for cols in group:
            block = coef[:, cols]
            ger(scale, column, row[cols], a=block, overwrite_a=True)
            flat = block.ravel(order="F")
            k = int(iamax(flat))
            if abs(flat[k]) > best:
                best, i, j = abs(flat[k]), k % d, cols.start + k // d
        return best, i, j

    # One group (small inputs, one BLAS thread) runs inline: no thread to start per call.
    executor = ThreadPoolExecutor(workers) if workers > 1 else None
    with single_threaded_blas(), executor or nullcontext():
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
            scale = -1.0 / pivot
            if executor is None:
                results = [update(chunks, scale, column, row)]
            else:
                results = executor.map(lambda g: update(g, scale, column, row), groups)
            best, i, j = -1.0, 0, 0
            for value, gi, gj in results:
                if value > best:
                    best, i, j = value, gi, gj
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


def extrapolation_grade(
    active_set_inverse: np.ndarray, features: np.ndarray, norm: str = "max"
) -> np.ndarray:
    """``γ_j`` per row from ``A⁻¹`` of the row's element (METHODS §3), streamed in chunks.

    ``norm="max"`` (MTP/ACE practice, default): ``γ_j = max_k |(f_j A⁻¹)_k|``; ``norm="2"`` (002
    eq. 46): ``γ_j = ‖f_j A⁻¹‖₂ = sqrt(f_j (AᵀA)⁻¹ f_jᵀ)``. A structure's grade is the max over its
    atoms. With ``"max"``, γ ≤ 1 for the active rows themselves and, after MaxVol, ≤ tol for every
    training row.
    """
    inverse = np.asarray(active_set_inverse, dtype=np.float64)
    if inverse.ndim != 2 or inverse.shape[0] != inverse.shape[1]:
        raise ValueError(f"active_set_inverse must be square (d, d), got shape {inverse.shape}")
    _check_norm(norm)
    f = check_features("features", features, dim=inverse.shape[0])
    out = np.empty(len(f))
    for rows in iter_chunks(len(f), inverse.shape[0]):
        out[rows] = _reduce(np.asarray(f[rows], dtype=np.float64) @ inverse, norm)
    return out


def _check_norm(norm: str) -> None:
    if norm not in ("max", "2"):
        raise ValueError(f"norm must be 'max' or '2', got {norm!r}")


def _reduce(coef: np.ndarray, norm: str) -> np.ndarray:
    if coef.shape[1] == 0:
        return np.zeros(len(coef))
    if norm == "max":
        return np.abs(coef).max(axis=1)
    return np.sqrt(np.einsum("ij,ij->i", coef, coef))


#: Default relative singular-value cut of an element's span (and of the out-of-span scale).
DEFAULT_SPAN_TOL = 1e-6


@dataclass
class ActiveSet:
    """One element's active set, possibly in a subspace (see the module docstring).

    ``rows`` (r, d): the active training rows; ``basis`` (d, r) orthonormal span basis, or None when
    r = d (then ``inverse`` is the usual ``A⁻¹``); ``inverse`` (r, r): ``(rows V)⁻¹``; ``scale``: the
    length ``s`` an out-of-span residual is measured in.
    """

    rows: np.ndarray
    basis: np.ndarray | None
    inverse: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return len(self.rows)

    def grade(self, features: np.ndarray, norm: str = "max") -> np.ndarray:
        """γ per row of ``features`` (always finite for finite rows)."""
        _check_norm(norm)
        if self.basis is None:
            return extrapolation_grade(self.inverse, features, norm)
        f = check_features("features", features, dim=self.rows.shape[1])
        out = np.empty(len(f))
        for chunk in iter_chunks(len(f), f.shape[1]):
            block = np.asarray(f[chunk], dtype=np.float64)
            y = block @ self.basis
            residual = block - y @ self.basis.T
            outside = np.sqrt(np.einsum("ij,ij->i", residual, residual)) / self.scale
            inside = _reduce(y @ self.inverse, norm)
            out[chunk] = np.maximum(inside, outside) if norm == "max" else np.hypot(inside, outside)
        return out


def build_active_set(
    pool: np.ndarray,
    tol: float = 1.01,
    start: np.ndarray | None = None,
    span_tol: float = DEFAULT_SPAN_TOL,
    fallback_scale: float = 1.0,
) -> ActiveSet:
    """MaxVol over ``pool`` (n, d) in its numerical span (module docstring).

    ``start``: initial active rows (used when it has as many rows as the span's rank);
    ``fallback_scale``: the typical row norm to measure residuals in when ``pool`` is empty.
    """
    pool = np.asarray(pool)
    if pool.dtype not in (np.float32, np.float64):
        pool = pool.astype(np.float64)
    n, d = pool.shape
    if n == 0:
        return ActiveSet(pool, np.zeros((d, 0)), np.zeros((0, 0)), span_tol * fallback_scale)
    sing, vt = _singular_values(pool)
    rank = int(np.count_nonzero(sing > span_tol * sing[0])) if sing[0] > 0 else 0
    if rank == 0:
        empty = np.zeros((0, d))
        return ActiveSet(empty, np.zeros((d, 0)), np.zeros((0, 0)), span_tol * fallback_scale)
    basis = None if rank == d else vt[:rank].T
    coords = pool if basis is None else pool @ basis
    if start is not None and len(start) != rank:
        start = None
    result = maxvol(coords, tol=tol, start=start)
    active = np.asarray(pool[result.rows], dtype=np.float64)
    with single_threaded_blas():
        inverse = np.linalg.inv(np.asarray(coords[result.rows], dtype=np.float64))
    scale = span_tol * float(np.sqrt(np.mean(np.einsum("ij,ij->i", active, active))))
    if basis is not None:
        # The training rows' own out-of-span residuals (at most the first discarded singular
        # value) set the floor, so a training atom never grades above 1 for lying outside the span.
        worst = 0.0
        for chunk in iter_chunks(n, d):
            block = np.asarray(pool[chunk], dtype=np.float64)
            residual = block - coords[chunk] @ basis.T
            worst = max(worst, float(np.einsum("ij,ij->i", residual, residual).max()))
        scale = max(scale, float(np.sqrt(worst)))
    return ActiveSet(active, basis, inverse, scale)


def _singular_values(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values and ``Vᵀ`` of ``pool`` (n, d) in float64 without an n-row float64 array.

    A tall-skinny QR streamed over row chunks (``R ← qr([R; chunk])``, each chunk upcast on its
    own) leaves the d × d triangle ``R`` with ``RᵀR = poolᵀpool`` and the same singular values and
    right vectors, which one small SVD then gives — the QR-first route LAPACK's own SVD takes for
    tall matrices, without forming ``U``.
    """
    triangle: np.ndarray | None = None
    with single_threaded_blas():
        for chunk in iter_chunks(len(pool), pool.shape[1]):
            block = np.asarray(pool[chunk], dtype=np.float64)
            stacked = block if triangle is None else np.vstack([triangle, block])
            triangle = qr(stacked, mode="r", check_finite=False)[0]
        _, sing, vt = np.linalg.svd(triangle, full_matrices=False)
    return sing, vt


def active_sets(
    train: np.ndarray,
    train_elements: np.ndarray,
    tol: float = 1.01,
    span_tol: float = DEFAULT_SPAN_TOL,
) -> dict[Any, ActiveSet]:
    """An :class:`ActiveSet` per element of ``train`` (rank-deficient elements included)."""
    train = check_features("train", train)
    train_elements = np.asarray(train_elements)
    if train_elements.shape != (len(train),):
        raise ValueError(
            f"train_elements must have shape ({len(train)},), got {train_elements.shape}"
        )
    fallback = _rms_norm(train)
    return {
        element: build_active_set(
            train[train_elements == element], tol, None, span_tol, fallback
        )
        for element in np.unique(train_elements)
    }


def _rms_norm(rows: np.ndarray) -> float:
    if len(rows) == 0:
        return 1.0
    total = 0.0
    for chunk in iter_chunks(len(rows), rows.shape[1]):
        block = np.asarray(rows[chunk], dtype=np.float64)
        total += float(np.einsum("ij,ij->", block, block))
    value = np.sqrt(total / len(rows))
    return value if value > 0 else 1.0


#: Storage dtype of the kept coefficients ``C = F A⁻¹`` (:class:`_Coefficients`): float64, so the
#: rounding of a long run of low-rank updates stays orders of magnitude below the gaps between
#: grades, the bounds stay tight and few structures need an exact re-grade (N × d × 8 bytes:
#: 1 GB at 1e6 × 128).
_COEF_DTYPE = np.float64
#: An element's kept coefficients are rebuilt from the features (one GEMM) once the bound on their
#: error exceeds this fraction of the element's largest grade.
_REFRESH_RELATIVE = 1e-6
#: An active-set change of more than this fraction of the rows is applied by a rebuild: the
#: O(n d m) update would cost as much as the O(n d²) product.
_UPDATE_MAX_FRACTION = 0.25


def _set_norms(active: ActiveSet) -> tuple[float, float, float]:
    """(bound of ‖A‖₂, bound of cond(A), ν = largest column norm of A⁻¹) of a full-rank set."""
    a_norm = abs_norm_bound(active.rows)
    cond = a_norm * abs_norm_bound(active.inverse)
    nu = float(np.sqrt(np.einsum("ij,ij->j", active.inverse, active.inverse).max()))
    return a_norm, cond, nu


def _column_max_abs(coef: np.ndarray) -> np.ndarray:
    """``max_k |coef_kj|`` per column of the (d, n) ``coef`` (float64), in cache-sized chunks."""
    out = np.empty(coef.shape[1])
    for cols in _cache_chunks(coef.shape[1], coef.shape[0]):
        block = coef[:, cols]
        np.maximum(block.max(axis=0), -block.min(axis=0), out=out[cols])
    return out


def _row_norms(rows: np.ndarray) -> np.ndarray:
    """``‖f_j‖₂`` per row, in float64 a chunk at a time."""
    out = np.empty(len(rows))
    for chunk in iter_chunks(len(rows), rows.shape[1]):
        block = np.asarray(rows[chunk], dtype=np.float64)
        out[chunk] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


class _Coefficients:
    """``C = F A⁻¹`` of one full-rank element's candidate atoms, kept current across active-set
    changes, with a rigorous per-atom bound ``slack`` on ``|grades_j − γ_j|``
    (``grades_j = max_k |ĉ_jk|``, ``γ_j`` the float64 grade from the features).

    Why: re-grading every candidate atom after each pick is an O(n d²) product per pick; an
    active-set change of m rows is a rank-m change of ``A``, so ``C`` follows in O(n d m).

    Error model (u: unit roundoff of ``_COEF_DTYPE``). Fresh, ``ĉ = fl(f) fl(A⁻¹)`` has
    ``‖ĉ_j − c_j‖∞ ≤ κ ‖f_j‖`` (the model of :func:`_rows_to_check`). When rows ``S`` of ``A``
    change (``A'``), ``C' = C − C[:, S] M`` with ``K = A'[S] A⁻¹`` and
    ``M = K[:, S]⁻¹ (K − E_Sᵀ)`` (Woodbury). That map sends an error ``E`` exactly to
    ``E A A'⁻¹``, so (i) the fresh error at step k is at most ``κ ‖f_j‖ τ`` with
    ``τ = ‖A₀ A_k⁻¹‖₁`` (largest column sum of |·|), and (ii) what an update adds to the
    residual ``ĉ A − f`` stays in it unchanged by later exact updates: the rounding ``ε`` of the
    update (``‖ε_j‖∞ ≤ β ‖ĉ_j‖∞``, ``β = γ_{m+1} (1 + ‖M‖₁) + u ‖M‖₁``) adds at most
    ``√d β ‖ĉ_j‖∞ ‖A'‖₂``, and the float64 ``M̂`` in place of the exact ``M`` adds ``ĉ_S Q``,
    ``Q = M̂ A' − (A'[S] − A[S])`` (computed, so no condition-number model is needed). These sum
    into ``ρ_j``, worth at most ``ρ_j ν_k`` at step k (``ν`` the largest column norm of
    ``A⁻¹``). The float64 grade itself errs by up to ``2 d u₆₄ cond(A) ν ‖f_j‖``, which is added
    too, so the float64 argmax is never excluded. Measured (d = 12, 30 updates): the bound is
    ~2e-12 of the grade in float64 (the true error ~1e-15), ~3e-4 with float32 storage.
    """

    def __init__(
        self, active: ActiveSet, candidates: np.ndarray, atoms: np.ndarray, norms: np.ndarray
    ) -> None:
        self.norms = norms  # ‖f_j‖ of the element's candidate atoms
        self._build(active, candidates, atoms)

    def _build(self, active: ActiveSet, candidates: np.ndarray, atoms: np.ndarray) -> None:
        d = active.rows.shape[1]
        # Fortran-order (d, n), as in maxvol: column j is atom j's coefficients, contiguous, so
        # a chunk of atoms is one BLAS operand and C[S] is m contiguous-strided rows.
        self.coef = np.empty((d, len(atoms)), dtype=_COEF_DTYPE, order="F")
        inverse = active.inverse.astype(_COEF_DTYPE)
        whole = len(atoms) == len(candidates)  # one element: ``atoms`` is every row, in order
        for part in iter_chunks(len(atoms), d):
            block = candidates[part] if whole else candidates[atoms[part]]
            np.matmul(block.astype(_COEF_DTYPE, copy=False), inverse, out=self.coef[:, part].T)
        _, cond, nu = _set_norms(active)
        unit = float(np.finfo(_COEF_DTYPE).eps) / 2
        self.kappa = 2.0 * ((d + 2) * unit + d * U64 * cond) * nu
        self.base = active.rows  # A₀, for τ
        self.tau = 1.0
        self.rho = np.zeros(len(atoms))
        self.grades = _column_max_abs(self.coef)
        self._set_slack(cond, nu)

    def _set_slack(self, cond: float, nu: float) -> None:
        d = self.coef.shape[0]
        per_norm = self.kappa * self.tau + 2.0 * d * U64 * cond * nu
        # 1.01: the bound's own float64 evaluation
        self.slack = 1.01 * (per_norm * self.norms + nu * self.rho)

    def update(
        self, old: ActiveSet, new: ActiveSet, candidates: np.ndarray, atoms: np.ndarray
    ) -> None:
        """Follow the change ``old`` → ``new`` of the active set (both full rank)."""
        changed = np.flatnonzero(np.any(new.rows != old.rows, axis=1))
        if len(changed) == 0:
            return
        d = self.coef.shape[0]
        if len(changed) > _UPDATE_MAX_FRACTION * d:
            self._build(new, candidates, atoms)
            return
        k = new.rows[changed] @ old.inverse
        update = np.linalg.solve(k[:, changed], k - np.eye(d)[changed])
        update_norm = float(np.abs(update).sum(axis=0).max())
        # How far the float64 M̂ is from the exact M, through the residual it leaves: the exact M
        # has M A' = D = A'[S] − A[S], so Q = M̂ A' − D (evaluated to within
        # (d + 2) u₆₄ (|M̂| |A'| + |D|)) moves each residual by ĉ_S Q.
        difference = new.rows[changed] - old.rows[changed]
        q = update @ new.rows - difference
        q_error = np.abs(update) @ np.abs(new.rows) + np.abs(difference)
        q_bound = np.sqrt(np.einsum("ij,ij->i", q, q)) + (d + 2) * U64 * np.sqrt(
            np.einsum("ij,ij->i", q_error, q_error)
        )
        unit = float(np.finfo(_COEF_DTYPE).eps) / 2
        m = len(changed)
        gamma = (m + 1) * unit / (1.0 - (m + 1) * unit)
        # the product and the subtraction in the storage dtype, and the cast of M̂ to it
        beta = gamma * (1.0 + update_norm) + unit * update_norm
        # Cᵀ ← Cᵀ − Mᵀ Cᵀ[S]: one in-place GEMM (beta = 1) per cache-sized chunk of atoms,
        # which is then re-graded while still in cache.
        gemm = dgemm if _COEF_DTYPE == np.float64 else sgemm
        stored = np.asfortranarray(update.T, dtype=_COEF_DTYPE)
        grades = np.empty(self.coef.shape[1])
        for cols in _cache_chunks(self.coef.shape[1], d):
            block = self.coef[:, cols]
            gemm(-1.0, stored, block[changed], beta=1.0, c=block, overwrite_c=True)
            np.maximum(block.max(axis=0), -block.min(axis=0), out=grades[cols])
        a_norm, cond, nu = _set_norms(new)
        self.rho += (np.sqrt(d) * beta * a_norm + float(q_bound.sum())) * self.grades
        self.tau = float(np.abs(self.base @ new.inverse).sum(axis=0).max())
        self.grades = grades
        self._set_slack(cond, nu)
        if self.slack.max() > _REFRESH_RELATIVE * self.grades.max():
            self._build(new, candidates, atoms)


@dataclass
class _ElementState:
    """One element's active set, its candidate atoms and (full rank, ``norm="max"``) their kept
    coefficients."""

    active: ActiveSet
    atoms: np.ndarray  # candidate rows of this element
    coef: _Coefficients | None = None


@register
class DOptimal(Selector):
    """``dopt``: D-optimal batch selection by extrapolation grade, per element (METHODS §3).

    Call ``select(candidates, budget, train=train_atoms, train_elements=..., elements=...,
    groups=...)``: ``candidates`` and ``train`` hold per-atom last-layer feature rows;
    ``elements``/``train_elements`` give each row's element (any hashable labels, e.g. atomic
    numbers); ``groups`` gives each candidate row's structure id. ``indices`` are structure ids.

    Each element's active set is MaxVol over its training rows (``tol``). A structure's grade is
    the max γ over its atoms (``norm="max"``: ``max_k |(f A⁻¹)_k|``, MTP/ACE; ``norm="2"``:
    ``sqrt(f (AᵀA)⁻¹ fᵀ)``, 002 eq. 46); the highest-graded structure is picked, its atoms join the
    active-set update (MaxVol over active set ∪ picked atoms, as MTP/ACE do), grades are
    recomputed, and so on — so one batch does not hold many copies of one environment.

    Rank-deficient element blocks (fewer training atoms than ``d``, or dependent features; none
    at all) get an active set in their numerical span (``span_tol``; module docstring): atoms with
    components outside it grade high but finite, so picks are ordered by how far out they are and
    the picked atoms complete the span. Every grade of a finite feature is finite.

    ``threshold`` is γ_lo (default 1: anything outside the active sets' hull; 2 is the conservative
    MTP/ACE value). When fewer than ``budget`` structures grade above it, the batch is filled with
    the next-highest grades (``fill=True``, the default; ``info["filled_below_threshold"]`` counts
    them, and :meth:`informative` does not count them) or stops short (``fill=False``).
    Scores are the picked structures' γ at the moment of picking.

    Cost per pick: a MaxVol over d + (picked atoms) rows per element of the picked structure, then
    for a full-rank element with ``norm="max"`` an O(n d m) low-rank update of its kept
    coefficients ``C = F A⁻¹`` (m changed active rows; :class:`_Coefficients`), which bound each
    atom's grade; the structures whose bound reaches the best lower bound are re-graded from their
    features in float64, and the pick is their argmax, so picks and scores are those of a full
    re-grade. Rank-deficient elements and ``norm="2"`` re-grade every candidate atom of the element
    (O(n d²)) after each change of its active set.
    """

    name = "dopt"
    level = "atom"

    def __init__(
        self,
        tol: float = 1.01,
        threshold: float = 1.0,
        norm: str = "max",
        span_tol: float = DEFAULT_SPAN_TOL,
        fill: bool = True,
    ) -> None:
        _check_norm(norm)
        self.tol = tol
        self.threshold = threshold
        self.norm = norm
        self.span_tol = span_tol
        self.fill = fill

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """Picks with ``γ > threshold`` (γ_lo); with ``min_score > 0`` set, ``γ ≥ min_score``."""
        return count_over_threshold(scores, min_score, self.threshold)

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
        if not 0 < self.span_tol < 1:
            raise ValueError(f"span_tol must be in (0, 1), got {self.span_tol}")
        structure_ids, owner = np.unique(groups, return_inverse=True)
        b = check_budget(budget, len(structure_ids))
        fallback = _rms_norm(train) if len(train) else _rms_norm(candidates)
        norms = _row_norms(candidates) if self.norm == "max" else None

        # approx ± slack brackets each atom's float64 grade (slack 0: approx is that grade)
        approx = np.empty(len(candidates))
        slack = np.zeros(len(candidates))
        states: dict[Any, _ElementState] = {}
        for element in np.unique(elements):
            atoms = np.flatnonzero(elements == element)
            active = build_active_set(
                train[train_elements == element], self.tol, None, self.span_tol, fallback
            )
            states[element] = _ElementState(active, atoms)
            self._regrade(states[element], None, candidates, norms, approx, slack)

        by_structure = np.argsort(owner, kind="stable")
        first_atom = np.searchsorted(owner[by_structure], np.arange(len(structure_ids)))
        last_atom = np.append(first_atom[1:], len(candidates))
        picked = np.zeros(len(structure_ids), dtype=bool)
        picks: list[int] = []
        scores: list[float] = []
        filled = 0
        stopped = False
        for _ in range(b):
            upper = np.maximum.reduceat((approx + slack)[by_structure], first_atom)
            lower = np.maximum.reduceat((approx - slack)[by_structure], first_atom)
            upper[picked] = -np.inf
            lower[picked] = -np.inf
            structure_grade = self._exact_grades(
                upper >= lower.max(), owner, elements, states, candidates, approx
            )
            s = int(np.argmax(structure_grade))
            if not structure_grade[s] > self.threshold:
                if not self.fill:
                    stopped = True
                    break
                filled += 1
            picked[s] = True
            picks.append(s)
            scores.append(float(structure_grade[s]))
            rows = by_structure[first_atom[s] : last_atom[s]]
            for element in np.unique(elements[rows]):
                state = states[element]
                new = np.asarray(candidates[rows[elements[rows] == element]], dtype=np.float64)
                previous = state.active
                # Start from the current active set (its first rows) when the span keeps its rank.
                state.active = build_active_set(
                    np.vstack([previous.rows, new]),
                    self.tol,
                    np.arange(previous.rank) if previous.rank else None,
                    self.span_tol,
                    fallback,
                )
                self._regrade(state, previous, candidates, norms, approx, slack)
        return Selection(
            structure_ids[np.asarray(picks, dtype=np.int64)],
            np.asarray(scores),
            info={"filled_below_threshold": filled, "stopped_at_threshold": stopped},
        )

    def _regrade(
        self,
        state: _ElementState,
        previous: ActiveSet | None,
        candidates: np.ndarray,
        norms: np.ndarray | None,
        approx: np.ndarray,
        slack: np.ndarray,
    ) -> None:
        """Bracket the grades of ``state``'s atoms after its active set became ``state.active``
        (from ``previous``; None: first grading): kept coefficients where the set is full rank and
        ``norm="max"``, else the float64 grades themselves."""
        atoms = state.atoms
        if norms is not None and state.active.basis is None:
            if state.coef is not None and previous is not None:
                state.coef.update(previous, state.active, candidates, atoms)
            else:
                state.coef = _Coefficients(state.active, candidates, atoms, norms[atoms])
            approx[atoms] = state.coef.grades
            slack[atoms] = state.coef.slack
        else:
            state.coef = None
            _grade_into(approx, state.active, candidates, atoms, self.norm)
            slack[atoms] = 0.0

    def _exact_grades(
        self,
        contenders: np.ndarray,
        owner: np.ndarray,
        elements: np.ndarray,
        states: dict[Any, _ElementState],
        candidates: np.ndarray,
        approx: np.ndarray,
    ) -> np.ndarray:
        """Float64 grades of the ``contenders`` (bool per structure), −inf for the others: atoms
        of kept-coefficient elements re-graded from their features, the others' grades as
        stored (they are the float64 grades)."""
        rows = np.flatnonzero(contenders[owner])
        out = np.full(len(contenders), -np.inf)
        for element in np.unique(elements[rows]):
            state = states[element]
            mine = rows[elements[rows] == element]
            grade = (
                approx[mine]
                if state.coef is None
                else state.active.grade(candidates[mine], self.norm)
            )
            np.maximum.at(out, owner[mine], grade)
        return out


def _grade_into(
    grade: np.ndarray, active: ActiveSet, candidates: np.ndarray, atoms: np.ndarray, norm: str
) -> None:
    """``grade[atoms] = γ`` of those candidate rows, gathering them a chunk at a time (a pick
    re-grades every atom of its elements, so a whole-element gather would copy them per pick)."""
    if len(atoms) == len(candidates):  # one element: ``atoms`` is every row, in order
        grade[:] = active.grade(candidates, norm)
        return
    for part in iter_chunks(len(atoms), candidates.shape[1]):
        grade[atoms[part]] = active.grade(candidates[atoms[part]], norm)


def _labels(context: dict[str, Any], key: str, length: int) -> np.ndarray:
    if context.get(key) is None:
        raise ValueError(f"dopt needs {key}= (one label per row)")
    values = np.asarray(context[key])
    if values.shape != (length,):
        raise ValueError(f"{key} must have shape ({length},), got {values.shape}")
    return values
