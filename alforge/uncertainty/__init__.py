"""Uncertainty from the last-layer Hessian and its calibration; plain arrays in and out.

``rigidity``: the Hessian, PR / LPR / CPR and calibrated variances (METHODS §2).
``loss_hessian``: the Gauss–Newton Hessian of the loss the MACE model was trained with
(``loss_hessian.loss_hessian``, exported here as :func:`compute_loss_hessian`, since the name
``alforge.uncertainty.loss_hessian`` is the module; :func:`choose_regularizer`, :func:`loss_weights`).
It needs torch and mace, so it is exported lazily and importing the array-only modules stays fast.
``calibration``: α² (eqs. 26–27), ENCE, miscalibration area, NLL, Spearman, conformal (METHODS §8).
``blas_threads``: one-thread BLAS for small factorisations on shared machines.
"""

from __future__ import annotations

from typing import Any

__all__ = ["choose_regularizer", "compute_loss_hessian", "loss_weights"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from alforge.uncertainty import loss_hessian as module

        return module.loss_hessian if name == "compute_loss_hessian" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
