"""Rounding constants and the norm bound shared by the float32 paths of ``mig`` and MaxVol, whose
float32 results are only bounds: each proves with these that float64 would decide the same."""

from __future__ import annotations

import numpy as np

U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
U64 = float(np.finfo(np.float64).eps) / 2


def abs_norm_bound(matrix: np.ndarray) -> float:
    """An upper bound of ``‖|A|‖₂`` (also of ``‖A‖₂``): ``sqrt(‖A‖₁ ‖A‖∞)`` (Hölder)."""
    absolute = np.abs(matrix)
    return float(np.sqrt(absolute.sum(axis=0).max() * absolute.sum(axis=1).max()))
