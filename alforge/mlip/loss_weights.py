"""The weights of the three kinds of Gauss–Newton label rows (energy, force, stress).

Kept apart from :mod:`alforge.mlip.jacobians` because it needs neither torch nor mace: the stored
Hessian of a model carries its weights, and reading it back (``tasks/hessian.py`` on the select
path) should not pay the seconds that importing torch and mace takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LossWeights"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three kinds of Gauss–Newton rows (not the trainer's λ's themselves).

    ``energy``: weight of the row ``f_s/n_s`` (λ_E). ``forces``: weight of each force row
    ``∂f_s/∂r_iα`` (λ_F κ_F). ``stress``: weight of each of the 9 stress rows (λ_σ κ_σ); 0 means no
    stress rows.
    """

    energy: float
    forces: float
    stress: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{name} must be finite and >= 0, got {value}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossWeights:
        unknown = set(data) - {"energy", "forces", "stress"}
        if unknown:
            raise ValueError(f"LossWeights.from_dict: unknown keys {sorted(unknown)}")
        return cls(float(data["energy"]), float(data["forces"]), float(data.get("stress", 0.0)))
