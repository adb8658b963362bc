"""The selector contract shared by every selection method.

A selector follows scikit-learn's estimator shape: hyperparameters go to ``__init__`` (and are
recorded verbatim with each selection in the store via :meth:`Selector.get_params`), the work
happens in :meth:`Selector.select`, which sees plain NumPy arrays only. That keeps every method
testable and benchmarkable without a database or Prefect.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Selection:
    """The outcome of one call to :meth:`Selector.select`.

    ``indices`` are candidate rows in pick order; ``scores[k]`` is the score that pick ``k`` had
    at the moment it was picked (so for greedy methods the scores are generally non-increasing).
    ``info`` carries method-specific diagnostics that are small and JSON-serialisable.
    """

    indices: np.ndarray
    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.scores):
            raise ValueError(
                f"Selection has {len(self.indices)} indices but {len(self.scores)} scores"
            )


class Selector:
    """Base class: subclasses set ``name`` and implement :meth:`select`.

    **Context** (keyword arguments of :meth:`select` beyond ``candidates``/``budget``/``train``;
    each selector names what it needs and ignores the rest):

    * ``hessian``: an :class:`alforge.uncertainty.rigidity.Hessian`, the loss-consistent
      Gauss–Newton Hessian of the current model (energy, force and stress rows weighted as
      trained, plus ``ς² I``; METHODS §2), computed once per model. Every ``H``-based selector
      (``mig``, ``mig_label``, ``mmig``, ``qopt``, ``pr_augment``) uses it when given and then
      ignores ``train`` and its own ``regularizer``; without it they build
      ``H = ς² I + λ trainᵀtrain`` from ``train`` (standalone use, tests, benchmarks).
    * ``label_rows``: a list of N 2-D arrays, ``R_c`` of shape ``(r_c, d)``, the compact factor of
      candidate ``c``'s weighted energy + force (+ stress) rows ``G_c`` (``R_cᵀR_c = G_cᵀG_c``):
      the information a DFT label of ``c`` actually adds to ``H``. ``mig_label`` scores by it;
      ``mmig``/``qopt``/``pr_augment`` add the pick's block to ``H`` after each pick when given.
    * ``targets`` / ``target_weights`` (target-aware selectors), ``groups`` / ``elements`` /
      ``train_elements`` (per-atom selectors), ``force_deviation`` (committee).

    **Scores and stopping.** ``Selection.scores`` are in the selector's own units, and
    :meth:`informative` says how many picks of a batch count as informative for the campaign's
    ``stopping.min_score`` / ``min_informative`` test:

    * ``mig``, ``mig_label``, ``mmig``: information gain in nats, informative if ``≥ min_score``;
    * ``qopt``: drop of the weighted target variance ``Σ p_u f_uᵀH⁻¹f_u`` (units of ``α²``);
    * ``pr_augment``: gain of the averaged target rigidity (mean PR, mean log PR, or min PR);
    * ``dopt``: extrapolation grade γ, informative if ``γ > threshold`` (γ_lo) when
      ``min_score`` is unset (``None`` or ``≤ 0``), else if ``γ ≥ min_score``;
    * ``fps``: Euclidean distance to the covered set, ``≥ min_score``;
    * ``committee``: max force deviation (eV/Å) inside the trust window and ``≥ min_score``;
    * ``random``: every pick is informative (random selection has no notion of information);
    * ``ltau`` (LTAU p) and ``probe`` (1 − p_reliable): in [0, 1], informative above their own
      threshold (``uncertain_above`` / ``unreliable_above``, 0.5) when ``min_score`` is unset, else
      if ``≥ min_score`` (:func:`count_over_threshold`, as ``dopt``);
    * ``lpr``: the centre's LPR, lower is less rigid: informative if ``≤ min_score`` (all when unset).
    """

    name: str = ""
    #: what ``candidates``/``train`` rows are: "structure" (one row per structure) or
    #: "atom" (one row per atom; the adapter passes ``groups`` mapping rows to structures).
    level: str = "structure"
    #: True if ``select`` needs ``targets=`` (feature rows of the structures the model must become
    #: good at); campaigns then require a ``targets:`` section.
    needs_targets: bool = False
    #: True if ``select`` reads ``hessian=`` (the campaign then passes the model's one stored ``H``).
    uses_hessian: bool = False
    #: whether ``select`` reads ``label_rows=``: "none", "optional" (used for the update after a
    #: pick) or "required" (scored by them).
    label_rows: str = "none"

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, read back from attributes of the same name."""
        sig = inspect.signature(type(self).__init__)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {n: getattr(self, n) for n, p in sig.parameters.items() if n != "self" and p.kind in named}

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        raise NotImplementedError

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """How many of a batch's ``scores`` count as informative (units: see the class docstring).

        The default: scores ``≥ min_score`` (all of them when ``min_score`` is ``None``).
        """
        scores = np.asarray(scores, dtype=np.float64)
        if min_score is None:
            return int(scores.size)
        return int(np.count_nonzero(scores >= min_score))


def count_over_threshold(scores: np.ndarray, min_score: float | None, threshold: float) -> int:
    """The informative count of selectors with a threshold of their own (``dopt``'s γ_lo, ``ltau``,
    ``probe``): scores ``> threshold`` when ``min_score`` is unset (``None`` or ``≤ 0``, the
    campaign default), else scores ``≥ min_score``."""
    scores = np.asarray(scores, dtype=np.float64)
    if min_score is None or min_score <= 0:
        return int(np.count_nonzero(scores > threshold))
    return int(np.count_nonzero(scores >= min_score))


def check_features(name: str, array: np.ndarray | None, dim: int | None = None) -> np.ndarray | None:
    """Validate a 2-D finite feature array, naming it in the error."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {array.shape[1]}, expected {dim}")
    # Row chunks of ~4M values: a million-row memory-mapped feature file is checked without a
    # full-size boolean temporary.
    step = max(1, 2**22 // max(array.shape[1], 1))
    for start in range(0, len(array), step):
        if not np.all(np.isfinite(array[start : start + step])):
            raise ValueError(f"{name} contains non-finite values")
    return array


def check_hessian(hessian: Any, dim: int | None) -> Any:
    """The ``hessian=`` context, checked: a ``Hessian``-like object of dimension ``dim``."""
    if hessian is None:
        return None
    for attr in ("dim", "solve", "variance", "whiten", "cholesky", "matrix"):
        if not hasattr(hessian, attr):
            raise ValueError(f"hessian must be an alforge Hessian (it has no `{attr}`)")
    if dim is not None and hessian.dim != dim:
        raise ValueError(f"hessian has dimension {hessian.dim}, expected {dim}")
    return hessian


def check_budget(budget: int, n_candidates: int) -> int:
    """Clamp ``budget`` to the number of candidates; reject negatives."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return min(int(budget), n_candidates)
