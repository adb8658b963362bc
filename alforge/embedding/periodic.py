"""Periodic embedding (METHODS §5, seed 000 §IV.B): the cube that tightly holds the sphere of radius
cutoff + buffer becomes a periodic cell, grown until no two atoms across images are closer than the
contact distance; buffer atoms (beyond the cutoff) are rattled, one rattle per copy."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

from alforge.embedding.environment import RattleRules, carve, rattle_buffer
from alforge.embedding.result import Embedded

#: The cell edge is found to this precision (Å) by bisection.
EDGE_TOLERANCE = 1e-4
#: The cube's half-edge is cutoff + buffer plus this (Å), so that atoms exactly on a face (a crystal
#: plane at that distance) are all kept whatever the float noise of their vectors.
FACE_TOLERANCE = 1e-8


def _cube(numbers: np.ndarray, vectors: np.ndarray, edge: float) -> Atoms:
    """The centre at the middle of a periodic cube of this edge."""
    return Atoms(numbers, positions=vectors + edge / 2, cell=np.eye(3) * edge, pbc=True)


def _apart(numbers: np.ndarray, vectors: np.ndarray, edge: float, contact: float) -> bool:
    return contact <= 0 or len(neighbor_list("i", _cube(numbers, vectors, edge), contact)) == 0


def grow_edge(numbers: np.ndarray, vectors: np.ndarray, half_edge: float, contact: float) -> float:
    """The smallest cube edge ≥ 2·half_edge at which no two atoms across images are closer than
    `contact`, to EDGE_TOLERANCE (rounded up, so the returned edge satisfies it).

    Atoms lie in [-half_edge, half_edge]³, so each image distance only grows with the edge and an edge
    of 2·half_edge + contact always separates images by ≥ contact: bisection between the two is exact.
    (Atoms closer than `contact` inside the cube are no image problem: no edge mends them, and the
    sanity checks drop such a structure.)
    """
    low, high = 2 * half_edge, 2 * half_edge + contact
    if _apart(numbers, vectors, low, contact):
        return low
    while high - low > EDGE_TOLERANCE:
        middle = (low + high) / 2
        if _apart(numbers, vectors, middle, contact):
            high = middle
        else:
            low = middle
    return high


def embed_periodic(atoms: Atoms, center: int, *, cutoff: float, buffer: float, copies: int,
                   rattle: float, contact: float, rng: np.random.Generator) -> list[Embedded]:
    """`copies` periodic cubes around the centre, each with its own rattle of the buffer atoms.

    Rattled atoms stay inside the cube and outside the cutoff sphere, so every periodic image lies at
    least half an edge (≥ cutoff) from the centre and the centre's environment is the parent's.
    """
    half_edge = cutoff + buffer + FACE_TOLERANCE
    env = carve(atoms, center, half_edge, "cube")
    rules = RattleRules(keep_out=[(np.zeros(3), cutoff)], contact=contact,
                        region=lambda p: np.all(np.abs(p) <= half_edge, axis=1))
    movable = ~env.within(cutoff)
    out = []
    for copy in range(copies):
        vectors = rattle_buffer(env.vectors, env.numbers, movable, rattle, rng, rules)
        edge = grow_edge(env.numbers, vectors, half_edge, contact)
        cube = _cube(env.numbers, vectors, edge)
        cube.wrap()
        out.append(Embedded(cube, center=0, details={"copy": copy, "cell_edge": edge,
                                                     "buffer_atoms": int(movable.sum())}))
    return out
