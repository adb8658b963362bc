"""Seed and test structures: read from files (anything ``ase.io.read`` takes) or generated, and
ASE ``Atoms`` or pymatgen objects of a campaign made in Python, written to extxyz files first.

Reference labels found in a file are kept under the keys the user names, because datasets disagree:
ASE ≥ 3.23 moves the extxyz keys ``energy``/``forces``/``stress`` into ``atoms.calc.results``, while
``dft_energy``, ``force``, ``energy_xtb`` and the like stay in ``atoms.info``/``atoms.arrays``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from alforge.config import GenerateSpec, StructureSource
from alforge.labelling.base import Label


class SourceError(ValueError):
    """Bad input structures; the message names the file and frame."""


def check_structure(atoms: Atoms, where: str) -> None:
    """Raise SourceError, naming ``where``, for a structure no labeller or model can use: no atoms,
    an unknown element (number 0, ASE's 'X'), non-finite positions or cell, or a periodic axis
    whose cell vector has no length (a cell-less structure read as periodic)."""
    if len(atoms) == 0:
        raise SourceError(f"{where}: has no atoms")
    if np.any(atoms.numbers <= 0):
        raise SourceError(f"{where}: has atoms of unknown element (atomic number 0)")
    if not (np.all(np.isfinite(atoms.positions)) and np.all(np.isfinite(atoms.cell.array))):
        raise SourceError(f"{where}: positions or cell are not finite")
    lengths = atoms.cell.lengths()
    flat = [axis for axis in range(3) if atoms.pbc[axis] and lengths[axis] < 1e-6]
    if flat:
        raise SourceError(f"{where}: periodic along axis {flat} but its cell vector has zero length")
    if atoms.pbc.all() and abs(atoms.cell.volume) < 1e-6:
        raise SourceError(f"{where}: periodic with a degenerate cell (volume {atoms.cell.volume:.3g} Å³)")


def to_atoms(obj: object, where: str) -> Atoms:
    """A copy of ``obj`` as ASE ``Atoms``: an ``Atoms`` as it is, a pymatgen ``Structure`` or
    ``Molecule`` through ``AseAtomsAdaptor`` (site properties become ``arrays``, properties
    ``info``). Labels come along as :func:`write_structures` needs them: a calculator's energy,
    forces and stress results as a ``SinglePointCalculator``, other keys in ``info``/``arrays``.
    Anything else is a SourceError naming ``where`` and the object's type."""
    if type(obj).__module__.startswith("pymatgen"):
        from pymatgen.core import SiteCollection
        from pymatgen.io.ase import AseAtomsAdaptor

        if isinstance(obj, SiteCollection):
            try:
                obj = AseAtomsAdaptor.get_atoms(obj, msonable=False)
            except ValueError as exc:  # e.g. a disordered structure
                raise SourceError(f"{where}: pymatgen {type(obj).__name__} cannot become ASE Atoms: {exc}") from None
    if not isinstance(obj, Atoms):
        kind = type(obj).__qualname__
        kind = kind if type(obj).__module__ == "builtins" else f"{type(obj).__module__}.{kind}"
        raise SourceError(
            f"{where}: expected ASE Atoms or a pymatgen Structure/Molecule (a file is {{file: PATH}}), got {kind}"
        )
    atoms = obj.copy()  # without the calculator: only its results travel
    results = obj.calc.results if obj.calc is not None else {}
    labels = {k: results[k] for k in ("energy", "free_energy", "forces", "stress") if k in results}
    if labels:
        atoms.calc = SinglePointCalculator(atoms, **labels)
    check_structure(atoms, where)
    return atoms


def write_structures(frames: list[Atoms], path: Path) -> None:
    """Write ``frames`` (from :func:`to_atoms`) as extxyz, labels included, so a campaign made in
    Python reads its structures from a file like any other; written to a temporary file first, so
    a failure never leaves a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    ase.io.write(tmp, frames, format="extxyz")
    tmp.replace(path)


def _lookup(atoms: Atoms, key: str, per_atom: bool) -> np.ndarray | float | None:
    results = atoms.calc.results if atoms.calc is not None else {}
    if key in results:
        return results[key]
    store = atoms.arrays if per_atom else atoms.info
    return store.get(key)


def _stress_tensor(value: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.size == 9:
        return arr.reshape(3, 3)
    if arr.size == 6:  # Voigt xx yy zz yz xz xy (ASE order)
        xx, yy, zz, yz, xz, xy = arr
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise SourceError(f"{where}: stress has {arr.size} components, expected 6 (Voigt) or 9")


def extract_label(
    atoms: Atoms, energy_key: str, forces_key: str, stress_key: str, where: str, require_forces: bool = True
) -> Label | None:
    """The reference label stored in ``atoms`` under the given keys, or None if it has no energy.

    Without ``require_forces`` an energy-only structure gives a label with ``forces=None`` (test
    sets: evaluated on energy alone); with it, that is an error naming the frame.
    """
    energy = _lookup(atoms, energy_key, per_atom=False)
    if energy is None:
        return None
    forces = _lookup(atoms, forces_key, per_atom=True)
    if forces is None:
        if require_forces:
            raise SourceError(f"{where}: has energy {energy_key!r} but no forces under {forces_key!r}")
    else:
        forces = np.asarray(forces, dtype=float)
        if forces.shape != (len(atoms), 3):
            raise SourceError(f"{where}: forces {forces_key!r} have shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = _lookup(atoms, stress_key, per_atom=False)
    stress = _stress_tensor(stress, where) if stress is not None else None
    label = Label(float(energy), forces, stress)  # type: ignore[arg-type]
    if not (np.isfinite(label.energy) and (forces is None or np.all(np.isfinite(forces)))):
        raise SourceError(f"{where}: energy or forces are not finite")
    return label


def _strip_labels(atoms: Atoms, source: StructureSource) -> Atoms:
    a = atoms.copy()  # drops the SinglePointCalculator: labels travel separately
    for key in (source.energy_key, source.stress_key):
        a.info.pop(key, None)
    a.arrays.pop(source.forces_key, None)
    return a


def read_source(
    source: StructureSource, require_forces: bool = True
) -> tuple[list[Atoms], list[Label | None], str]:
    """Structures of one source, their labels (None where unlabelled), and a provenance tag."""
    if source.generate is not None:
        structures = generate(source.generate)
        return structures, [None] * len(structures), f"generate:{source.generate.element}"
    path = Path(source.file)  # type: ignore[arg-type]
    try:
        frames = ase.io.read(path, index=source.index, format=source.format)
    except Exception as exc:
        raise SourceError(f"{path}: cannot be read by ase.io.read: {exc}") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise SourceError(f"{path}: no structures at index {source.index!r}")
    labels = []
    for i, atoms in enumerate(frames):
        check_structure(atoms, f"{path} frame {i}")
        labels.append(
            extract_label(atoms, source.energy_key, source.forces_key, source.stress_key, f"{path} frame {i}",
                          require_forces)
        )
    return [_strip_labels(a, source) for a in frames], labels, f"file:{path.name}"


def check_labelled(source: StructureSource, labels: list[Label | None]) -> None:
    """Raise SourceError naming the frames of ``source`` that carry no label (``alforge import``)."""
    unlabelled = [i for i, lab in enumerate(labels) if lab is None]
    if unlabelled:
        raise SourceError(
            f"{source.file}: frame(s) {unlabelled[:10]} have no energy under key "
            f"{source.energy_key!r}; name the keys (--energy-key/--forces-key/--stress-key)"
        )


def check_sources(sources: list[StructureSource], require_forces: bool, labelled: bool = False) -> None:
    """Read every structure of ``sources`` and raise SourceError at the first bad one (with
    ``labelled``, at one without a label too): run before anything is stored, so a bad file leaves
    no half-made store."""
    for source in sources:
        _, labels, _ = read_source(source, require_forces=require_forces or labelled)
        if labelled:
            check_labelled(source, labels)


def _frame_numbers(index: str) -> tuple[int, int] | None:
    """``(start, step)`` when ``index`` selects frames start, start+step, ... of the file (so frame
    numbers in the file are known without its length), else None."""
    from ase.io.formats import string2index

    sel = string2index(index)
    if isinstance(sel, int):
        return (sel, 1) if sel >= 0 else None
    start, step = sel.start or 0, sel.step or 1
    return (start, step) if start >= 0 and step > 0 else None


def iter_source_chunks(
    source: StructureSource, chunk_size: int = 1000
) -> Iterator[tuple[list[Atoms], list[dict[str, Any]]]]:
    """Structures of one source, ``chunk_size`` at a time (``ase.io.iread``: a large pool file is
    never in memory at once), labels stripped, each with its provenance: file, index and frame number
    (``position`` in the selection; ``frame`` in the file where the index makes that known)."""
    if source.generate is not None:
        structures = generate(source.generate)
        for i in range(0, len(structures), chunk_size):
            part = structures[i : i + chunk_size]
            yield part, [{"generate": source.generate.element, "position": i + k} for k in range(len(part))]
        return
    path = Path(source.file)  # type: ignore[arg-type]
    numbering = _frame_numbers(source.index)
    chunk: list[Atoms] = []
    prov: list[dict[str, Any]] = []
    try:
        for k, atoms in enumerate(ase.io.iread(path, index=source.index, format=source.format)):
            frame = numbering[0] + k * numbering[1] if numbering else None
            check_structure(atoms, f"{path} frame {frame if frame is not None else f'#{k} of {source.index!r}'}")
            chunk.append(_strip_labels(atoms, source))
            prov.append({"file": str(path), "index": source.index, "position": k, "frame": frame})
            if len(chunk) >= chunk_size:
                yield chunk, prov
                chunk, prov = [], []
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{path}: cannot be read by ase.io.iread: {exc}") from None
    if chunk:
        yield chunk, prov


def generate(spec: GenerateSpec) -> list[Atoms]:
    """``count`` distorted copies of ``bulk(element)``, cycling through the requested supercells."""
    rng = np.random.default_rng(spec.seed)
    base = bulk(spec.element, spec.crystal, a=spec.a, cubic=spec.cubic)
    out = []
    for k in range(spec.count):
        atoms = base * spec.supercells[k % len(spec.supercells)]
        eps = rng.uniform(-spec.strain, spec.strain, size=(3, 3))
        eps = 0.5 * (eps + eps.T)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        if spec.vacancies:
            n_remove = min(spec.vacancies, len(atoms) - 1)
            del atoms[list(rng.choice(len(atoms), size=n_remove, replace=False))]
        atoms.positions += rng.normal(scale=spec.rattle, size=atoms.positions.shape)
        out.append(atoms)
    return out
