"""The labeller contract.

A labeller wraps whatever produces reference data (an ASE calculator, a DFT code run in a scratch
directory) behind one call, :meth:`Labeller.label`, which either returns a :class:`Label` or raises
:class:`LabelFailure` carrying a :class:`FailureClass`. The store records either outcome; a failure is
an event in the store, never a crash of the campaign.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from ase import Atoms


class FailureClass(str, Enum):
    """Why a label could not be produced; retry policy is decided per class."""

    CRASH = "crash"  # exception or non-zero exit
    TIMEOUT = "timeout"
    SCF_NOT_CONVERGED = "scf_not_converged"  # detected from the code's own output
    NON_FINITE = "non_finite"  # NaN/inf in energy, forces or stress
    IMPLAUSIBLE = "implausible"  # finite but beyond configured bounds (e.g. |F| too large)
    NO_LABEL = "no_label"  # the labeller has no label for this structure (lookup: not in its files)


class LabelFailure(Exception):
    """Raised by :meth:`Labeller.label` when no trustworthy label could be produced."""

    def __init__(
        self,
        failure_class: FailureClass,
        message: str,
        output_tail: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.failure_class = FailureClass(failure_class)
        self.message = message
        self.output_tail = output_tail
        #: Provenance of the failed attempt (code, version, params hash, wall time, host, kept
        #: scratch directory) so a failure is as traceable in the store as a label.
        self.metadata: dict[str, Any] = dict(metadata or {})


@dataclass
class Label:
    """A reference label in eV, eV/Å and eV/Å³ (stress as the 3×3 tensor, or None)."""

    energy: float
    forces: np.ndarray
    stress: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def params_hash(params: dict[str, Any]) -> str:
    """A stable short hash of JSON-serialisable calculator parameters (provenance, not security)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def provenance_metadata(provenance: dict[str, Any], wall_time: float) -> dict[str, Any]:
    """What every stored label (and failure) carries: code, version, params hash, wall time, host.

    The host matters because the same input can give different timings, and occasionally different
    numbers, on different machines or builds; it is how a suspicious label is traced to where it ran.
    """
    return {
        "code": provenance.get("code", ""),
        "version": provenance.get("version", ""),
        "params_hash": provenance.get("params_hash", ""),
        "wall_time": float(wall_time),
        "host": socket.gethostname(),
        **{k: v for k, v in provenance.items() if k not in {"code", "version", "params_hash"}},
    }


def check_label(label: Label, n_atoms: int, max_force: float | None = None) -> Label:
    """Classify non-finite or implausible results as failures instead of storing them."""
    forces = np.asarray(label.forces, dtype=float)
    if forces.shape != (n_atoms, 3):
        raise LabelFailure(
            FailureClass.CRASH, f"forces have shape {forces.shape}, expected ({n_atoms}, 3)"
        )
    arrays = [np.atleast_1d(label.energy), forces]
    if label.stress is not None:
        arrays.append(np.asarray(label.stress, dtype=float))
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise LabelFailure(FailureClass.NON_FINITE, "energy, forces or stress is not finite")
    if max_force is not None and n_atoms:
        fmax = float(np.linalg.norm(forces, axis=1).max())
        if fmax > max_force:
            raise LabelFailure(
                FailureClass.IMPLAUSIBLE,
                f"max |F| = {fmax:.3g} eV/Å exceeds the configured bound {max_force:g} eV/Å",
            )
    return label


class Labeller:
    """Base class: subclasses set ``name`` and implement :meth:`label`."""

    name: str = ""

    def label(self, atoms: Atoms) -> Label:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """Code name, version and a hash of the input parameters, stored with every label."""
        return {"code": self.name, "version": "", "params_hash": ""}
