"""The generic adapter for any code that reads an input file and writes an output file.

Describe the code once, in kwargs a campaign file can hold, and every structure is run the same way
in its own scratch directory:

**Input** — exactly one of

* ``input_format`` + ``input_kwargs``: any format ASE can write (``"espresso-in"``, ``"vasp"``,
  ``"lammps-data"``, ...), called as ``ase.io.write(input_file, atoms, format=..., **input_kwargs)``;
* ``input_template``: a text file whose placeholders are filled from the structure:

  ==================== ===================================================================
  ``{natoms}``         number of atoms
  ``{ntypes}``         number of distinct elements
  ``{elements}``       distinct element symbols, first-appearance order, space-separated
  ``{species}``        one element symbol per line, in atom order
  ``{positions}``      ``x y z`` per line, Cartesian Å
  ``{scaled_positions}`` ``a b c`` per line, fractional
  ``{species_positions}`` ``Sym x y z`` per line, Cartesian Å
  ``{cell}``           three lines ``ax ay az`` (Å), the lattice vectors as rows
  ``{pbc}``            ``T``/``F`` for each axis, space-separated
  ``{NAME}``           any key of ``template_values`` (e.g. a pseudopotential directory)
  ==================== ===================================================================

  Numbers are written with 10 decimals. Only ``{identifier}`` is a placeholder; an unknown one is an
  error naming the template and the placeholder, caught when the labeller is built. Write ``{{`` and
  ``}}`` for literal braces around an identifier.

**Command** — an argument list, never a shell string. Placeholders are allowed only as whole
arguments: ``{input}`` (the input file name), ``{output}`` (``output_file``), ``{workdir}`` (the
scratch directory) and ``{cores}``. ``stdin=True`` feeds the input file on standard input. Standard
output is captured to ``stdout_file``, standard error to ``stderr``.

**Output** — ``output_format`` is an ASE format name (``"espresso-out"``, ``"vasp-out"``,
``"extxyz"``; the last image is read and must carry energy and forces) or a ``module:function``
called as ``function(output_path, atoms)`` that returns ``(energy, forces, stress_or_None)`` in eV,
eV/Å and eV/Å³ (stress as 3×3 or Voigt 6).

**Running** — ``timeout`` (s; the whole process group is killed), ``cores`` (``OMP_NUM_THREADS`` and
``{cores}``), ``mpi_launcher`` (e.g. ``["mpirun", "-np", "{cores}"]``), ``env`` additions whose
values may be ``"$env:NAME"`` references resolved on the host at run time (treated as secrets:
never stored, scrubbed from tails), ``not_converged_pattern`` (a regex searched in the output files;
a match makes the attempt ``SCF_NOT_CONVERGED`` even if numbers were written), ``scratch_root`` and
``keep_failed``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write
from ase.io.formats import ioformats
from ase.stress import voigt_6_to_full_3x3_stress

from alforge.labelling.runner import ScratchLabeller

Reader = Callable[[Path, Atoms], tuple[float, Any, Any]]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}")
_STRUCTURE_FIELDS = (
    "natoms", "ntypes", "elements", "species", "positions", "scaled_positions", "species_positions",
    "cell", "pbc",
)
_COMMAND_FIELDS = ("input", "output", "workdir", "cores")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _safe_name(value: str) -> bool:
    """A plain name inside the scratch directory: no separators, not absolute, not ``.`` or ``..``
    (``..`` as an output file would read, and as an input file write, outside the job's directory)."""
    return bool(_SAFE_NAME.match(value)) and value not in (".", "..")


def _rows(values: np.ndarray, prefix: Sequence[str] | None = None) -> str:
    lines = []
    for i, row in enumerate(np.asarray(values, dtype=float)):
        numbers = " ".join(f"{x:.10f}" for x in row)
        lines.append(f"{prefix[i]} {numbers}" if prefix is not None else numbers)
    return "\n".join(lines)


def structure_fields(atoms: Atoms) -> dict[str, str]:
    """The values of the structure placeholders for ``atoms`` (see the module docstring)."""
    symbols = atoms.get_chemical_symbols()
    elements = list(dict.fromkeys(symbols))
    return {
        "natoms": str(len(atoms)),
        "ntypes": str(len(elements)),
        "elements": " ".join(elements),
        "species": "\n".join(symbols),
        "positions": _rows(atoms.positions),
        "scaled_positions": _rows(atoms.get_scaled_positions(wrap=False)),
        "species_positions": _rows(atoms.positions, symbols),
        "cell": _rows(atoms.cell[:]),
        "pbc": " ".join("T" if p else "F" for p in atoms.pbc),
    }


def fill_template(template: str, values: Mapping[str, str], source: str) -> str:
    """Replace ``{name}`` placeholders; ``{{``/``}}`` become braces; unknown names raise, naming ``source``."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in values:
            raise ValueError(
                f"template {source}: unknown placeholder {{{name}}}; known: {', '.join(sorted(values))}"
            )
        return values[name]

    return _PLACEHOLDER.sub(substitute, template)


def _check_command_arg(arg: str, name: str) -> None:
    """A placeholder must be a whole argument and a known one; other braces are literal text."""
    whole = re.fullmatch(r"\{(\w+)\}", arg)
    if whole and whole.group(1) not in _COMMAND_FIELDS:
        raise ValueError(
            f"{name} labeller: command argument {arg!r} is an unknown placeholder; known: "
            + ", ".join(f"{{{f}}}" for f in _COMMAND_FIELDS)
        )
    if not whole and any(f"{{{f}}}" in arg for f in _COMMAND_FIELDS):
        raise ValueError(
            f"{name} labeller: command argument {arg!r}: placeholders are allowed only as whole arguments"
        )


def _resolve_reader(spec: str) -> Reader | str:
    """An ASE format name (returned as is) or a ``module:function`` (imported now, to fail early)."""
    if ":" not in spec:
        if spec not in ioformats:
            raise ValueError(
                f"external labeller: output_format {spec!r} is neither an ASE io format nor 'module:function'"
            )
        return spec
    module_name, attr = spec.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"external labeller: output_format {spec!r} cannot be imported: {exc}") from None
    if not callable(func):
        raise ValueError(f"external labeller: output_format {spec!r} is not callable")
    return func


class ExternalLabeller(ScratchLabeller):
    """Run any code described by kwargs (see the module docstring) and read its results."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        output_format: str,
        input_file: str = "input",
        input_format: str | None = None,
        input_kwargs: Mapping[str, Any] | None = None,
        input_template: str | os.PathLike[str] | None = None,
        template_values: Mapping[str, Any] | None = None,
        stdin: bool = False,
        stdout_file: str = "output",
        output_file: str | None = None,
        output_kwargs: Mapping[str, Any] | None = None,
        not_converged_pattern: str | None = None,
        version: str = "",
        version_pattern: str | None = None,
        name: str = "external",
        **common: Any,
    ) -> None:
        if not _safe_name(name):
            raise ValueError(
                f"external labeller: name {name!r} must match {_SAFE_NAME.pattern} and not be '.' or '..' "
                "(it names scratch dirs)"
            )
        self.name = name
        super().__init__(**common)
        self.command = [str(a) for a in command]
        if not self.command:
            raise ValueError(f"{name} labeller: command is empty")
        for arg in self.command:
            _check_command_arg(arg, name)
        for field_name, value in (("input_file", input_file), ("stdout_file", stdout_file),
                                  ("output_file", output_file or stdout_file)):
            if not _safe_name(value) or value == "stderr":
                raise ValueError(
                    f"{name} labeller: {field_name} {value!r} must be a plain file name (letters, digits, "
                    "'_', '.', '-'; no path separator, not '.' or '..') other than 'stderr'"
                )
        if (input_format is None) == (input_template is None):
            raise ValueError(f"{name} labeller: give exactly one of input_format and input_template")
        self.input_file = input_file
        self.input_format = input_format
        self.input_kwargs = dict(input_kwargs or {})
        if input_format is not None and input_format not in ioformats:
            raise ValueError(f"{name} labeller: input_format {input_format!r} is not an ASE io format")
        self.template_path = str(input_template) if input_template is not None else None
        self.template_values = {str(k): str(v) for k, v in (template_values or {}).items()}
        clash = set(self.template_values) & set(_STRUCTURE_FIELDS)
        if clash:
            raise ValueError(f"{name} labeller: template_values may not redefine {sorted(clash)}")
        self.template = ""
        if self.template_path is not None:
            try:
                self.template = Path(self.template_path).read_text()
            except OSError as exc:
                raise ValueError(f"{name} labeller: cannot read input_template {self.template_path!r}: {exc}") from None
            # Validate every placeholder now rather than on the first structure.
            probe = dict.fromkeys(_STRUCTURE_FIELDS, "") | self.template_values
            fill_template(self.template, probe, self.template_path)
        self.stdin = bool(stdin)
        self.stdout_file = stdout_file
        self.output_file = output_file or stdout_file
        self.output_format = output_format
        self.output_kwargs = dict(output_kwargs or {})
        self._reader = _resolve_reader(output_format)
        try:
            self.not_converged = re.compile(not_converged_pattern) if not_converged_pattern else None
            self.version_re = re.compile(version_pattern) if version_pattern else None
        except re.error as exc:
            raise ValueError(
                f"{name} labeller: invalid regex in not_converged_pattern/version_pattern: {exc}"
            ) from None
        if self.version_re is not None and self.version_re.groups < 1:
            raise ValueError(f"{name} labeller: version_pattern needs one capturing group")
        self.declared_version = version
        self.last_version = version
        self.output_names = tuple(dict.fromkeys((self.stdout_file, "stderr", self.output_file)))

    def _params(self) -> dict[str, Any]:
        return {
            "command": self.command, "input_format": self.input_format, "input_kwargs": self.input_kwargs,
            "template_sha256": hashlib.sha256(self.template.encode()).hexdigest() if self.template_path else None,
            "template_values": self.template_values, "output_format": self.output_format,
            "output_kwargs": self.output_kwargs, "env": self.env,
        }

    def _write_input(self, atoms: Atoms, path: Path) -> None:
        if self.input_format is not None:
            write(path, atoms, format=self.input_format, **self.input_kwargs)
        else:
            values = structure_fields(atoms) | self.template_values
            path.write_text(fill_template(self.template, values, str(self.template_path)))

    def _compute(self, atoms: Atoms, workdir: Path) -> tuple[float, np.ndarray, np.ndarray | None]:
        self._write_input(atoms, workdir / self.input_file)
        fields = {"input": self.input_file, "output": self.output_file, "workdir": str(workdir),
                  "cores": str(self.cores)}
        argv = [fields[m.group(1)] if (m := re.fullmatch(r"\{(\w+)\}", a)) else a for a in self.command]
        status = self._run(argv, workdir, self.stdout_file, "stderr",
                           stdin=self.input_file if self.stdin else None)
        if status != 0:
            raise RuntimeError(f"{self.command[0]} exited with status {status}")
        output = workdir / self.output_file
        if not output.is_file():
            raise RuntimeError(f"{self.command[0]} exited 0 but wrote no output file {self.output_file!r}")
        if isinstance(self._reader, str):
            image = read(output, format=self._reader, index=-1, **self.output_kwargs)
            if not isinstance(image, Atoms):
                raise RuntimeError(f"output {self.output_file!r}: expected one image, got {type(image).__name__}")
            if len(image) != len(atoms):
                raise RuntimeError(f"output {self.output_file!r} has {len(image)} atoms, structure has {len(atoms)}")
            if image.calc is None:
                raise RuntimeError(f"output {self.output_file!r} ({self._reader}) carries no energy/forces")
            stress = image.calc.results.get("stress")
            return image.get_potential_energy(), image.get_forces(), _full_stress(stress)
        energy, forces, stress = self._reader(output, atoms)
        return energy, forces, _full_stress(stress)


def _full_stress(stress: Any) -> np.ndarray | None:
    """Accept Voigt (6) or 3×3 stress from a reader; store the 3×3 tensor."""
    if stress is None:
        return None
    stress = np.asarray(stress, dtype=float)
    if stress.shape == (6,):
        return voigt_6_to_full_3x3_stress(stress)
    if stress.shape != (3, 3):
        raise RuntimeError(f"stress has shape {stress.shape}; expected (6,) or (3, 3)")
    return stress
