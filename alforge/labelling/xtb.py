"""GFN-xTB single points with the ``xtb`` program, for molecules.

ASE ships no xtb calculator, so xtb runs as a subprocess (``xtb struct.xyz --gfn 2 --grad``) in a
scratch directory; the Turbomole-format ``gradient`` file it writes is parsed with ASE's own reader
(Hartree/Bohr → eV/Å). xtb stops with "SCC iterator did not converge" when it runs out of
iterations; that message, not the exit status alone, is what classifies a non-converged run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write
from ase.io.turbomole import read_turbomole_gradient

from alforge.labelling.base import FailureClass, LabelFailure
from alforge.labelling.runner import ScratchLabeller


class XTBLabeller(ScratchLabeller):
    """Label a non-periodic structure with GFN-xTB: energy and forces (no stress)."""

    name = "xtb"
    output_names = ("xtb.out", "xtb.err")
    not_converged = re.compile(r"did not converge|convergence criteria cannot be satisfied")
    version_re = re.compile(r"xtb version\s+(\S+)")

    def __init__(
        self,
        *,
        gfn: int = 2,
        charge: int = 0,
        uhf: int = 0,
        accuracy: float = 1.0,
        electronic_temperature: float = 300.0,
        iterations: int = 250,
        command: Sequence[str] = ("xtb",),
        **common: Any,
    ) -> None:
        """
        gfn: parametrisation (0, 1 or 2). charge: molecular charge. uhf: number of unpaired electrons.
        accuracy: xtb's ``--acc`` (lower is tighter). electronic_temperature: ``--etemp`` (K).
        iterations: SCC iteration limit (``--iterations``; a retry raises it).
        command: xtb as an argument list.
        common: ``timeout``, ``cores``, ``mpi_launcher``, ``env``, ``scratch_root``, ``keep_failed``,
            ``max_force``.
        """
        super().__init__(**common)
        if gfn not in (0, 1, 2):
            raise ValueError(f"xtb labeller: gfn must be 0, 1 or 2, got {gfn!r}")
        self.gfn = int(gfn)
        self.charge = int(charge)
        self.uhf = int(uhf)
        self.accuracy = float(accuracy)
        self.electronic_temperature = float(electronic_temperature)
        self.iterations = int(iterations)
        self.command = [str(c) for c in command]
        if not self.command:
            raise ValueError("xtb labeller: command must name the xtb executable")

    def _params(self) -> dict[str, Any]:
        return {
            "gfn": self.gfn, "charge": self.charge, "uhf": self.uhf, "accuracy": self.accuracy,
            "electronic_temperature": self.electronic_temperature, "iterations": self.iterations,
        }

    def _compute(self, atoms: Atoms, workdir: Path) -> tuple[float, np.ndarray, np.ndarray | None]:
        if atoms.pbc.any():
            raise LabelFailure(
                FailureClass.CRASH,
                f"xtb labeller: structure {atoms.get_chemical_formula()} is periodic (pbc={atoms.pbc.tolist()}); "
                "this labeller handles molecules only",
            )
        write(workdir / "struct.xyz", atoms, format="xyz")
        argv = [
            *self.command, "struct.xyz", "--gfn", str(self.gfn), "--grad",
            "--chrg", str(self.charge), "--uhf", str(self.uhf), "--acc", f"{self.accuracy:g}",
            "--etemp", f"{self.electronic_temperature:g}", "--iterations", str(self.iterations),
        ]
        status = self._run(argv, workdir, "xtb.out", "xtb.err")
        if status != 0:
            raise RuntimeError(f"xtb exited with status {status}")
        with open(workdir / "gradient") as fd:
            result = read_turbomole_gradient(fd)
        if len(result) != len(atoms):
            raise RuntimeError(f"xtb gradient file has {len(result)} atoms, structure has {len(atoms)}")
        return result.get_potential_energy(), result.get_forces(), None

    def _error_summary(self, output: str) -> str:
        """xtb's numbered error lines after "[ERROR] Program stopped", joined."""
        return "; ".join(m.strip() for m in re.findall(r"^-\d+- (.+)$", output, re.MULTILINE))
