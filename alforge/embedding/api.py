"""`embed`: one entry point for the three ways of turning an atom's environment in a large structure
into small structures a DFT code can label (METHODS §5, seed 000 §IV.B)."""

from __future__ import annotations

import logging
import math
import numbers as _numbers

import numpy as np
from ase import Atoms

from alforge.embedding.checks import environment_problem, structure_problem
from alforge.embedding.cluster import carve_clusters
from alforge.embedding.environment import neighbour_vectors
from alforge.embedding.high_symmetry import embed_high_symmetry
from alforge.embedding.periodic import embed_periodic
from alforge.embedding.result import Embedded
from alforge.structure_hash import canonical_hash

logger = logging.getLogger(__name__)

STRATEGIES = ("cluster", "periodic", "high_symmetry")

#: Default buffer (Å) beyond the cutoff. The paper (seed 000 §IV.B) gives no number: its cluster is
#: the bare cutoff sphere and its cube's corners are the only buffer. For a MACE model that is too
#: little: with two message-passing layers the centre also sees its neighbours' neighbours, and a
#: seam (the cluster's dangling bonds, the periodic cell's boundary, the host interface) right at the
#: cutoff puts unphysical atoms one bond from the environment's outer shell, in the labels too.
#: 2.5 Å is about one nearest-neighbour distance of the common elements (C 1.54, Si 2.35, Fe 2.48,
#: Cu 2.56 Å), so the outer shell keeps its first neighbours, while the structure stays small enough
#: for DFT (Si, cutoff 5 Å: about 80 atoms in a cluster, 170 in a periodic cube). A full second-layer
#: receptive field (buffer = cutoff) would cost 8 times the atoms of the bare sphere.
DEFAULT_BUFFER = 2.5


def _number(name: str, value: object, *, positive: bool) -> float:
    """A finite real `value`, > 0 if `positive` else ≥ 0; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, _numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if (positive and value <= 0) or value < 0:
        raise ValueError(f"{name}: expected a number {'> 0' if positive else '≥ 0'}, got {value!r}")
    return float(value)


def _integer(name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer in [low, high); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, _numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < low or (high is not None and value >= high):
        bounds = f"in [{low}, {high})" if high is not None else f"≥ {low}"
        raise ValueError(f"{name}: expected an integer {bounds}, got {value}")
    return int(value)


def _check_parent(atoms: object) -> Atoms:
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise ValueError(f"atoms: expected a non-empty ase.Atoms, got {atoms!r}")
    if not np.all(np.isfinite(atoms.positions)):
        raise ValueError("atoms: positions are not all finite")
    periodic = np.asarray(atoms.pbc, dtype=bool)
    if periodic.any():
        cell = np.asarray(atoms.cell)
        lengths = np.linalg.norm(cell, axis=1)
        if np.any(lengths[periodic] <= 0) or (periodic.all() and abs(np.linalg.det(cell)) <= 1e-9):
            raise ValueError(f"atoms: periodic along {periodic.tolist()} but the cell is degenerate "
                             f"(lengths {np.round(lengths, 6).tolist()} Å)")
    return atoms


def embed(atoms: Atoms, center: int, *, strategy: str, cutoff: float, buffer: float = DEFAULT_BUFFER,
          copies: int = 1, rattle: float = 0.2, contact: float = 1.0, seed: int = 0,
          host: Atoms | None = None) -> list[Atoms]:
    """Small structures that hold atom `center`'s environment in `atoms` (METHODS §5).

    strategy:
      - "cluster": the atoms within cutoff + buffer of the centre, non-periodic, in vacuum;
      - "periodic": the cube around that sphere as a periodic cell, grown until no two atoms across
        images are closer than `contact`;
      - "high_symmetry": the sphere inserted into the smallest supercell of a high-symmetry crystal
        of the same chemistry (ASE's reference state: diamond for C/Si, fcc/bcc/hcp for metals, or
        `host`) that also holds one intact crystal environment; the pristine host cell is returned
        last, with ``info["embedding"]["pristine_host"] = True``.

    Each strategy returns `copies` structures whose buffer atoms (farther than `cutoff` from the
    centre, and in high-symmetry embedding outside the intact host environment) are rattled with a
    Gaussian of σ = `rattle` Å, drawn from `seed`. Atoms within `cutoff` of the centre are never
    moved: the centre's neighbour vectors (minimum image) are the parent's to 1e-8 Å.

    `contact` (Å) is the closest approach the result may have, across images too. Its default,
    1.0 Å, only rules out overlapping atoms: for a DFT label choose about 0.85 of the shortest bond
    of the chemistry (2.0 Å for Si). With 1.0, periodic Si cells had atoms 1.0 Å apart across the
    boundary and QE forces up to 170 eV/Å there, labels that made a fine-tuned model worse
    (``benchmarks/study_lpr_embedding.py``).

    Every structure passes the sanity checks (finite positions, non-degenerate cell, atoms inside
    it, no two atoms closer than `contact` across images, the centre's environment intact) or is
    dropped with a warning on this module's logger naming the reason. Each returned structure's
    ``info["embedding"]`` holds strategy, parent (its canonical hash), parent_center, center (the
    centre's index in the new structure; None for the pristine host), cutoff, buffer, seed,
    pristine_host, parameters (copies, rattle, contact) and the strategy's own record (copy,
    cell_edge, vacuum, host, host_center, buffer_atoms).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    atoms = _check_parent(atoms)
    center = _integer("center", center, 0, len(atoms))
    cutoff = _number("cutoff", cutoff, positive=True)
    buffer = _number("buffer", buffer, positive=False)
    rattle = _number("rattle", rattle, positive=False)
    contact = _number("contact", contact, positive=False)
    copies = _integer("copies", copies, 1)
    seed = _integer("seed", seed, 0)
    if host is not None and strategy != "high_symmetry":
        raise ValueError(f"host: only strategy 'high_symmetry' embeds in a host, got strategy {strategy!r}")
    if host is not None and (not isinstance(host, Atoms) or len(host) == 0):
        raise ValueError(f"host: expected a non-empty ase.Atoms crystal, got {host!r}")

    rng = np.random.default_rng(seed)
    common = dict(cutoff=cutoff, buffer=buffer, copies=copies, rattle=rattle, contact=contact, rng=rng)
    if strategy == "cluster":
        generated = carve_clusters(atoms, center, **common)
    elif strategy == "periodic":
        generated = embed_periodic(atoms, center, **common)
    else:
        generated = embed_high_symmetry(atoms, center, host=host, **common)

    _, expected = neighbour_vectors(atoms, center, cutoff)
    provenance = {"strategy": strategy, "parent": canonical_hash(atoms), "parent_center": center,
                  "cutoff": cutoff, "buffer": buffer, "seed": seed,
                  "parameters": {"copies": copies, "rattle": rattle, "contact": contact}}
    kept = []
    for number, item in enumerate(generated):
        reason = _problem(item, expected, cutoff, contact)
        if reason is not None:
            logger.warning("%s embedding of atom %d: structure %d of %d discarded: %s",
                           strategy, center, number, len(generated), reason)
            continue
        item.atoms.info["embedding"] = {**provenance, "center": item.center,
                                        "pristine_host": item.pristine_host, **item.details}
        kept.append(item.atoms)
    return kept


def _problem(item: Embedded, expected: np.ndarray, cutoff: float, contact: float) -> str | None:
    """The first reason this generated structure must not be returned, else None."""
    reason = structure_problem(item.atoms, contact)
    if reason is None and item.center is not None:
        reason = environment_problem(item.atoms, item.center, expected, cutoff)
    return reason
