"""Force disagreement of a committee of models (query by committee, METHODS §9)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

from alforge.mlip.mace_model import load_calculator


def max_force_deviation(model_paths: Sequence[Path], atoms_list: Sequence[Atoms], device: str = "auto") -> np.ndarray:
    """Per structure, ``max_i sqrt(<|F_i − <F_i>|²>)`` over the committee (DP-GEN's ``max_devi_f``)."""
    if len(model_paths) < 2:
        raise ValueError(f"a committee needs at least 2 models, got {len(model_paths)}")
    forces = []  # [model][structure] -> (n_atoms, 3)
    for path in model_paths:
        calc = load_calculator(Path(path), device)
        per_structure = []
        for atoms in atoms_list:
            work = atoms.copy()
            work.calc = calc
            per_structure.append(np.array(work.get_forces()))
        forces.append(per_structure)
    out = np.empty(len(atoms_list))
    for s in range(len(atoms_list)):
        stack = np.stack([forces[m][s] for m in range(len(model_paths))])  # (M, n_atoms, 3)
        spread = ((stack - stack.mean(axis=0)) ** 2).sum(axis=2).mean(axis=0)  # (n_atoms,)
        out[s] = float(np.sqrt(spread.max())) if spread.size else 0.0
    return out
