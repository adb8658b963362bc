"""One definition of "the same structure", shared by the store (dedup) and the labellers
(scratch directory names, deterministic fault injection); it imports neither layer."""

from __future__ import annotations

import hashlib

import numpy as np
from ase import Atoms

#: Positions and cell are rounded to this many decimals (Å) before hashing, so that a structure
#: read back from a text format with float noise far below any physical meaning hashes the same.
HASH_DECIMALS = 8

def canonical_hash(atoms: Atoms) -> str:
    """SHA-256 of atomic numbers, positions, cell and pbc (atom order is part of identity)."""
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype="<i8").tobytes())
    # +0.0 turns -0.0 into 0.0 so signed zeros hash alike
    h.update((np.round(atoms.positions, HASH_DECIMALS) + 0.0).astype("<f8").tobytes())
    h.update((np.round(np.asarray(atoms.cell), HASH_DECIMALS) + 0.0).astype("<f8").tobytes())
    h.update(np.asarray(atoms.pbc, dtype="u1").tobytes())
    return h.hexdigest()
