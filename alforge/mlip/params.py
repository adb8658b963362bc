"""MACE hyperparameters, kept free of torch imports so config validation stays fast."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MACEParams(BaseModel):
    """Small defaults that learn EMT Cu well on 2 CPU cores (see shared STACK.md, "MACE").

    The energy/forces/stress weights matter: 1/100/10 left energies unlearned when tried; 10/100/100
    learned all three.
    """

    model_config = ConfigDict(extra="forbid")

    r_max: float = Field(4.5, gt=0, description="cutoff radius in Å")
    num_channels: int = Field(16, ge=1)
    max_L: int = Field(1, ge=0, le=3)
    max_ell: int = Field(3, ge=1, description="highest ℓ of the edge spherical harmonics (mace default 3)")
    num_interactions: int = Field(2, ge=1)
    correlation: int = Field(2, ge=1)
    num_radial_basis: int = Field(6, ge=1)
    num_cutoff_basis: int = Field(5, ge=1)
    mlp_irreps: str = "16x0e"
    energy_weight: float = Field(10.0, ge=0)
    forces_weight: float = Field(100.0, ge=0)
    stress_weight: float = Field(100.0, ge=0)
    batch_size: int = Field(5, ge=1)
    lr: float = Field(0.01, gt=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    max_epochs: int = Field(60, ge=1, description="epochs when training from scratch")
    finetune_epochs: int = Field(30, ge=1, description="epochs when continuing from the previous model")
    valid_fraction: float = Field(0.1, ge=0, lt=1)
    dtype: Literal["float32", "float64"] = "float64"
    seed: int = 0
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")
