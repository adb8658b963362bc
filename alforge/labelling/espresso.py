"""Quantum ESPRESSO (``pw.x``) single points through ASE's own Espresso calculator.

ASE writes the input and parses the output; this module only replaces how ``pw.x`` is *run* (a
per-job scratch directory, a time limit that kills the whole process group, an MPI launcher prefix)
and decides what a run means: SCF non-convergence is read from pw.x's own output ("convergence NOT
achieved"), never inferred from a missing number.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import kpts2sizeandoffsets
from ase.calculators.espresso import Espresso, EspressoProfile

from alforge.labelling.base import FailureClass, LabelFailure
from alforge.labelling.runner import ScratchLabeller

#: Where Debian's quantum-espresso-data puts its pseudopotentials; ``$ESPRESSO_PSEUDO`` overrides.
DEFAULT_PSEUDO_DIR = "/usr/share/espresso/pseudo"
# Functional tags that are *not* plain PBE, so a PBE pick never silently takes one of them.
_NOT_PBE = re.compile(r"pbesol|rel-|\.pz|\.blyp|\.tpss|\.lda", re.IGNORECASE)


def default_pseudo_dir() -> str:
    return os.environ.get("ESPRESSO_PSEUDO", DEFAULT_PSEUDO_DIR)


def pick_pbe_pseudopotential(element: str, pseudo_dir: str | os.PathLike[str]) -> str:
    """Choose a PBE UPF file for ``element`` from ``pseudo_dir``, deterministically.

    Candidates are ``<El>.*pbe*.upf`` (case-insensitive suffix, exact element prefix, so ``C`` never
    matches ``Co``/``Cu``), excluding PBEsol and fully-relativistic sets; the shortest name wins
    (usually the plain set, e.g. ``Si.pbe-rrkj.UPF`` over ``Si.pbe-nl-rrkjus_psl.1.0.0.UPF``), ties
    alphabetically. This is a convenience for tests and quick starts: production campaigns should
    pass ``pseudopotentials`` explicitly, and the choice is recorded in the params hash either way.
    """
    directory = Path(pseudo_dir)
    prefix = re.compile(rf"^{re.escape(element)}[._-]")
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        raise ValueError(f"espresso labeller: cannot list pseudo_dir {str(directory)!r}: {exc}") from None
    candidates = [
        n for n in names
        if prefix.match(n) and n.lower().endswith(".upf") and "pbe" in n.lower() and not _NOT_PBE.search(n)
    ]
    if not candidates:
        raise LabelFailure(
            FailureClass.CRASH,
            f"espresso labeller: no PBE pseudopotential for element {element!r} in {str(directory)!r}; "
            f"pass pseudopotentials={{{element!r}: 'FILE.UPF'}}",
        )
    return min(candidates, key=lambda n: (len(n), n))


class _ScratchProfile(EspressoProfile):
    """An EspressoProfile whose ``run`` goes through the labeller (time limit, launcher, env)."""

    def __init__(self, labeller: EspressoLabeller, pseudo_dir: str) -> None:
        super().__init__(command=" ".join(labeller.command), pseudo_dir=pseudo_dir)
        self._labeller = labeller

    def run(self, directory: Path, inputfile: str | None, outputfile: str,
            errorfile: str | None = None, append: bool = False) -> None:
        status = self._labeller._run(
            [*self._labeller.command, *self.get_calculator_command(inputfile)],
            Path(directory), outputfile, errorfile or "espresso.err",
        )
        if status != 0:
            raise RuntimeError(f"pw.x exited with status {status}")


class EspressoLabeller(ScratchLabeller):
    """Label a periodic structure with ``pw.x`` (energy, forces and stress)."""

    name = "espresso"
    output_names = ("espresso.pwo", "espresso.err")
    not_converged = re.compile(r"convergence NOT achieved")
    version_re = re.compile(r"Program PWSCF\s+v\.(\S+)")

    def __init__(
        self,
        input_data: Mapping[str, Any] | None = None,
        *,
        pseudopotentials: Mapping[str, str] | None = None,
        pseudo_dir: str | os.PathLike[str] | None = None,
        kspacing: float | None = None,
        kptdensity: float | None = None,
        kpts: Sequence[int] | None = None,
        koffset: Sequence[int] = (0, 0, 0),
        command: Sequence[str] = ("pw.x",),
        **common: Any,
    ) -> None:
        """
        input_data: pw.x namelists, flat or nested (``{"system": {"ecutwfc": 30}}``), passed to ASE
            verbatim. ``system.ecutwfc`` is required: there is no safe default cutoff. ``tprnfor`` and
            ``tstress`` are forced on (a label needs forces and stress), ``outdir`` defaults to the
            scratch directory.
        pseudopotentials: ``{element: UPF file name}``; elements not given are picked by
            :func:`pick_pbe_pseudopotential`.
        kspacing: minimum k-point spacing in Å⁻¹ (ASE's definition; grid = ⌊|b_i|/kspacing⌋+1).
        kptdensity: k-points per Å⁻¹ (ASE's ``kpts={"density": ...}``, even grids).
        kpts: an explicit Monkhorst-Pack grid; with none of the three, Γ only.
        command: pw.x as an argument list (an MPI launcher goes in ``mpi_launcher``).
        common: ``timeout``, ``cores``, ``mpi_launcher``, ``env``, ``scratch_root``, ``keep_failed``,
            ``max_force`` (see :class:`~alforge.labelling.runner.ScratchLabeller`).
        """
        super().__init__(**common)
        if sum(x is not None for x in (kspacing, kptdensity, kpts)) > 1:
            raise ValueError("espresso labeller: give at most one of kspacing, kptdensity, kpts")
        self.input_data = _nested_input(input_data)
        if "ecutwfc" not in self.input_data["system"]:
            raise ValueError("espresso labeller: input_data['system']['ecutwfc'] is required (Ry)")
        self.pseudopotentials = dict(pseudopotentials or {})
        self.pseudo_dir = str(pseudo_dir) if pseudo_dir is not None else default_pseudo_dir()
        self.kspacing = kspacing
        self.kptdensity = kptdensity
        self.kpts = list(kpts) if kpts is not None else None
        self.koffset = list(koffset)
        self.command = [str(c) for c in command]
        if not self.command:
            raise ValueError("espresso labeller: command must name the pw.x executable")

    def _params(self) -> dict[str, Any]:
        return {
            "input_data": self.input_data, "pseudopotentials": self.pseudopotentials,
            "kspacing": self.kspacing, "kptdensity": self.kptdensity, "kpts": self.kpts,
            "koffset": self.koffset,
        }

    def _error_summary(self, output: str) -> str:
        """pw.x's ``Error in routine NAME (CODE): message`` block, as one line."""
        match = re.search(r"Error in routine\s+(\S+)\s+\((-?\d+)\):\s*\n\s*(.+)", output)
        return f"pw.x error in routine {match[1]} ({match[2]}): {match[3].strip()}" if match else ""

    def pseudopotentials_for(self, atoms: Atoms) -> dict[str, str]:
        """The UPF file used for each element of ``atoms`` (given, else auto-picked)."""
        return {
            el: self.pseudopotentials.get(el) or pick_pbe_pseudopotential(el, self.pseudo_dir)
            for el in sorted(set(atoms.get_chemical_symbols()))
        }

    def _compute(self, atoms: Atoms, workdir: Path) -> tuple[float, np.ndarray, np.ndarray | None]:
        if not atoms.pbc.any() or atoms.cell.rank < 3:
            raise LabelFailure(
                FailureClass.CRASH,
                f"espresso labeller: structure {atoms.get_chemical_formula()} has no 3-D cell "
                f"(pbc={atoms.pbc.tolist()}); pw.x needs one",
            )
        input_data = copy.deepcopy(self.input_data)
        input_data["control"].update(tprnfor=True, tstress=True)
        input_data["control"].setdefault("outdir", ".")
        kwargs: dict[str, Any] = {}
        if self.kspacing is not None:
            kwargs["kspacing"] = self.kspacing
        elif self.kptdensity is not None:
            # Resolved here: ASE 3.29's espresso-in writer mistakes the density dict's grid (an
            # ndarray) for an explicit k-point list.
            size, shift = kpts2sizeandoffsets(density=self.kptdensity, even=True, atoms=atoms)
            kwargs["kpts"] = tuple(int(n) for n in size)
            kwargs["koffset"] = tuple(0 if x == 0 else 1 for x in shift)
        elif self.kpts is not None:
            kwargs["kpts"] = tuple(self.kpts)
            kwargs["koffset"] = tuple(self.koffset)
        calc = Espresso(
            profile=_ScratchProfile(self, self.pseudo_dir), directory=str(workdir),
            input_data=input_data, pseudopotentials=self.pseudopotentials_for(atoms), **kwargs,
        )
        work = atoms.copy()
        work.calc = calc
        energy = work.get_potential_energy()
        forces = work.get_forces()
        stress = work.get_stress(voigt=False)
        return energy, forces, stress


def _nested_input(input_data: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Normalise flat or nested pw.x input into ``{namelist: {key: value}}`` with lower-case names.

    Uses ASE's own Namelist so a flat ``{"ecutwfc": 20}`` lands in ``system`` exactly as ASE would
    put it; that keeps the params hash identical for equivalent flat and nested spellings.
    """
    from ase.io.espresso import Namelist

    namelist = Namelist(copy.deepcopy(dict(input_data or {})))
    namelist.to_nested("pw")
    return {str(section).lower(): {str(k).lower(): v for k, v in dict(values).items()}
            for section, values in namelist.items()}
