"""CP2K single points through ASE's CP2K calculator (``cp2k_shell``), one shell per job.

ASE drives CP2K's interactive shell over pipes; this module gives every job its own scratch
directory and shell process (so a crashed or killed CP2K never poisons the next structure), enforces
the time limit by killing the shell's process group from a watchdog thread, and reads SCF
non-convergence from CP2K's own output ("SCF run NOT converged"), which CP2K 2023 only warns about.

ASE starts the shell through ``/bin/sh`` (its ``Cp2kShell`` uses ``shell=True``); the command string
handed to it here is built with :func:`shlex.join` from an argument list and ``exec``s the
supervisor of :mod:`alforge.lifetime`, so no user text is ever interpreted by the shell, and the code
runs in a process group (led by the supervisor, in a session of its own) that dies with the campaign.
"""

from __future__ import annotations

import re
import shlex
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.cp2k import CP2K, parse_input
from ase.units import Rydberg

from alforge import lifetime
from alforge.labelling.base import FailureClass, LabelFailure
from alforge.labelling.runner import ProcessTimeout, ScratchLabeller, kill_process_group

#: Keywords the ASE calculator writes itself (from kwargs); repeating them in ``inp`` would make ASE
#: raise on the first structure, so the constructor refuses them instead.
_ASE_OWNED = (
    ("GLOBAL", "PROJECT"), ("GLOBAL", "PRINT_LEVEL"), ("FORCE_EVAL", "METHOD"), ("FORCE_EVAL", "STRESS_TENSOR"),
    ("FORCE_EVAL/DFT", "BASIS_SET_FILE_NAME"), ("FORCE_EVAL/DFT", "POTENTIAL_FILE_NAME"),
    ("FORCE_EVAL/DFT", "CHARGE"), ("FORCE_EVAL/DFT", "MULTIPLICITY"), ("FORCE_EVAL/DFT", "UNRESTRICTED_KOHN_SHAM"),
    ("FORCE_EVAL/DFT/MGRID", "CUTOFF"), ("FORCE_EVAL/DFT/SCF", "MAX_SCF"), ("FORCE_EVAL/DFT/LS_SCF", "MAX_SCF"),
)


