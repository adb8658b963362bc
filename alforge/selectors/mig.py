"""Greedy batch maximum information gain on structure rows (METHODS §3; 002 §3.5).

With ``H = ς² I + λ Σ_train f fᵀ``, labelling a structure with features ``f`` gains
``ΔI = ½ log(1 + λ fᵀH⁻¹f)``. A batch is built greedily: pick the largest gain, add the pick to
``H`` exactly (``H ← H + λ f fᵀ``), re-score, repeat. This is greedy MaxDet of ``det H``.

How it stays exact and fast:

* ``H`` is factored once in float64. The initial scores ``fᵀH⁻¹f = ‖L⁻¹f‖²`` of all N candidates
  are *upper bounds* from one float32 whitening GEMM ``Z = F L⁻ᵀ`` (streamed in cache-sized chunks;
  float64 input is cast a chunk at a time, never copied whole), each inflated by a rigorous bound
  on its float32 rounding error (:func:`float32_variance_bounds`). Every score that decides a pick
  is then recomputed in float64 by the lazy loop below, so the picks and scores are those of the
  all-float64 greedy loop whatever the input dtype. That is the rule for float32 here: float32
  only ever bounds, float64 decides. When the bounds are loose (a very ill-conditioned ``H`` and
  features along its stiff directions) more candidates are re-scored in float64; the result is
  the same, only slower.
* The picks so far are held as ``H_t⁻¹ = H⁻¹ − W Wᵀ`` (Woodbury / pivoted Cholesky: one column of
  ``W`` per picked row), so a candidate's current variance is its initial one minus
  ``Σ_k (w_k·f)²``.
* Scores only decrease as ``H`` grows, so stale scores and the float32 bounds are upper bounds and
  only the candidates near the top are re-scored (lazy greedy, :mod:`alforge.selectors._greedy`) —
  the picks are those of the plain greedy loop, in the worst case at the plain loop's O(N d) per
  pick.
* The finiteness check of the candidates rides on the same pass (a non-finite entry makes its
  row's float32 norm non-finite; only such rows are re-checked in float64).

Memory beyond the caller's candidate array: O(N) floats, two float32 chunks of ~8 MB and ``W``
(d × picked rows).

The information a DFT label actually adds (its energy row and 3n force rows together) is scored
by ``mig_label`` (:mod:`alforge.selectors.label_mig`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

from alforge.selectors import register
from alforge.selectors._greedy import lazy_greedy
from alforge.selectors._rounding import U32, U64, abs_norm_bound
from alforge.selectors.base import (
    Selection,
    Selector,
    check_budget,
    check_features,
    check_hessian,
)
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, Hessian

#: Values per chunk of the float32 whitening pass (8 MB of float32): large enough that each GEMM
#: is worth its BLAS threads (smaller chunks measured slower here: 2**17 3.7×, 2**19 1.2× the time
#: of 2**21 on a loaded 2-core machine), small enough that the buffers stay far below the input.
_BOUND_CHUNK_VALUES = 2**21


def float32_variance_bounds(
    hessian: Hessian, candidates: np.ndarray, factor: np.ndarray | None = None
) -> np.ndarray:
    """Upper bounds of ``fᵀH⁻¹f`` per row from one float32 GEMM with ``M = L⁻¹`` (why: module doc).

    With ``ẑ = fl32(fl32(M) fl32(f))`` the standard rounding model gives, per row,
    ``‖ẑ − M f‖ ≤ (d + 2) u ‖|M|‖₂ ‖f‖`` (u = 2⁻²⁴: the two casts and the length-d dot products),
    plus ``M``'s own float64 error; so ``fᵀH⁻¹f = ‖M f‖² ≤ (‖ẑ‖ + e)²`` with ``e`` that bound
    (doubled for safety, and covering the float32 sums of squares). ``‖|M|‖₂ ≤ sqrt(‖M‖₁‖M‖∞)``.

    A row whose float32 norms are not finite (a non-finite entry, or one beyond the float32 range)
    is scored exactly in float64 instead; a non-finite entry raises ``ValueError`` naming
    ``candidates``. ``factor``: ``M`` from :func:`inverse_factor`, when already formed.
    """
    d = hessian.dim
    chol = np.asarray(hessian.cholesky, dtype=np.float64)
    inverse = inverse_factor(hessian) if factor is None else factor
    m32t = np.ascontiguousarray(inverse.T, dtype=np.float32)
    abs_m = abs_norm_bound(inverse)
    # Float64 error of M itself: |M̂ − M| ≤ d u64 |M||L||M| (triangular inversion); tiny next
    # to the float32 terms.
    kappa = 2.0 * ((d + 2) * U32 * abs_m + d * U64 * abs_m**2 * abs_norm_bound(chol))
    sums = 1.0 + 2.0 * (d + 1) * U32  # float32 sums of d squares: relative error ≤ (d + 1) u
    n = len(candidates)
    step = max(1, _BOUND_CHUNK_VALUES // max(d, 1))
    f32 = np.empty((min(step, n), d), dtype=np.float32)
    z32 = np.empty_like(f32)
    z_sq = np.empty(n, dtype=np.float32)
    f_sq = np.empty(n, dtype=np.float32)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        m = rows.stop - rows.start
        np.copyto(f32[:m], candidates[rows], casting="same_kind")
        np.matmul(f32[:m], m32t, out=z32[:m])
        np.einsum("ij,ij->i", z32[:m], z32[:m], out=z_sq[rows])
        np.einsum("ij,ij->i", f32[:m], f32[:m], out=f_sq[rows])
    z_norm = np.sqrt(z_sq.astype(np.float64) * sums)
    f_norm = np.sqrt(f_sq.astype(np.float64) * sums) * (1.0 + 2.0 * U32)
    bounds = (z_norm + kappa * f_norm) ** 2
    bad = np.flatnonzero(~np.isfinite(bounds))
    if bad.size:
        rows = np.asarray(candidates[bad], dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            raise ValueError("candidates contains non-finite values")
        bounds[bad] = hessian.variance(rows)
    return bounds


def inverse_factor(hessian: Hessian) -> np.ndarray:
    """``M = L⁻¹`` (float64, lower triangular) so that ``fᵀH⁻¹f = ‖M f‖²`` and ``H⁻¹ = MᵀM``.

    Formed once (O(d³/3)) because a GEMM with ``M`` costs a fraction of a triangular solve's call
    overhead for the few rows the greedy loops handle per step, and is the float32 whitening GEMM.
    """
    chol = np.asarray(hessian.cholesky, dtype=np.float64)
    return solve_triangular(chol, np.eye(hessian.dim), lower=True, check_finite=False)


class UpdatedInverse:
    """``H_t⁻¹ = H⁻¹ − W Wᵀ``: the inverse Hessian after adding rows one at a time, unrefactored.

    Adding ``f`` with weight ``λ`` is Sherman–Morrison: ``p = H_t⁻¹ f``, new column
    ``w = p / sqrt(1/λ + fᵀp)`` — the pivoted-Cholesky column of the pick (METHODS §3).
    ``W`` is stored transposed (one contiguous row per column), so the columns added since pick
    ``t`` are one contiguous block.
    """

    def __init__(
        self, hessian: Hessian, capacity: int = 16, factor: np.ndarray | None = None
    ) -> None:
        self.hessian = hessian
        #: ``M = L⁻¹`` (:func:`inverse_factor`; pass it when already formed).
        self.factor = inverse_factor(hessian) if factor is None else factor
        self._wt = np.empty((max(capacity, 1), hessian.dim))
        self.n_columns = 0

    @property
    def columns(self) -> np.ndarray:
        """``W`` (d, n_columns): one column per row added so far (a view)."""
        return self._wt[: self.n_columns].T

    def apply(self, rhs: np.ndarray) -> np.ndarray:
        """``H_t⁻¹ rhs = Mᵀ(M rhs) − W(Wᵀ rhs)`` for a vector or a (d, k) matrix (with the caller's
        BLAS threads: greedy loops call it many times inside one single-thread section)."""
        w = self.columns
        rhs = np.asarray(rhs, dtype=np.float64)
        m = self.factor
        return m.T @ (m @ rhs) - w @ (w.T @ rhs)

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
        if self.n_columns + k > self._wt.shape[0]:
            grown = np.empty((max(2 * self._wt.shape[0], self.n_columns + k), self._wt.shape[1]))
            grown[: self.n_columns] = self._wt[: self.n_columns]
            self._wt = grown
        self._wt[self.n_columns : self.n_columns + k] = columns.T
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


def check_shape(name: str, array: np.ndarray) -> np.ndarray:
    """A 2-D (n, d) array (finiteness is checked later, on the scoring pass)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {array.shape}")
    return array


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
        candidates = check_shape("candidates", candidates)
        train = check_features("train", train, dim=candidates.shape[1])
        if self.weight <= 0:
            raise ValueError(f"weight (λ) must be > 0, got {self.weight}")
        b = check_budget(budget, len(candidates))
        if b == 0:
            return Selection(np.empty(0, dtype=np.int64), np.empty(0))
        lam = self.weight
        hessian = resolve_hessian(context, train, candidates.shape[1], self.regularizer, lam)
        inverse = UpdatedInverse(hessian, capacity=b)
        m_t = inverse.factor.T
        # Also checks every candidate is finite (float32_variance_bounds).
        bounds = float32_variance_bounds(hessian, candidates, inverse.factor)

        def refresh(idx: np.ndarray, stale: np.ndarray, fresh_at: np.ndarray) -> np.ndarray:
            # v_i(t) = v_i(t_i) − Σ_{k ≥ t_i} (w_k·f_i)²: only the columns added since t_i count;
            # a candidate never scored in float64 (t_i = -1) starts from ‖L⁻¹f_i‖².
            rows = np.asarray(candidates[idx], dtype=np.float64)
            new = fresh_at < 0
            out = np.array(stale, dtype=np.float64)
            if new.all():
                z = rows @ m_t
                out = np.einsum("ij,ij->i", z, z)
            elif new.any():
                z = rows[new] @ m_t
                out[new] = np.einsum("ij,ij->i", z, z)
            first = max(int(fresh_at.min()), 0)
            if first == inverse.n_columns:
                return out
            proj = rows @ inverse.columns[:, first:]
            if fresh_at.max() > first:
                proj *= np.arange(first, inverse.n_columns) >= fresh_at[:, None]
            return out - np.einsum("ij,ij->i", proj, proj)

        def commit(i: int) -> None:
            inverse.add(candidates[i], lam)

        picks, variances, n_refreshed = lazy_greedy(
            bounds, b, refresh, commit, exact_initial=False
        )
        gains = 0.5 * np.log1p(lam * np.maximum(variances, 0.0))
        return Selection(picks, gains, info={"n_rescored": n_refreshed})
