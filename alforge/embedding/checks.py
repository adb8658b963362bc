"""Sanity checks every generated structure passes before it is returned (METHODS §5: generated
structures are real candidates, so they must be physically sane for the labeller).

Each check returns a reason (a sentence naming what is wrong) or None; `embed` logs the reason and
drops the structure, never silently.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

from alforge.embedding.environment import neighbour_vectors

#: A cell whose volume is below this fraction of the product of its edge lengths is called flat.
FLAT_CELL = 1e-6
#: Fractional coordinates may stray this far outside [0, 1) (float noise of a wrap) and still count
#: as inside the cell.
INSIDE_TOLERANCE = 1e-9
#: Neighbour vectors of the centre must match the parent's to this many Å (the issue's promise).
ENVIRONMENT_TOLERANCE = 1e-8


#: :func:`bond_contact` as a fraction of the shortest covalent bond: a label's structure may hold a
#: bond this much shorter than usual (a hot or strained environment), nothing closer.
BOND_CONTACT_FRACTION = 0.85


def bond_contact(atoms: Atoms) -> float:
    """A contact distance for DFT labels of ``atoms``' chemistry: :data:`BOND_CONTACT_FRACTION` of
    the shortest bond two of its elements can form, twice the smallest covalent radius (ASE's
    Cordero radii): Si 1.89 Å, Cu 2.24 Å, anything with H 0.53 Å. ``embed``'s own default, 1.0 Å,
    only rules out overlaps: periodic Si cells carved with it had atoms 1.0 Å apart across the
    boundary and QE forces up to 170 eV/Å there."""
    if len(atoms) == 0:
        raise ValueError("bond_contact: the structure has no atoms")
    return BOND_CONTACT_FRACTION * 2 * float(covalent_radii[np.unique(atoms.numbers)].min())


def cell_problem(atoms: Atoms) -> str | None:
    """Reason the cell is degenerate (zero-length or coplanar vectors), else None."""
    lengths = atoms.cell.lengths()
    if np.any(lengths <= 0):
        return f"cell has a zero-length vector (lengths {np.round(lengths, 6).tolist()} Å)"
    if abs(atoms.cell.volume) < FLAT_CELL * float(np.prod(lengths)):
        return f"cell is flat (volume {atoms.cell.volume:.3g} Å³ for edges {np.round(lengths, 3).tolist()} Å)"
    return None


def outside_problem(atoms: Atoms) -> str | None:
    """Reason some atom lies outside the cell (fractional coordinate outside [0, 1)), else None."""
    scaled = atoms.cell.scaled_positions(atoms.positions)
    outside = np.any((scaled < -INSIDE_TOLERANCE) | (scaled >= 1 + INSIDE_TOLERANCE), axis=1)
    if outside.any():
        return f"{int(outside.sum())} atoms lie outside the cell (first: atom {int(np.argmax(outside))})"
    return None


def contact_problem(atoms: Atoms, contact: float) -> str | None:
    """Reason two atoms (periodic images included) are closer than `contact` Å, else None."""
    if contact <= 0:
        return None
    i, j, d = neighbor_list("ijd", atoms, contact)
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    return (f"atoms {int(i[k])} and {int(j[k])} are {d[k]:.3f} Å apart, closer than the "
            f"contact distance {contact} Å")


def environment_problem(atoms: Atoms, center: int, expected: np.ndarray, cutoff: float) -> str | None:
    """Reason the centre's neighbour vectors within `cutoff` differ from `expected`, else None.

    Both sets are sorted by their vectors rounded to 1e-6 Å (so float noise cannot reorder them)
    and then compared component by component to ENVIRONMENT_TOLERANCE.
    """
    _, found = neighbour_vectors(atoms, center, cutoff)
    if len(found) != len(expected):
        return (f"the centre has {len(found)} neighbours within the cutoff {cutoff} Å, "
                f"the parent's centre {len(expected)}")
    if len(found) == 0:
        return None
    diff = np.abs(sort_vectors(found) - sort_vectors(expected)).max()
    if diff > ENVIRONMENT_TOLERANCE:
        return f"the centre's neighbour vectors differ from the parent's by {diff:.3g} Å"
    return None


def sort_vectors(vectors: np.ndarray) -> np.ndarray:
    """Vectors in a canonical order (lexicographic on values rounded to 1e-6 Å)."""
    key = np.round(vectors, 6)
    return vectors[np.lexsort((key[:, 2], key[:, 1], key[:, 0]))]


def structure_problem(atoms: Atoms, contact: float) -> str | None:
    """The first reason a generated structure is not sane: finite positions, a non-degenerate cell,
    atoms inside it, no two atoms (across images) closer than `contact`."""
    if not np.all(np.isfinite(atoms.positions)):
        return "non-finite positions"
    return cell_problem(atoms) or outside_problem(atoms) or contact_problem(atoms, contact)