class CP2KLabeller(ScratchLabeller):
    """Label a structure with CP2K/Quickstep (GPW DFT): energy, forces and, if periodic, stress.

    The defaults (diagonalisation, Broyden mixing, Fermi-Dirac smearing at 300 K, added MOs) are
    chosen to converge for metals and small-gap cells alike; OT, the usual choice for large
    insulators, fails on small Γ-only cells such as Si8 (it was seen to stall at 50 steps here).
    """

    name = "cp2k"
    output_names = ("cp2k.out",)
    not_converged = re.compile(r"SCF run NOT converged")
    version_re = re.compile(r"CP2K\| version string:\s+CP2K version\s+(\S+)")

    def __init__(
        self,
        *,
        xc: str = "PBE",
        basis_set: str = "DZVP-MOLOPT-SR-GTH",
        basis_set_file: str = "BASIS_MOLOPT",
        pseudo_potential: str = "GTH-PBE",
        potential_file: str = "GTH_POTENTIALS",
        cutoff_ry: float = 400.0,
        max_scf: int = 50,
        eps_scf: float = 1e-6,
        mixing_alpha: float = 0.4,
        smearing_temperature: float | None = 300.0,
        added_mos: int | None = None,
        charge: int = 0,
        uks: bool = False,
        multiplicity: int | None = None,
        inp: str = "",
        command: Sequence[str] = ("cp2k_shell",),
        **common: Any,
    ) -> None:
        """
        xc, basis_set, basis_set_file, pseudo_potential, potential_file: as in ASE's CP2K; files are
            found by name in CP2K's data directory.
        cutoff_ry: finest-grid plane-wave cutoff (Ry). max_scf: SCF steps. eps_scf: SCF threshold.
        mixing_alpha: Broyden mixing parameter (a retry lowers it).
        smearing_temperature: Fermi-Dirac electronic temperature (K); None for an integer-occupation
            run (then no added MOs).
        added_mos: extra orbitals for smearing; default max(10, number of atoms).
        inp: a CP2K input fragment merged under the generated one (e.g. ``&KPOINTS``); keys it sets
            win over the SCF defaults above; keys generated from kwargs (MAX_SCF, CUTOFF, CHARGE,
            file names, ...) are refused in it.
        command: cp2k_shell as an argument list (an MPI launcher goes in ``mpi_launcher``).
        common: ``timeout``, ``cores``, ``mpi_launcher``, ``scratch_root``, ``keep_failed``,
            ``max_force``. ``env`` is not supported: ASE starts the shell with this process's
            environment.
        """
        if common.get("env"):
            raise ValueError("cp2k labeller: env additions are not supported (ASE's shell inherits os.environ)")
        super().__init__(**common)
        root = parse_input(inp)
        for path, key in _ASE_OWNED:
            if _has_keyword(root, path, key):
                raise ValueError(f"cp2k labeller: inp sets {path}/{key}, which is generated from the kwargs")
        self.xc = xc
        self.basis_set = basis_set
        self.basis_set_file = basis_set_file
        self.pseudo_potential = pseudo_potential
        self.potential_file = potential_file
        self.cutoff_ry = float(cutoff_ry)
        self.max_scf = int(max_scf)
        self.eps_scf = float(eps_scf)
        self.mixing_alpha = float(mixing_alpha)
        self.smearing_temperature = smearing_temperature
        self.added_mos = added_mos
        self.charge = int(charge)
        self.uks = bool(uks)
        self.multiplicity = multiplicity
        self.inp = inp
        self.command = [str(c) for c in command]
        if not self.command:
            raise ValueError("cp2k labeller: command must name the cp2k_shell executable")

    def _params(self) -> dict[str, Any]:
        return {
            "xc": self.xc, "basis_set": self.basis_set, "basis_set_file": self.basis_set_file,
            "pseudo_potential": self.pseudo_potential, "potential_file": self.potential_file,
            "cutoff_ry": self.cutoff_ry, "max_scf": self.max_scf, "eps_scf": self.eps_scf,
            "mixing_alpha": self.mixing_alpha, "smearing_temperature": self.smearing_temperature,
            "added_mos": self.added_mos, "charge": self.charge, "uks": self.uks,
            "multiplicity": self.multiplicity, "inp": self.inp,
        }

    def _error_summary(self, output: str) -> str:
        """The text of CP2K's ``[ABORT]`` box (e.g. a basis set missing for an element), as one line.

        The box is framed by lines of asterisks, with ASCII art in the first ten columns inside it.
        """
        lines = output.splitlines()
        abort = next((i for i, line in enumerate(lines) if "[ABORT]" in line), None)
        if abort is None:
            return ""
        frame = [i for i, line in enumerate(lines) if line.strip().startswith("*****")]
        top = max((i for i in frame if i < abort), default=abort - 1)
        bottom = min((i for i in frame if i > abort), default=len(lines))
        text = (line.strip()[1:-1][10:].strip() for line in lines[top + 1:bottom])
        return "CP2K aborted: " + " ".join(t for t in text if t)

    def input_template(self, atoms: Atoms) -> str:
        """The ``inp`` handed to ASE: the user's fragment plus defaults for keys it leaves unset."""
        root = parse_input(self.inp)
        scf = "FORCE_EVAL/DFT/SCF"
        _default(root, scf, "EPS_SCF", f"{self.eps_scf:.3E}")
        _default(root, f"{scf}/MIXING", "METHOD", "BROYDEN_MIXING")
        _default(root, f"{scf}/MIXING", "ALPHA", f"{self.mixing_alpha:g}")
        if self.smearing_temperature is not None:
            n_added = self.added_mos if self.added_mos is not None else max(10, len(atoms))
            _default(root, scf, "ADDED_MOS", str(n_added))
            _default(root, f"{scf}/SMEAR", "_SECTION_PARAMETERS_", "ON")
            _default(root, f"{scf}/SMEAR", "METHOD", "FERMI_DIRAC")
            _default(root, f"{scf}/SMEAR", "ELECTRONIC_TEMPERATURE", f"[K] {self.smearing_temperature:g}")
        return "\n".join(root.write())

    def _compute(self, atoms: Atoms, workdir: Path) -> tuple[float, np.ndarray, np.ndarray | None]:
        for exe in (self._launcher or self.command)[:1]:
            if shutil.which(exe) is None:
                raise LabelFailure(FailureClass.CRASH, f"cp2k labeller: executable {exe!r} not found on PATH")
        # The supervisor leads the shell's process group (a session of its own) and kills it if this
        # process dies; ASE starts it, so it is tracked once started, and a stop that came during the
        # start-up is noticed right after.
        argv = ["env", "-C", str(workdir), f"OMP_NUM_THREADS={self.cores}", *self._launcher, *self.command]
        periodic = bool(atoms.pbc.any())
        lifetime.check_running()
        calc = CP2K(
            # A relative label: CP2K runs in workdir, and its PROJECT name must fit in 80 characters.
            command="exec " + shlex.join(lifetime.supervised(argv)), label="cp2k",
            xc=self.xc, basis_set=self.basis_set, basis_set_file=self.basis_set_file,
            pseudo_potential=self.pseudo_potential, potential_file=self.potential_file,
            cutoff=self.cutoff_ry * Rydberg, max_scf=self.max_scf, charge=self.charge, uks=self.uks,
            multiplicity=self.multiplicity, stress_tensor=periodic, inp=self.input_template(atoms),
        )
        timed_out = threading.Event()

        def _expire() -> None:
            timed_out.set()
            kill_process_group(calc._shell._child)

        watchdog = threading.Timer(self.timeout, _expire) if self.timeout is not None else None
        work = atoms.copy()
        work.calc = calc
        try:
            lifetime.track(calc._shell._child)
            lifetime.check_running()
            if watchdog is not None:
                watchdog.start()
            energy = work.get_potential_energy()
            forces = work.get_forces()
            stress = work.get_stress(voigt=False) if periodic else None
        except Exception:
            lifetime.check_running()  # killed because the campaign is stopping: not a crash
            if timed_out.is_set():
                raise ProcessTimeout(f"cp2k_shell exceeded the {self.timeout:g} s time limit") from None
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            _close(calc)
        return energy, forces, stress


def _close(calc: CP2K) -> None:
    """Shut the shell down: politely if it is waiting for a command, else kill its process group.

    After a crash, a kill or an exception mid-protocol ASE's EXIT handshake would fail or hang.
    """
    shell = calc._shell
    if shell is None:
        return
    lifetime.untrack(shell._child)
    if shell.isready and shell._child.poll() is None:
        calc.close()
        return
    kill_process_group(shell._child)
    shell.isready = False
    shell._child = None
    calc._shell = None


def _has_keyword(root: Any, path: str, key: str) -> bool:
    section = root
    for name in path.split("/"):
        matches = [s for s in section.subsections if s.name == name]
        if not matches:
            return False
        section = matches[0]
    return any(k.split()[0].upper() == key for k in section.keywords)


def _default(root: Any, path: str, key: str, value: str) -> None:
    """Set ``key`` in section ``path`` unless the user's fragment already did."""
    section = root.get_subsection(path)
    if key == "_SECTION_PARAMETERS_":
        if section.params is None:
            section.params = value
        return
    if not any(k.split()[0].upper() == key for k in section.keywords):
        section.keywords.append(f"{key} {value}")
