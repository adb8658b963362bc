"""Seed and test structures: read from files (anything ``ase.io.read`` takes) or generated.

Reference labels found in a file are kept under the keys the user names, because datasets disagree:
ASE ≥ 3.23 moves the extxyz keys ``energy``/``forces``/``stress`` into ``atoms.calc.results``, while
``dft_energy``, ``force``, ``energy_xtb`` and the like stay in ``atoms.info``/``atoms.arrays``.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk

from alforge.config import GenerateSpec, StructureSource
from alforge.labelling.base import Label


class SourceError(ValueError):
    """Bad input structures; the message names the file and frame."""


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
    atoms: Atoms, energy_key: str, forces_key: str, stress_key: str, where: str
) -> Label | None:
    """The reference label stored in ``atoms`` under the given keys, or None if it has no energy."""
    energy = _lookup(atoms, energy_key, per_atom=False)
    if energy is None:
        return None
    forces = _lookup(atoms, forces_key, per_atom=True)
    if forces is None:
        raise SourceError(f"{where}: has energy {energy_key!r} but no forces under {forces_key!r}")
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise SourceError(f"{where}: forces {forces_key!r} have shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = _lookup(atoms, stress_key, per_atom=False)
    stress = _stress_tensor(stress, where) if stress is not None else None
    label = Label(float(energy), forces, stress)
    if not (np.isfinite(label.energy) and np.all(np.isfinite(forces))):
        raise SourceError(f"{where}: energy or forces are not finite")
    return label


def read_source(source: StructureSource) -> tuple[list[Atoms], list[Label | None], str]:
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
    labels = [
        extract_label(a, source.energy_key, source.forces_key, source.stress_key, f"{path} frame {i}")
        for i, a in enumerate(frames)
    ]
    clean = []
    for a in frames:
        a = a.copy()  # drops the SinglePointCalculator: labels travel separately
        for key in (source.energy_key, source.stress_key):
            a.info.pop(key, None)
        a.arrays.pop(source.forces_key, None)
        clean.append(a)
    return clean, labels, f"file:{path.name}"


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
