"""Stop MD where the model extrapolates: the MaxVol extrapolation grade γ (METHODS §3).

``γ_j = max_k |(f_j A⁻¹)_k|`` with ``A`` the active set of atom j's element over the training
set (:class:`alforge.selectors.dopt.ActiveSet`: in the span of that element's training rows when
they are rank-deficient, so every grade of a finite feature is finite); γ ≤ 1 interpolates, γ > γ_hi (typically 10–25) marks a geometry the model cannot be trusted
on, so the trajectory ends there and its later frames are never candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from ase import Atoms

from alforge.mlip.features import compute_features
from alforge.selectors.dopt import ActiveSet


def structure_grade(active: dict[int, ActiveSet], numbers: np.ndarray, last_layer: np.ndarray) -> float:
    """Max γ over the atoms; an element with no training atoms at all grades ``inf`` (never seen)."""
    grade = 0.0
    for z in np.unique(numbers):
        if int(z) not in active:
            return float("inf")
        grade = max(grade, float(active[int(z)].grade(last_layer[numbers == z]).max()))
    return grade


def gamma_check(
    model: torch.nn.Module, active: dict[int, ActiveSet], gamma_hi: float, device: str = "auto"
) -> Callable[[Atoms], str | None]:
    """An ``extra_check`` for :func:`alforge.exploration.md.run_walker`."""

    def check(atoms: Atoms) -> str | None:
        (features,) = compute_features(model, [atoms], device=device)
        grade = structure_grade(active, atoms.numbers, features.last_layer)
        return f"extrapolation grade γ = {grade:.3g} > γ_hi = {gamma_hi:g}" if grade > gamma_hi else None

    return check
