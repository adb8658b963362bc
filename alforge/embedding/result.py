"""What a strategy hands back to `embed` before the shared checks and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field

from ase import Atoms


@dataclass
class Embedded:
    """One generated structure: its centre's index (None for the pristine host crystal, which holds
    no centre) and the strategy's own provenance (copy number, cell edge, host, ...)."""

    atoms: Atoms
    center: int | None
    details: dict = field(default_factory=dict)
    pristine_host: bool = False
