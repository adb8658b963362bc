"""Uncertainty from the last-layer Hessian and its calibration; plain arrays in and out.

Public API: :func:`loss_hessian` — ``loss_hessian(model, structures, *, regularizer=None,
energy_weight=None, force_weight=None, stress_weight=None, form="loss") -> Hessian``, the
Gauss–Newton Hessian of the loss the MACE model was trained with (``gauss_newton.py``), with
:func:`choose_regularizer` (ς from weight decay or held-out likelihood) and :func:`loss_weights`.

``rigidity``: the :class:`~alforge.uncertainty.rigidity.Hessian`, PR / LPR / CPR and calibrated
variances (METHODS §2). ``calibration``: α² (eqs. 26–27), ENCE, miscalibration area, NLL, Spearman,
conformal (METHODS §8). ``enhancement``: :func:`lpr_enhancement`, the relative LPR gain of an atom
when structures' rows join ``H`` (METHODS §5). ``blas_threads``: one-thread BLAS for small
factorisations on shared machines.
``ltau``: :class:`LTAU`, loss-trajectory uncertainty from the training-error log and a kNN lookup
in embedding space (FAISS, imported when an index is built), with :func:`calibration_curve`
(METHODS §7).
``probe``: PROBE (METHODS §6), :func:`train_probe` → :class:`Probe` (``predict`` → ``p_reliable``, the
256-d embedding, per-atom attention importance; ``save``/:func:`load_probe` tied to the backbone's
SHA-256); ``reliability``: its metrics (accuracy, MCC, F1, ROC-AUC, ECE, Brier, coverage–accuracy)
and the ensemble-std and majority-class baselines.
``gauss_newton`` needs torch and mace, so its functions are exported lazily and importing the
array-only modules stays fast.
"""

from __future__ import annotations

from typing import Any

from alforge.uncertainty.enhancement import lpr_enhancement
from alforge.uncertainty.ltau import LTAU, calibration_curve

__all__ = ["choose_regularizer", "loss_hessian", "loss_weights"]
__all__ += ["lpr_enhancement"]  # array-only: imported eagerly, not through __getattr__
__all__ += ["LTAU", "calibration_curve"]  # array-only too


def __getattr__(name: str) -> Any:
    if name in __all__:
        from alforge.uncertainty import gauss_newton

        return getattr(gauss_newton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
