"""Uncertainty from the last-layer Hessian and its calibration; plain arrays in and out.

``rigidity``: the Hessian, PR / LPR / CPR and calibrated variances (METHODS §2).
``calibration``: α² (eqs. 26–27), ENCE, miscalibration area, NLL, Spearman, conformal (METHODS §8).
``blas_threads``: one-thread BLAS for small factorisations on shared machines.
"""
