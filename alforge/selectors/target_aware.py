"""Target-aware greedy selection: MMIG, Q-optimality and PR-guided augmentation (METHODS §3, §4).

All three pick, ``b`` times, the candidate ``c`` that most improves the model on a set of unlabelled
*targets* ``u`` (``targets=`` context, one row ``f_u`` per target structure), then add it to ``H``.
They differ only in the score of a candidate. With ``H_t`` the Hessian after ``t`` picks and

    u_u = f_uᵀ H_t⁻¹ f_u,   v_c = f_cᵀ H_t⁻¹ f_c,   A_uc = f_uᵀ H_t⁻¹ f_c,

Sherman–Morrison gives every target's variance after adding ``c`` with weight ``λ``:
``u_u' = u_u − λ A_uc² / (1 + λ v_c)`` — so all candidates are scored from ``A`` (T × N) at once.

State and cost: ``A``, ``u``, ``v`` are built once (``H⁻¹F_Tᵀ`` then one T×N GEMM, and a streamed
O(N d²) pass for ``v``). A pick ``c`` changes the kernel by a rank-1 term, so the state is updated
exactly with one GEMV over the candidates (``F_C H_t⁻¹ f_c``, O(N d)) and a rank-1 update of ``A``
(O(T N)) — cheaper than re-forming ``A`` per pick. Memory: ``A`` is T × N float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg.blas import dger

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget, check_features
from alforge.selectors.mig import UpdatedInverse
from alforge.uncertainty.blas_threads import single_threaded_blas
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, Hessian, iter_chunks


class _TargetAwareSelector(Selector):
    """Shared greedy loop; subclasses define :meth:`_scores`."""

    needs_targets = True

    def __init__(self, regularizer: float = DEFAULT_REGULARIZER, weight: float = 1.0) -> None:
        self.regularizer = regularizer
        self.weight = weight

    def _scores(
        self, cross: np.ndarray, target_var: np.ndarray, cand_var: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        raise NotImplementedError

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
        probs = _target_weights(context.get("target_weights"), len(targets))
        if self.weight <= 0:
            raise ValueError(f"weight (λ) must be > 0, got {self.weight}")
        b = check_budget(budget, len(candidates))
        lam = self.weight
        hessian = Hessian.from_features(
            train, dim=d, regularizer=self.regularizer, energy_weight=lam
        )
        inverse = UpdatedInverse(hessian, capacity=max(b, 1))
        # A in Fortran order so that the per-pick rank-1 update is one in-place BLAS ger.
        cross = np.empty((len(targets), len(candidates)), order="F")
        solved_targets = hessian.solve(np.asarray(targets, dtype=np.float64).T)  # H⁻¹ F_Tᵀ
        target_var = np.einsum("ij,ji->i", np.asarray(targets, dtype=np.float64), solved_targets)
        for rows in iter_chunks(len(candidates), d):
            cross[:, rows] = (np.asarray(candidates[rows], dtype=np.float64) @ solved_targets).T
        cand_var = hessian.variance(candidates)

        picks = np.empty(b, dtype=np.int64)
        scores = np.empty(b)
        for step in range(b):
            score = self._scores(cross, target_var, cand_var, probs)
            score[picks[:step]] = -np.inf
            c = int(np.argmax(score))
            picks[step], scores[step] = c, score[c]
            # Rank-1 update of the kernel k(x, y) = xᵀH_t⁻¹y after adding f_c with weight λ.
            with single_threaded_blas():
                kernel_c = inverse.apply(np.asarray(candidates[c], dtype=np.float64))
            row = np.empty(len(candidates))
            for rows in iter_chunks(len(candidates), d):
                row[rows] = np.asarray(candidates[rows], dtype=np.float64) @ kernel_c
            scale = lam / (1.0 + lam * cand_var[c])
            column = cross[:, c].copy()
            cross = dger(-scale, column, row, a=cross, overwrite_a=True)
            target_var -= scale * column**2
            cand_var -= scale * row**2
            with single_threaded_blas():
                inverse.add(candidates[c], lam)
        return Selection(picks, scores)


def _target_weights(weights: Any, n_targets: int) -> np.ndarray:
    """``p_u``: given weights normalised to sum 1, or uniform ``1/T`` when absent."""
    if weights is None:
        return np.full(n_targets, 1.0 / n_targets)
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (n_targets,):
        raise ValueError(f"target_weights must have shape ({n_targets},), got {p.shape}")
    if np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError("target_weights must be finite, >= 0 and not all 0")
    return p / p.sum()


@register
class MeanMarginalInformationGain(_TargetAwareSelector):
    """``mmig``: mean marginal information gain about the targets (002 eq. 44).

    ``MMIG_c = −½ Σ_u p_u log(1 − λA_uc² / (u_u (1 + λ v_c)))`` = ``½ Σ_u p_u log(u_u / u_u')``:
    the information a noisy label of ``c`` (precision ``λ``) gives about each target separately,
    averaged with weights ``p_u`` (``target_weights=``, default uniform). Eq. 44 is the noiseless
    limit ``λ → ∞``; a finite ``λ`` keeps the gain finite when a candidate duplicates a target.
    """

    name = "mmig"

    def _scores(
        self, cross: np.ndarray, target_var: np.ndarray, cand_var: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        ratio = (self.weight * cross**2) / (
            target_var[:, None] * (1.0 + self.weight * cand_var)[None, :]
        )
        return -0.5 * (probs @ np.log1p(-ratio))


@register
class QOptimal(_TargetAwareSelector):
    """``qopt``: Q-optimality, the largest drop of ``Σ_u p_u f_uᵀH⁻¹f_u`` (METHODS §3).

    Score = ``Σ_u p_u λA_uc² / (1 + λ v_c)``, the reduction in weighted target variance (in units
    of ``α²``); ``target_weights=`` gives ``p_u`` (default uniform).
    """

    name = "qopt"

    def _scores(
        self, cross: np.ndarray, target_var: np.ndarray, cand_var: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        return (probs @ cross**2) * (self.weight / (1.0 + self.weight * cand_var))


@register
class PRAugment(_TargetAwareSelector):
    """``pr_augment``: maximise the targets' mean PR after adding ``c`` (METHODS §4, 000 §IV.A).

    Score = ``Σ_u p_u / u_u'``, the mean target rigidity once ``c`` is in the training set: the
    paper's plain mean by default, a weighted mean when ``target_weights=`` is given.
    """

    name = "pr_augment"

    def _scores(
        self, cross: np.ndarray, target_var: np.ndarray, cand_var: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        shrink = self.weight / (1.0 + self.weight * cand_var)
        return probs @ (1.0 / (target_var[:, None] - cross**2 * shrink[None, :]))
