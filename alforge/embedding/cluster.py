"""Cluster carving (METHODS §5, seed 000 §IV.B): the sphere of radius cutoff + buffer around the
centre, non-periodic, in vacuum."""

from __future__ import annotations

import numpy as np
from ase import Atoms

from alforge.embedding.environment import RattleRules, carve, rattle_buffer
from alforge.embedding.result import Embedded


def carve_clusters(atoms: Atoms, center: int, *, cutoff: float, buffer: float, copies: int,
                   rattle: float, contact: float, rng: np.random.Generator) -> list[Embedded]:
    """`copies` clusters of the atoms within cutoff + buffer of the centre (minimum image in a
    periodic parent), the buffer shell rattled (σ = `rattle`, kept inside the sphere and out of the
    cutoff sphere).

    The box around each cluster leaves `cutoff` Å of vacuum on every side, so a code that treats the
    box periodically (plane-wave DFT) sees no image within twice the cutoff. With rattle = 0 every
    copy is the paper's plain carved sphere.
    """
    radius = cutoff + buffer
    env = carve(atoms, center, radius, "sphere")
    rules = RattleRules(keep_out=[(np.zeros(3), cutoff)], contact=contact,
                        region=lambda p: np.linalg.norm(p, axis=1) < radius)
    movable = ~env.within(cutoff)
    out = []
    for copy in range(copies):
        positions = rattle_buffer(env.vectors, env.numbers, movable, rattle, rng, rules)
        cluster = Atoms(env.numbers, positions=positions, pbc=False)
        cluster.center(vacuum=cutoff)
        out.append(Embedded(cluster, center=0, details={"copy": copy, "vacuum": cutoff,
                                                        "buffer_atoms": int(movable.sum())}))
    return out
