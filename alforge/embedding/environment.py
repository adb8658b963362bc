"""The centre's environment carved out of a parent structure, and the buffer rattle every strategy
shares (METHODS §5, seed 000 §IV.B).

An environment is stored as vectors from the centre (minimum image, or every periodic image that falls
inside the region when the parent's cell is smaller than the region), so each strategy only has to
choose where to put the centre: the vectors themselves are never recomputed, which is what keeps
the centre's neighbour vectors exact to floating-point rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from ase import Atoms
from ase.geometry import complete_cell, get_distances
from ase.neighborlist import neighbor_list

#: How often one buffer atom's displacement is drawn again when the draw breaks a rule (enters a
#: protected sphere, leaves its region, or comes within the contact distance of another atom)
#: before the atom keeps its unrattled place. 100 draws of a 0.2 Å Gaussian almost always find room.
MAX_DRAWS = 100


@dataclass(frozen=True)
class Environment:
    """Atoms around a centre, the centre first (row 0, vector 0), the rest sorted by distance (ties
    by parent index). A parent atom appears once per image inside the region, so more than once
    when the parent's cell is smaller than the region."""

    numbers: np.ndarray
    vectors: np.ndarray

    @property
    def distances(self) -> np.ndarray:
        return np.linalg.norm(self.vectors, axis=1)

    def within(self, radius: float) -> np.ndarray:
        """Mask of rows strictly closer than `radius` to the centre (the centre itself included)."""
        return self.distances < radius


def neighbour_vectors(atoms: Atoms, center: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(parent indices, vectors) of every atom image with 0 < |vector| < radius from `center`.

    Along each periodic axis the fractional offset is first reduced to [-0.5, 0.5] (minimum image),
    then every lattice shift S with |offset + S| · plane spacing < radius is tried, so cells smaller
    than the radius yield all their images. This is the centre's row of ASE's neighbour list, in time
    linear in the number of atoms: `ase.neighborlist.neighbor_list` would bin the whole cell at the
    region's radius and cost all pairs, minutes for a thousand atoms.
    """
    cell = complete_cell(np.asarray(atoms.cell))
    periodic = np.asarray(atoms.pbc, dtype=bool)
    offsets = np.linalg.solve(cell.T, (atoms.positions - atoms.positions[center]).T).T
    offsets[:, periodic] -= np.round(offsets[:, periodic])
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    reach = np.where(periodic, np.floor(radius / spacing + 0.5), 0).astype(int)
    shifts = np.array(list(itertools.product(*(range(-m, m + 1) for m in reach))), dtype=float)
    vectors = ((offsets[None, :, :] + shifts[:, None, :]) @ cell).reshape(-1, 3)
    indices = np.tile(np.arange(len(atoms)), len(shifts))
    distances = np.linalg.norm(vectors, axis=1)
    keep = (distances < radius) & ~((indices == center) & (distances == 0))
    return indices[keep], vectors[keep]


def carve(atoms: Atoms, center: int, radius: float, shape: Literal["sphere", "cube"]) -> Environment:
    """The atoms within `radius` of the centre (sphere) or within the cube of half-edge `radius`."""
    search = radius * np.sqrt(3.0) if shape == "cube" else radius
    # a hair beyond the region so that atoms on a cube face (|x| = radius) are not lost to `<`
    indices, vectors = neighbour_vectors(atoms, center, search * (1 + 1e-12) + 1e-12)
    if shape == "cube":
        inside = np.all(np.abs(vectors) <= radius, axis=1)
    else:
        inside = np.linalg.norm(vectors, axis=1) < radius
    indices, vectors = indices[inside], vectors[inside]
    order = np.lexsort((indices, np.round(np.linalg.norm(vectors, axis=1), 10)))
    indices = np.concatenate([[center], indices[order]])
    vectors = np.concatenate([np.zeros((1, 3)), vectors[order]])
    return Environment(numbers=np.asarray(atoms.numbers)[indices].copy(), vectors=vectors)


@dataclass(frozen=True)
class RattleRules:
    """What a rattled buffer atom must respect.

    `keep_out`: (point, radius) spheres no buffer atom may enter: the centre's cutoff sphere, and in
    high-symmetry embedding the intact host environment. `region`: a test that a position is still
    inside the carved region (None: anywhere). `cell`/`pbc`: the frame in which distances are taken
    (minimum image when periodic).
    """

    keep_out: list[tuple[np.ndarray, float]]
    contact: float
    region: Callable[[np.ndarray], np.ndarray] | None = None
    cell: np.ndarray | None = None
    pbc: bool = False


def _violations(positions: np.ndarray, numbers: np.ndarray, rules: RattleRules) -> np.ndarray:
    """Mask of atoms that break a rule at these positions."""
    bad = np.zeros(len(positions), dtype=bool)
    cell, pbc = (rules.cell, True) if rules.pbc else (None, None)
    for point, radius in rules.keep_out:
        _, d = get_distances(point[None, :], positions, cell=cell, pbc=pbc)
        bad |= d[0] <= radius
    if rules.region is not None:
        bad |= ~rules.region(positions)
    if rules.contact > 0:
        frame = Atoms(numbers, positions=positions, cell=rules.cell, pbc=rules.pbc)
        i, j = neighbor_list("ij", frame, rules.contact)
        bad[i] = True
        bad[j] = True
    return bad


def rattle_buffer(positions: np.ndarray, numbers: np.ndarray, movable: np.ndarray, sigma: float,
                  rng: np.random.Generator, rules: RattleRules) -> np.ndarray:
    """Gaussian displacements (σ = `sigma` per Cartesian component) of the `movable` atoms only.

    A draw that breaks one of `rules` is drawn again for that atom (so the displacement is a
    Gaussian truncated to the allowed region, up to MAX_DRAWS tries); an atom that never finds room
    keeps its unrattled position. Atoms that are not movable never move, which is what keeps the
    centre's environment exact.
    """
    displacement = np.zeros_like(positions)
    if sigma == 0 or not movable.any():
        return positions.copy()
    todo = movable.copy()
    for _ in range(MAX_DRAWS):
        displacement[todo] = rng.normal(0.0, sigma, size=(int(todo.sum()), 3))
        todo = _violations(positions + displacement, numbers, rules) & movable
        if not todo.any():
            break
    displacement[todo] = 0.0
    return positions + displacement
