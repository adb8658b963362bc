"""PySCF (HF or Kohn-Sham DFT with Gaussian basis sets) for molecules: an ASE calculator and a labeller.

PySCF runs in-process, so there is no executable to find and no scratch input to write; the scratch
directory only holds PySCF's log, whose tail explains a failure. An unconverged SCF is read from
PySCF itself (``mf.converged``) and raised as ASE's :class:`~ase.calculators.calculator.SCFError`,
which the labeller classifies as ``SCF_NOT_CONVERGED``. PySCF cannot be interrupted from outside,
so this labeller has no ``timeout``; bound it at the task level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, SCFError, all_changes
from ase.units import Bohr, Hartree

from alforge.labelling.base import FailureClass, LabelFailure
from alforge.labelling.runner import ScratchLabeller

#: Methods run as Hartree-Fock; anything else is handed to PySCF as an XC functional name.
_HF = {"HF", "RHF", "UHF"}


class PySCFCalculator(Calculator):
    """Energy and analytic forces from PySCF for a non-periodic structure.

    method: ``"HF"`` or an XC functional PySCF knows (``"PBE"``, ``"B3LYP"``, ...). basis: a basis
    set name bundled with PySCF (``"def2-SVP"``). charge, spin: total charge and 2S. max_cycle,
    conv_tol: SCF limits (conv_tol in Hartree). newton: use second-order SCF (robust, slower per
    step). grid_level: DFT integration grid (0–9). log_path: where PySCF writes its log (verbose 4);
    None discards it. Raises SCFError when the SCF did not converge.
    """

    implemented_properties = ["energy", "free_energy", "forces"]  # noqa: RUF012 (ASE's protocol)
    default_parameters: dict[str, Any] = {  # noqa: RUF012 (ASE's protocol: copied per instance)
        "method": "PBE", "basis": "def2-SVP", "charge": 0, "spin": 0, "max_cycle": 50,
        "conv_tol": 1e-9, "newton": False, "grid_level": 3, "log_path": None,
    }

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        from pyscf import dft, gto, scf

        super().calculate(atoms, properties or ["energy"], system_changes)
        assert self.atoms is not None
        if self.atoms.pbc.any():
            raise ValueError(
                f"PySCFCalculator: structure {self.atoms.get_chemical_formula()} is periodic "
                f"(pbc={self.atoms.pbc.tolist()}); only molecules are supported"
            )
        p = self.parameters
        log_path = p["log_path"]
        mol = gto.M(
            atom=[(s, tuple(x)) for s, x in zip(self.atoms.get_chemical_symbols(), self.atoms.positions, strict=True)],
            unit="Angstrom", basis=p["basis"], charge=p["charge"], spin=p["spin"], verbose=0,
        )
        # The log file is opened here rather than via ``output=`` so PySCF does not announce it on
        # stdout, and so it is closed even when the SCF raises.
        with open(log_path or os.devnull, "w") as log:
            mol.stdout = log
            mol.verbose = 4 if log_path else 0
            method = str(p["method"])
            restricted = p["spin"] == 0
            if method.upper() in _HF:
                mf = scf.RHF(mol) if restricted else scf.UHF(mol)
            else:
                mf = dft.RKS(mol) if restricted else dft.UKS(mol)
                mf.xc = method
                mf.grids.level = p["grid_level"]
            mf.max_cycle = p["max_cycle"]
            mf.conv_tol = p["conv_tol"]
            if p["newton"]:
                mf = mf.newton()
            energy = mf.kernel()
            if not mf.converged:
                raise SCFError(f"PySCF {method}/{p['basis']} SCF not converged in {p['max_cycle']} cycles")
            gradient = mf.nuc_grad_method().kernel()
        self.results["energy"] = self.results["free_energy"] = float(energy) * Hartree
        self.results["forces"] = -np.asarray(gradient) * Hartree / Bohr


class PySCFLabeller(ScratchLabeller):
    """Label a molecule with :class:`PySCFCalculator` (energy and forces)."""

    name = "pyscf"
    output_names = ("pyscf.log",)

    def __init__(
        self,
        *,
        method: str = "PBE",
        basis: str = "def2-SVP",
        charge: int = 0,
        spin: int = 0,
        max_cycle: int = 50,
        conv_tol: float = 1e-9,
        newton: bool = False,
        grid_level: int = 3,
        cores: int = 1,
        **common: Any,
    ) -> None:
        """
        method, basis, charge, spin, max_cycle, conv_tol, newton, grid_level: see
            :class:`PySCFCalculator` (a retry raises max_cycle and switches newton on).
        cores: PySCF's thread count (``pyscf.lib.num_threads``) for the duration of a label.
        common: ``scratch_root``, ``keep_failed``, ``max_force``.
        """
        for unsupported in ("timeout", "mpi_launcher", "env"):
            if common.get(unsupported):
                raise ValueError(f"pyscf labeller: {unsupported} is not supported (PySCF runs in-process)")
        super().__init__(cores=cores, **common)
        self.calc_params = {
            "method": method, "basis": basis, "charge": int(charge), "spin": int(spin),
            "max_cycle": int(max_cycle), "conv_tol": float(conv_tol), "newton": bool(newton),
            "grid_level": int(grid_level),
        }
        import pyscf

        self.last_version = pyscf.__version__

    def _params(self) -> dict[str, Any]:
        return dict(self.calc_params)

    def _compute(self, atoms: Atoms, workdir: Path) -> tuple[float, np.ndarray, np.ndarray | None]:
        from pyscf import lib

        previous = lib.num_threads()
        lib.num_threads(self.cores)
        try:
            work = atoms.copy()
            work.calc = PySCFCalculator(**self.calc_params, log_path=workdir / "pyscf.log")
            try:
                return work.get_potential_energy(), work.get_forces(), None
            except SCFError as exc:
                raise LabelFailure(FailureClass.SCF_NOT_CONVERGED, f"pyscf: {exc}") from None
        finally:
            lib.num_threads(previous)
