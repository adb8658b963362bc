"""EMT-labelled Cu structures shared by the MACE tests (labels stored as the labeller stores them)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator


def label_emt(atoms: Atoms, stress: bool = True) -> Atoms:
    """Attach EMT reference labels in a SinglePointCalculator (energy, forces and, if asked, stress)."""
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if stress:
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def cu_cells(n: int, seed: int) -> list[Atoms]:
    """Rattled, strained fcc Cu cells of 4 and 8 atoms, alternately."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", 3.6, cubic=True)
        if i % 2:
            atoms = atoms.repeat((2, 1, 1))
        atoms.set_cell(atoms.cell @ (np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))), scale_atoms=True)
        atoms.rattle(0.08, seed=int(rng.integers(2**31)))
        out.append(label_emt(atoms))
    return out


def cu_cluster() -> Atoms:
    """A non-periodic 8-atom Cu cluster, labelled without stress."""
    atoms = bulk("Cu", "fcc", 3.6, cubic=True).repeat((2, 1, 1))
    atoms.pbc = False
    atoms.cell = None
    atoms.rattle(0.05, seed=3)
    return label_emt(atoms, stress=False)
