"""Exact round-trip of ``ase.Atoms`` to database columns (dedup key: :func:`canonical_hash`).

``info`` goes through ASE's own JSON codec (``ase.io.jsonio``), which keeps NumPy arrays and
numbers exact; per-atom ``arrays`` beyond numbers/positions go into one ``.npz`` blob.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from ase import Atoms
from ase.io.jsonio import decode as json_decode
from ase.io.jsonio import encode as json_encode

from alforge.structure_hash import canonical_hash

_CORE_ARRAYS = {"numbers", "positions"}

def atoms_to_columns(atoms: Atoms) -> dict[str, Any]:
    """Columns of the ``structures`` table for ``atoms`` (labels are stored separately)."""
    extra = {k: v for k, v in atoms.arrays.items() if k not in _CORE_ARRAYS}
    blob = None
    if extra:
        buf = io.BytesIO()
        np.savez(buf, **extra)
        blob = buf.getvalue()
    info = {k: v for k, v in atoms.info.items()}
    return {
        "hash": canonical_hash(atoms),
        "n_atoms": len(atoms),
        "formula": atoms.get_chemical_formula(),
        "numbers": np.asarray(atoms.numbers, dtype="<i8").tobytes(),
        "positions": np.asarray(atoms.positions, dtype="<f8").tobytes(),
        "cell": np.asarray(atoms.cell, dtype="<f8").tobytes(),
        "pbc": "".join("1" if p else "0" for p in atoms.pbc),
        "info_json": json_encode(info) if info else None,
        "arrays_npz": blob,
    }


def columns_to_atoms(
    n_atoms: int,
    numbers: bytes,
    positions: bytes,
    cell: bytes,
    pbc: str,
    info_json: str | None,
    arrays_npz: bytes | None,
) -> Atoms:
    atoms = Atoms(
        numbers=np.frombuffer(numbers, dtype="<i8").astype(int),
        positions=np.frombuffer(positions, dtype="<f8").reshape(n_atoms, 3),
        cell=np.frombuffer(cell, dtype="<f8").reshape(3, 3),
        pbc=[c == "1" for c in pbc],
    )
    if info_json:
        atoms.info.update(json_decode(info_json))
    if arrays_npz:
        with np.load(io.BytesIO(arrays_npz), allow_pickle=False) as data:
            for key in data.files:
                atoms.new_array(key, data[key])
    return atoms
