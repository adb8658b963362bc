"""Target-aware greedy selection: MMIG, Q-optimality and PR-guided augmentation (METHODS §3, §4).

All three pick, ``b`` times, the candidate ``c`` that most improves the model on a set of unlabelled
*targets* ``u`` (``targets=`` context, one row ``f_u`` per target structure), then update the
posterior. They differ in the score of a candidate and in the default update. With ``H_t`` the
Hessian after ``t`` picks (so ``H_t⁻¹`` is the posterior covariance of the last-layer weights in
units of ``α²``) and

    u_u = f_uᵀ H_t⁻¹ f_u,   v_c = f_cᵀ H_t⁻¹ f_c,   A_uc = f_uᵀ H_t⁻¹ f_c,

every candidate is scored from ``A`` (T × N), ``u`` and ``v`` at once.

**Update after a pick** (the same rule for all three, chosen by the context):

* ``label_rows=`` given (``R_c``, the compact factor of candidate ``c``'s weighted energy + force
  rows, see :class:`~alforge.selectors.base.Selector`): add what the label actually adds,
  ``H ← H + R_cᵀR_c``. With ``P = H_t⁻¹R_cᵀ``, ``S = I + R_c P = C Cᵀ`` and ``Q = P C⁻ᵀ``
  (Woodbury): ``A ← A − (F_T Q)(F_C Q)ᵀ``, ``u ← u − ‖F_T Q‖²_rows``, ``v ← v − ‖F_C Q‖²_rows``.
* otherwise ``qopt``/``pr_augment`` add the pick's row with weight ``λ`` (``R_c = √λ f_c``, the
  same formulas with r = 1), and ``mmig`` makes the *noiseless* observation of ``f_c`` that eq. 44
  assumes (``λ → ∞``: ``S = v_c``, the direction ``f_c`` leaves the posterior entirely).

Scores stay the one-row forms below (in terms of ``f_c``); only the state update uses ``R_c``.

State and cost: ``A``, ``u``, ``v`` are built once (``H⁻¹F_Tᵀ`` then one T×N GEMM, and a streamed
O(N d²) pass for ``v``); an update costs O(N d r) for ``F_C Q`` and O(T N r) for ``A``.
Memory: ``A`` is T × N float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import cholesky, solve_triangular
from scipy.linalg.blas import dger

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget, check_features
from alforge.selectors.label_mig import check_label_rows
from alforge.selectors.mig import UpdatedInverse, resolve_hessian
from alforge.uncertainty.blas_threads import single_threaded_blas
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, iter_chunks

#: A posterior variance at or below this fraction of its value before any pick counts as zero:
#: the quantity is determined (noiseless updates leave rounding-level residues, never exact 0).
DETERMINED_RTOL = 1e-10
#: ``1 − ρ²`` at or below this counts as 0: the candidate is parallel to the target under the
#: posterior (rounding of ``A², u, v`` is ~1e-15 relative), its MMIG term is +inf.
PARALLEL_TOL = 1e-12


class _TargetAwareSelector(Selector):
    """Shared greedy loop; subclasses define :meth:`_scores`."""

    needs_targets = True
    uses_hessian = True
    label_rows = "optional"
    #: update by a noiseless observation of ``f_c`` (λ → ∞) when no ``label_rows`` are given
    noiseless_update = False

    def __init__(self, regularizer: float = DEFAULT_REGULARIZER, weight: float = 1.0) -> None:
        self.regularizer = regularizer
        self.weight = weight

    def _scores(self, state: _State) -> np.ndarray:
        raise NotImplementedError

    def _objective(self, state: _State) -> float | None:
        return None

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
        if context.get("targets") is None:
            raise ValueError(f"{self.name} needs targets= (one feature row per target structure)")
        targets = check_features("targets", context["targets"], dim=d)
        if len(targets) == 0:
            raise ValueError("targets is empty")
        probs = target_weights(context.get("target_weights"), len(targets))
        if self.weight <= 0:
            raise ValueError(f"weight (λ) must be > 0, got {self.weight}")
        blocks = None
        if context.get("label_rows") is not None:
            blocks = check_label_rows(context["label_rows"], len(candidates), d)
        b = check_budget(budget, len(candidates))
        lam = self.weight
        hessian = resolve_hessian(context, train, d, self.regularizer, lam)
        state = _State(hessian, candidates, np.asarray(targets, dtype=np.float64), probs, b)

        picks = np.empty(b, dtype=np.int64)
        scores = np.empty(b)
        objective = []
        for step in range(b):
            score = self._scores(state)
            score[picks[:step]] = -np.inf
            c = int(np.argmax(score))
            picks[step], scores[step] = c, score[c]
            row = np.asarray(candidates[c], dtype=np.float64)[None, :]
            if blocks is not None:
                state.add(np.asarray(blocks[c], dtype=np.float64), noise=1.0)
            elif self.noiseless_update:
                if not state.determined_candidates()[c]:
                    state.add(row, noise=0.0)
            else:
                state.add(np.sqrt(lam) * row, noise=1.0)
            value = self._objective(state)
            if value is not None:
                objective.append(value)
        if blocks is not None:
            update = "label_rows"
        else:
            update = "noiseless" if self.noiseless_update else "weighted_row"
        info: dict[str, Any] = {"update": update}
        if objective:
            info["objective"] = objective
        return Selection(picks, scores, info=info)


class _State:
    """``A`` (T × N), ``u`` (T), ``v`` (N) under the current posterior, updated exactly."""

    def __init__(
        self, hessian: Any, candidates: np.ndarray, targets: np.ndarray, probs: np.ndarray, b: int
    ) -> None:
        self.candidates = candidates
        self.targets = targets
        self.probs = probs
        self.inverse = UpdatedInverse(hessian, capacity=max(b, 1))
        d = candidates.shape[1]
        # A in Fortran order so that a rank-1 update is one in-place BLAS ger.
        self.cross = np.empty((len(targets), len(candidates)), order="F")
        solved = hessian.solve(targets.T)  # H⁻¹ F_Tᵀ
        self.target_var = np.einsum("ij,ji->i", targets, solved)
        for rows in iter_chunks(len(candidates), d):
            self.cross[:, rows] = (np.asarray(candidates[rows], dtype=np.float64) @ solved).T
        self.cand_var = hessian.variance(candidates)
        self.target_var0 = self.target_var.copy()
        self.cand_var0 = self.cand_var.copy()

    def determined_targets(self) -> np.ndarray:
        return self.target_var <= DETERMINED_RTOL * self.target_var0

    def determined_candidates(self) -> np.ndarray:
        return self.cand_var <= DETERMINED_RTOL * self.cand_var0

    def add(self, rows: np.ndarray, noise: float) -> None:
        """Observe ``rows`` (r, d) with unit precision (``noise=1``) or exactly (``noise=0``)."""
        with single_threaded_blas():
            p = self.inverse.apply(rows.T)  # H_t⁻¹ R_cᵀ, (d, r)
            s = rows @ p
            s = 0.5 * (s + s.T)
            s[np.diag_indices_from(s)] += noise
            chol = cholesky(s, lower=True, check_finite=False)
            q = solve_triangular(chol, p.T, lower=True, check_finite=False).T  # P C⁻ᵀ
            y_t = self.targets @ q
        n, d = self.cross.shape[1], self.candidates.shape[1]
        y_c = np.empty((n, q.shape[1]))
        for rows_ in iter_chunks(n, d):
            y_c[rows_] = np.asarray(self.candidates[rows_], dtype=np.float64) @ q
        if q.shape[1] == 1:
            self.cross = dger(-1.0, y_t[:, 0], y_c[:, 0], a=self.cross, overwrite_a=True)
        else:
            for rows_ in iter_chunks(n, max(len(self.targets), 1)):
                self.cross[:, rows_] -= y_t @ y_c[rows_].T
        self.target_var -= np.einsum("ij,ij->i", y_t, y_t)
        self.cand_var -= np.einsum("ij,ij->i", y_c, y_c)
        np.maximum(self.target_var, 0.0, out=self.target_var)
        np.maximum(self.cand_var, 0.0, out=self.cand_var)
        with single_threaded_blas():
            self.inverse.append(q)


def target_weights(weights: Any, n_targets: int) -> np.ndarray:
    """``p_u``: given weights normalised to sum 1, or uniform ``1/T`` when absent."""
    if weights is None:
        return np.full(n_targets, 1.0 / n_targets)
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (n_targets,):
        raise ValueError(f"target_weights must have shape ({n_targets},), got {p.shape}")
    if np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError("target_weights must be finite, >= 0 and not all 0")
    return p / p.sum()


_target_weights = target_weights  # the old private name


@register
class MeanMarginalInformationGain(_TargetAwareSelector):
    """``mmig``: mean marginal information gain about the targets, 002 eq. 44 as printed.

    ``MMIG_* = −½ Σ_u p_u log(1 − (f_*ᵀH⁻¹f_u)² / ((f_uᵀH⁻¹f_u)(f_*ᵀH⁻¹f_*)))``: the information a
    *noiseless* observation of ``f_*`` gives about each target separately (``−½ log(1 − ρ²)``, ρ the
    posterior correlation of the two predictions), averaged with weights ``p_u``
    (``target_weights=``, normalised; uniform by default). Limits: a candidate parallel to a target
    under the posterior (ρ² = 1, within :data:`PARALLEL_TOL`) scores ``+inf`` and is picked (it
    determines that target); a candidate with zero posterior variance (already determined, within
    :data:`DETERMINED_RTOL`) scores 0, and so does every term of a determined target.

    After a pick the posterior is updated by the noiseless observation of ``f_*`` that the score
    assumes, or, when ``label_rows=`` are given, by the pick's label block ``R_c`` (what the label
    really adds). ``weight`` (λ) only weighs ``train`` rows when ``H`` is built here.
    Scores in nats (possibly ``inf``).
    """

    name = "mmig"
    noiseless_update = True

    def _scores(self, state: _State) -> np.ndarray:
        u, v, a = state.target_var, state.cand_var, state.cross
        live_t = (~state.determined_targets()) & (state.probs > 0)
        live_c = ~state.determined_candidates()
        out = np.zeros(len(v))
        if not live_t.any() or not live_c.any():
            return out
        a = a[np.ix_(live_t, live_c)]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = a**2 / (u[live_t, None] * v[None, live_c])
            remaining = 1.0 - ratio
            terms = np.where(
                remaining <= PARALLEL_TOL, np.inf, -np.log1p(-np.minimum(ratio, 1.0))
            )
        out[live_c] = 0.5 * (state.probs[live_t] @ terms)
        return out


@register
class QOptimal(_TargetAwareSelector):
    """``qopt``: Q-optimality, the largest drop of ``Σ_u p_u f_uᵀH⁻¹f_u`` (METHODS §3).

    Score = ``Σ_u p_u λA_uc² / (1 + λ v_c)``, the reduction in weighted target variance (in units
    of ``α²``) when ``f_c`` is added with weight ``λ``; ``target_weights=`` gives ``p_u`` (default
    uniform). The update adds ``√λ f_c``, or the pick's ``label_rows`` block when given.
    ``info["objective"]``: ``Σ_u p_u u_u`` after each pick.
    """

    name = "qopt"

    def _scores(self, state: _State) -> np.ndarray:
        lam = self.weight
        return (state.probs @ state.cross**2) * (lam / (1.0 + lam * state.cand_var))

    def _objective(self, state: _State) -> float:
        return float(state.probs @ state.target_var)


@register
class PRAugment(_TargetAwareSelector):
    """``pr_augment``: raise the targets' rigidity the most (METHODS §4, 000 §IV.A).

    With ``u_u' = u_u − λA_uc²/(1 + λv_c)`` the target's variance once ``f_c`` is added, the score is
    the gain of the averaged target PR ``R_u = 1/u_u``, chosen by ``average``:

    * ``"mean"`` (the paper's): ``Σ_u p_u (1/u_u' − 1/u_u)``;
    * ``"log"``: ``Σ_u p_u log(u_u/u_u')``, the mean log PR (does not favour already-rigid targets);
    * ``"min"``: ``min_u 1/u_u' − min_u 1/u_u``, the least rigid target's PR (over ``p_u > 0``).

    ``target_weights=`` gives ``p_u`` (default uniform). The update adds ``√λ f_c``, or the pick's
    ``label_rows`` block when given. ``info["objective"]``: the averaged PR after each pick.
    """

    name = "pr_augment"

    def __init__(
        self, regularizer: float = DEFAULT_REGULARIZER, weight: float = 1.0, average: str = "mean"
    ) -> None:
        if average not in ("mean", "log", "min"):
            raise ValueError(f"average must be 'mean', 'log' or 'min', got {average!r}")
        super().__init__(regularizer, weight)
        self.average = average

    def _scores(self, state: _State) -> np.ndarray:
        lam = self.weight
        u = np.maximum(state.target_var, np.finfo(np.float64).tiny)[:, None]
        drop = state.cross**2 * (lam / (1.0 + lam * state.cand_var))[None, :]
        after = np.maximum(u - drop, np.finfo(np.float64).tiny)
        if self.average == "mean":
            return state.probs @ (drop / (u * after))
        if self.average == "log":
            return -(state.probs @ np.log1p(-np.minimum(drop / u, 1.0 - 1e-16)))
        live = state.probs > 0
        return 1.0 / after[live].max(axis=0) - 1.0 / u[live].max()

    def _objective(self, state: _State) -> float:
        u = np.maximum(state.target_var, np.finfo(np.float64).tiny)
        if self.average == "mean":
            return float(state.probs @ (1.0 / u))
        if self.average == "log":
            return float(-(state.probs @ np.log(u)))
        return float(1.0 / u[state.probs > 0].max())
