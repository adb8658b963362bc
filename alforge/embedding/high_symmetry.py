"""High-symmetry embedding (METHODS §5, seed 000 §IV.B): the centre's environment replaces a sphere
of a high-symmetry crystal of the same chemistry, in the smallest supercell that also holds one intact
crystal environment; the buffer is rattled and the pristine crystal is returned too.

Layout of each embedded structure: the environment's atoms first (the centre is atom 0, then by
distance), then the host atoms that were kept. Buffer atoms are all atoms outside both the centre's
cutoff sphere and the intact host atom's cutoff sphere: inserted atoms beyond the cutoff and host
atoms around the seam.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import spglib
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, chemical_symbols, reference_states
from ase.geometry import get_distances, minkowski_reduce

from alforge.embedding.environment import RattleRules, carve, rattle_buffer
from alforge.embedding.result import Embedded
from alforge.structure_hash import canonical_hash

#: The crystal structures ASE's reference states may give a host in, and their space groups
#: (diamond Fd-3m, fcc Fm-3m, bcc Im-3m, hcp P6_3/mmc).
HOST_SPACE_GROUPS = {"diamond": 227, "fcc": 225, "bcc": 229, "hcp": 194}
#: spglib's symmetry tolerance (Å) for checking a host crystal.
SYMPREC = 1e-3


def reference_host(numbers: np.ndarray) -> tuple[Atoms, int]:
    """The element's high-symmetry crystal from ASE's reference states, and its expected space group.

    Cubic crystals come as their conventional cubic cell (8, 4 or 2 atoms), hcp as its 2-atom cell.
    Raises ValueError (naming `host`) for mixed chemistry or an element whose reference state is not
    diamond, fcc, bcc or hcp (H, N, O are diatomic, for instance).
    """
    elements = sorted({chemical_symbols[z] for z in np.unique(numbers)})
    if len(elements) != 1:
        raise ValueError(f"host: the environment holds {', '.join(elements)}; mixed chemistry has no "
                         f"reference crystal, pass host=Atoms (a high-symmetry crystal to embed in)")
    symbol = elements[0]
    state = reference_states[atomic_numbers[symbol]] or {}
    symmetry = state.get("symmetry")
    if symmetry not in HOST_SPACE_GROUPS:
        raise ValueError(f"host: ASE's reference state of {symbol} is {symmetry!r}, not one of "
                         f"{sorted(HOST_SPACE_GROUPS)}; pass host=Atoms (a high-symmetry crystal)")
    crystal = bulk(symbol, symmetry, cubic=symmetry != "hcp")
    return crystal, HOST_SPACE_GROUPS[symmetry]


def host_symmetry(host: Atoms, expected: int | None) -> dict:
    """spglib's space group of the host, checked before anything is inserted into it.

    A reference crystal must have its expected group; a user's host must at least be more than
    triclinic (P1 or P-1 is no high-symmetry crystal: a rattled or amorphous cell, say).
    """
    if not all(host.pbc):
        raise ValueError(f"host: expected a crystal periodic in all three directions, got pbc={host.pbc.tolist()}")
    cell = (np.asarray(host.cell), host.get_scaled_positions(), host.numbers)
    with warnings.catch_warnings():
        # spglib 2.5+ warns on every call until its old error handling (None on failure) is switched
        # off globally; a library should not flip that switch for its users, so it only hushes it
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            dataset = spglib.get_symmetry_dataset(cell, symprec=SYMPREC)
        except spglib.error.SpglibError as error:
            raise ValueError(f"host: spglib finds no space group ({error})") from error
    if dataset is None:
        raise ValueError(f"host: spglib finds no space group at symprec {SYMPREC} Å")
    number, symbol = int(dataset.number), str(dataset.international)
    if expected is not None and number != expected:
        raise ValueError(f"host: the reference crystal has space group {symbol} (#{number}), "
                         f"expected #{expected}")
    if number <= 2:
        raise ValueError(f"host: space group {symbol} (#{number}) at symprec {SYMPREC} Å is triclinic, "
                         f"not a high-symmetry crystal")
    return {"number": number, "international": symbol}


def _shortest_translation(cell: np.ndarray) -> float:
    reduced, _ = minkowski_reduce(cell)
    return float(np.linalg.norm(reduced, axis=1).min())


def host_supercell(host: Atoms, radius: float, cutoff: float, contact: float,
                   ) -> tuple[Atoms, tuple[int, int, int], np.ndarray, int]:
    """The smallest supercell (fewest atoms) of `host` that holds the inserted sphere of `radius`
    and one intact host environment, with the contact criterion.

    With the insertion point p at the supercell's middle: every lattice translation is at least
    2·radius + contact long (the sphere never meets its own images), and some host atom lies at least
    radius + contact + cutoff from every image of p (no atom within its cutoff is removed, inserted or
    rattled). Returns the supercell, its repetition, p and that host atom's index.
    """
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(np.asarray(host.cell)), axis=0)  # plane spacings
    reach = 2 * (radius + contact + cutoff)
    limits = np.maximum(1, np.ceil(reach / spacing).astype(int) + 1)
    repeats = sorted(itertools.product(*(range(1, n + 1) for n in limits)),
                     key=lambda r: (np.prod(r), max(r) - min(r), r))
    for repeat in repeats:
        cell = np.asarray(host.cell) * np.asarray(repeat)[:, None]
        if _shortest_translation(cell) < 2 * radius + contact:
            continue
        supercell = host.repeat(repeat)
        middle = cell.sum(axis=0) / 2
        _, d = get_distances(middle[None, :], supercell.positions, cell=cell, pbc=True)
        far = int(np.argmax(d[0]))
        if d[0, far] >= radius + contact + cutoff:
            return supercell, tuple(int(n) for n in repeat), middle, far
    raise ValueError(f"host: no supercell up to {limits.tolist()} repeats holds the environment "
                     f"(radius {radius} Å) and an intact host environment")  # unreachable in practice


def embed_high_symmetry(atoms: Atoms, center: int, *, cutoff: float, buffer: float, copies: int,
                        rattle: float, contact: float, rng: np.random.Generator,
                        host: Atoms | None) -> list[Embedded]:
    """`copies` embeddings of the centre's sphere in the host supercell, then the pristine host.

    Host atoms within cutoff + buffer of the insertion point, or closer than `contact` to an inserted
    atom, are removed. The pristine host is the host cell itself (the reference crystal's
    conventional cell, or the user's host as given): a perfect crystal's environments do not depend
    on the supercell, so the smallest cell is the cheapest label of the same information.
    """
    radius = cutoff + buffer
    env = carve(atoms, center, radius, "sphere")
    if host is None:
        host_cell, expected = reference_host(env.numbers)
    else:
        host_cell, expected = host.copy(), None
    symmetry = host_symmetry(host_cell, expected)
    host_cell.wrap()
    supercell, repeat, point, far = host_supercell(host_cell, radius, cutoff, contact)
    cell = np.asarray(supercell.cell)

    inserted = point + env.vectors
    _, to_point = get_distances(point[None, :], supercell.positions, cell=cell, pbc=True)
    _, to_inserted = get_distances(inserted, supercell.positions, cell=cell, pbc=True)
    keep = (to_point[0] > radius) & (to_inserted.min(axis=0) >= contact)
    numbers = np.concatenate([env.numbers, supercell.numbers[keep]])
    positions = np.concatenate([inserted, supercell.positions[keep]])
    host_center = len(env.numbers) + int(np.sum(keep[:far]))
    host_point = supercell.positions[far]

    _, to_host_center = get_distances(host_point[None, :], positions, cell=cell, pbc=True)
    movable = np.concatenate([~env.within(cutoff), np.ones(int(keep.sum()), dtype=bool)])
    movable &= to_host_center[0] >= cutoff
    rules = RattleRules(keep_out=[(point, cutoff), (host_point, cutoff)], contact=contact,
                        cell=cell, pbc=True)
    host_record = {"formula": host_cell.get_chemical_formula(), "hash": canonical_hash(host_cell),
                   "space_group": symmetry["number"], "international": symmetry["international"],
                   "supercell": list(repeat), "removed": int((~keep).sum())}
    out = []
    for copy in range(copies):
        rattled = rattle_buffer(positions, numbers, movable, rattle, rng, rules)
        embedded = Atoms(numbers, positions=rattled, cell=cell, pbc=True)
        embedded.wrap()
        out.append(Embedded(embedded, center=0, details={
            "copy": copy, "host": host_record, "host_center": host_center,
            "buffer_atoms": int(movable.sum())}))
    pristine = host_cell.copy()
    pristine.info = {}
    out.append(Embedded(pristine, center=None, details={"host": host_record}, pristine_host=True))
    return out
