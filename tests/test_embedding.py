"""alforge.embedding (METHODS §5): cluster carving, periodic and high-symmetry embedding on real
structures. The geometry is checked against independent brute force (ASE's neighbour list with one
global cutoff, explicit image sums, spglib), never against the module's own helpers."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import spglib
from ase import Atoms
from ase.build import bulk
from ase.geometry import find_mic
from ase.io import read
from ase.neighborlist import neighbor_list

from alforge.embedding import DEFAULT_BUFFER, embed
from alforge.structure_hash import canonical_hash

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # read in place, beside the checkout
CUTOFF = 4.0
STRATEGIES = ["cluster", "periodic", "high_symmetry"]


def si_mlearn() -> Atoms:
    """A 63-atom Si cell (first training frame of Zuo et al. 2020, mlearn)."""
    return read(DATA / "si_mlearn_zuo2020" / "Si_train.xyz", 0)


def si_rattled() -> Atoms:
    """An amorphous-ish Si supercell: 216 diamond atoms rattled by 0.25 Å."""
    atoms = bulk("Si", "diamond", 5.43, cubic=True).repeat(3)
    atoms.rattle(0.25, seed=7)
    return atoms


def cu_vacancy() -> tuple[Atoms, int]:
    """Bulk fcc Cu (107 atoms) with a vacancy, and a nearest neighbour of the vacancy as centre."""
    atoms = bulk("Cu", "fcc", 3.61, cubic=True).repeat(3)
    hole = atoms.positions[13].copy()
    del atoms[13]
    d = np.linalg.norm(atoms.positions - hole, axis=1)
    return atoms, int(np.argmin(d))


def ethanol() -> Atoms:
    return read(DATA / "ethanol_rmd17_botnet" / "train.xyz", 0)


PARENTS = {
    "si_mlearn": lambda: (si_mlearn(), 5),
    "si_rattled": lambda: (si_rattled(), 17),
    "cu_vacancy": cu_vacancy,
}


def brute_vectors(atoms: Atoms, center: int, cutoff: float) -> np.ndarray:
    """The centre's neighbour vectors (all images) from ASE's neighbour list, sorted."""
    i, vectors = neighbor_list("iD", atoms, cutoff)
    return sort_rows(vectors[i == center])


def sort_rows(vectors: np.ndarray) -> np.ndarray:
    key = np.round(vectors, 6)
    return vectors[np.lexsort((key[:, 2], key[:, 1], key[:, 0]))]


def min_image_distance(atoms: Atoms) -> float:
    """Smallest distance between any two atoms, or an atom and its own image, by summing over
    every lattice shift in {-2..2}³ (periodic axes only)."""
    ranges = [range(-2, 3) if p else range(1) for p in atoms.pbc]
    shifts = np.array(list(itertools.product(*ranges))) @ np.asarray(atoms.cell)
    diff = atoms.positions[:, None, :] - atoms.positions[None, :, :]
    best = np.inf
    for shift in shifts:
        d = np.linalg.norm(diff + shift, axis=2)
        if not shift.any():
            np.fill_diagonal(d, np.inf)
        best = min(best, float(d.min()))
    return best


def assert_sane(atoms: Atoms, contact: float) -> None:
    assert abs(atoms.cell.volume) > 1.0
    scaled = atoms.cell.scaled_positions(atoms.positions)
    assert np.all(scaled > -1e-9) and np.all(scaled < 1 + 1e-9)
    assert min_image_distance(atoms) >= contact


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("parent", sorted(PARENTS))
def test_environment_preserved_and_contact_holds(parent, strategy):
    atoms, center = PARENTS[parent]()
    expected = brute_vectors(atoms, center, CUTOFF)
    out = embed(atoms, center, strategy=strategy, cutoff=CUTOFF, copies=2, seed=3)
    embedded = [a for a in out if not a.info["embedding"]["pristine_host"]]
    assert len(embedded) == 2
    for child in out:
        assert_sane(child, 1.0)
    for child in embedded:
        got = brute_vectors(child, child.info["embedding"]["center"], CUTOFF)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
        assert child.pbc.all() == (strategy != "cluster")


@pytest.mark.parametrize("strategy", ["cluster", "periodic"])
def test_molecule_parent(strategy):
    mol = ethanol()
    expected = brute_vectors(mol, 1, 2.0)
    (child,) = embed(mol, 1, strategy=strategy, cutoff=2.0, buffer=1.0)
    np.testing.assert_allclose(brute_vectors(child, 0, 2.0), expected, rtol=0, atol=1e-8)
    assert_sane(child, 1.0)
    assert child.pbc.any() == (strategy == "periodic")


def test_cluster_holds_exactly_the_sphere():
    atoms = si_rattled()
    radius = CUTOFF + DEFAULT_BUFFER
    (child,) = embed(atoms, 17, strategy="cluster", cutoff=CUTOFF, rattle=0.0)
    assert len(child) == 1 + len(brute_vectors(atoms, 17, radius))
    # vacuum: the box leaves `cutoff` of space around the cluster
    extent = child.positions.max(axis=0) - child.positions.min(axis=0)
    np.testing.assert_allclose(child.cell.lengths(), extent + 2 * CUTOFF)


def test_periodic_cell_grows_to_the_contact_distance():
    """Perfect diamond, half-edge a: atoms sit on opposite cube faces, so at edge 2a they would
    coincide with each other's images; the edge must grow to exactly 2a + contact."""
    a = 5.43
    atoms = bulk("Si", "diamond", a, cubic=True).repeat(3)
    (child,) = embed(atoms, 0, strategy="periodic", cutoff=a - 1.0, buffer=1.0, rattle=0.0)
    edge = child.info["embedding"]["cell_edge"]
    assert edge == pytest.approx(2 * a + 1.0, abs=2e-4)
    assert min_image_distance(child) >= 1.0
    squeezed = child.copy()
    squeezed.set_cell(np.eye(3) * (edge - 1e-3), scale_atoms=False)
    assert min_image_distance(squeezed) < 1.0
    # no growth when the faces do not meet: a cube edge of exactly 2(cutoff + buffer)
    (loose,) = embed(atoms, 0, strategy="periodic", cutoff=a - 1.0, buffer=0.6, rattle=0.0)
    assert loose.info["embedding"]["cell_edge"] == pytest.approx(2 * (a - 0.4))


def _centre_vectors(child: Atoms) -> np.ndarray:
    """Minimum-image vectors from the centre (atom 0) to every atom."""
    return child.get_distances(0, range(len(child)), mic=True, vector=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_copies_differ_only_in_buffer_atoms(strategy):
    atoms = si_rattled()
    out = embed(atoms, 17, strategy=strategy, cutoff=CUTOFF, copies=3, rattle=0.2, seed=11)
    (still,) = [a for a in embed(atoms, 17, strategy=strategy, cutoff=CUTOFF, rattle=0.0)
                if not a.info["embedding"]["pristine_host"]]
    copies = [a for a in out if not a.info["embedding"]["pristine_host"]]
    assert len(copies) == 3
    reference = _centre_vectors(still)
    inside = np.linalg.norm(reference, axis=1) < CUTOFF
    if strategy == "high_symmetry":
        host_center = still.info["embedding"]["host_center"]
        d_host = still.get_distances(host_center, range(len(still)), mic=True)
        inside |= d_host < CUTOFF
    moves = []
    for child in copies:
        vectors = _centre_vectors(child)
        np.testing.assert_allclose(vectors[inside], reference[inside], rtol=0, atol=1e-8)
        move, _ = find_mic(vectors[~inside] - reference[~inside], child.cell, child.pbc)
        moves.append(move)
    for move in moves:
        assert np.mean(np.linalg.norm(move, axis=1) > 1e-6) > 0.95  # the buffer is rattled
        assert 0.1 < move.std() < 0.3  # by about σ = 0.2 Å per component
    assert np.abs(moves[0] - moves[1]).max() > 0.05  # and each copy differently


@pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")
@pytest.mark.parametrize(("make", "number", "symbol"), [
    (lambda: (si_rattled(), 17), 227, "Fd-3m"),
    (cu_vacancy, 225, "Fm-3m"),
    (lambda: (bulk("Fe", "bcc", 2.87, cubic=True).repeat(4), 5), 229, "Im-3m"),
    (lambda: (bulk("Ti", "hcp", 2.95, c=4.68).repeat((4, 4, 3)), 7), 194, "P6_3/mmc"),
])
@pytest.mark.parametrize("buffer", [0.0, DEFAULT_BUFFER])
def test_high_symmetry_host(make, number, symbol, buffer):
    """Without a buffer the smallest supercell free of self-contact may hold no intact host
    environment, so this also checks that the supercell grows for one."""
    atoms, center = make()
    out = embed(atoms, center, strategy="high_symmetry", cutoff=3.5, buffer=buffer, copies=1)
    embedded, pristine = out
    assert pristine.info["embedding"]["pristine_host"] is True
    assert pristine.info["embedding"]["center"] is None
    dataset = spglib.get_symmetry_dataset(
        (np.asarray(pristine.cell), pristine.get_scaled_positions(), pristine.numbers), symprec=1e-5)
    assert (dataset.number, dataset.international) == (number, symbol)
    assert set(pristine.numbers) == set(atoms.numbers)
    # far from the insertion, the host atom's environment is the pristine crystal's
    record = embedded.info["embedding"]
    assert record["host"]["space_group"] == number
    host_center = record["host_center"]
    frac = np.linalg.solve(np.asarray(pristine.cell).T, embedded.positions[host_center]) % 1.0
    match = np.linalg.norm((pristine.get_scaled_positions() - frac + 0.5) % 1.0 - 0.5, axis=1)
    twin = int(np.argmin(match))
    assert match[twin] < 1e-8
    np.testing.assert_allclose(brute_vectors(embedded, host_center, 3.5),
                               brute_vectors(pristine, twin, 3.5), rtol=0, atol=1e-8)


def test_user_host():
    atoms, center = cu_vacancy()
    host = bulk("Cu", "fcc", 3.6)  # the 1-atom primitive cell, another lattice constant
    out = embed(atoms, center, strategy="high_symmetry", cutoff=CUTOFF, host=host)
    embedded, pristine = out
    assert len(pristine) == 1 and pristine.cell.lengths() == pytest.approx(host.cell.lengths())
    assert embedded.info["embedding"]["host"]["hash"] == canonical_hash(host)
    np.testing.assert_allclose(brute_vectors(embedded, 0, CUTOFF), brute_vectors(atoms, center, CUTOFF),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_provenance(strategy):
    atoms, center = cu_vacancy()
    out = embed(atoms, center, strategy=strategy, cutoff=CUTOFF, buffer=1.5, copies=2, rattle=0.1,
                contact=0.9, seed=5)
    for k, child in enumerate(out):
        record = child.info["embedding"]
        json.dumps(record)  # storable as the candidate's provenance
        assert record["strategy"] == strategy
        assert record["parent"] == canonical_hash(atoms)
        assert record["parent_center"] == center
        assert record["cutoff"] == CUTOFF and record["buffer"] == 1.5 and record["seed"] == 5
        assert record["parameters"] == {"copies": 2, "rattle": 0.1, "contact": 0.9}
        if record["pristine_host"]:
            assert k == len(out) - 1 and record["center"] is None
        else:
            assert record["copy"] == k
            assert child.numbers[record["center"]] == atoms.numbers[center]
    assert len(out) == (3 if strategy == "high_symmetry" else 2)
    again = embed(atoms, center, strategy=strategy, cutoff=CUTOFF, buffer=1.5, copies=2, rattle=0.1,
                  contact=0.9, seed=5)
    assert [canonical_hash(a) for a in again] == [canonical_hash(a) for a in out]  # seeded


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_insane_structures_are_discarded_with_a_logged_reason(strategy, caplog):
    """Two atoms 0.8 Å apart inside the cutoff: no strategy may move them, so every structure that
    holds them breaks the contact distance and is dropped with a warning."""
    atoms, center = cu_vacancy()
    i, j, d = neighbor_list("ijd", atoms, 2.6)
    neighbour = int(j[(i == center)][0])
    direction = atoms.positions[neighbour] - atoms.positions[center]
    atoms.positions[neighbour] = atoms.positions[center] + 0.8 * direction / np.linalg.norm(direction)
    with caplog.at_level(logging.WARNING, logger="alforge.embedding"):
        out = embed(atoms, center, strategy=strategy, cutoff=CUTOFF, copies=2)
    assert all(a.info["embedding"]["pristine_host"] for a in out)  # only the pristine host survives
    messages = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert len(messages) == 2
    assert all("closer than the contact distance 1.0" in m for m in messages)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"strategy": "slab"}, "strategy"),
    ({"center": 107}, "center"),
    ({"center": -1}, "center"),
    ({"center": 1.5}, "center"),
    ({"cutoff": 0.0}, "cutoff"),
    ({"cutoff": -3.0}, "cutoff"),
    ({"cutoff": float("nan")}, "cutoff"),
    ({"buffer": -1.0}, "buffer"),
    ({"copies": 0}, "copies"),
    ({"rattle": -0.1}, "rattle"),
    ({"strategy": "periodic", "host": bulk("Cu")}, "host"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    atoms, _ = cu_vacancy()
    call = {"center": 0, "strategy": "cluster", "cutoff": CUTOFF, **kwargs}
    center = call.pop("center")
    with pytest.raises(ValueError, match=rf"^{name}: "):
        embed(atoms, center, **call)


def test_high_symmetry_needs_a_host_for_mixed_chemistry_or_a_low_symmetry_host():
    with pytest.raises(ValueError, match=r"^host: .*C, H, O.*mixed chemistry"):
        embed(ethanol(), 0, strategy="high_symmetry", cutoff=2.0)
    glass = bulk("Cu", "fcc", 3.61, cubic=True).repeat(2)
    glass.rattle(0.1, seed=1)
    atoms, center = cu_vacancy()
    with pytest.raises(ValueError, match=r"^host: space group P1 \(#1\).*triclinic"):
        embed(atoms, center, strategy="high_symmetry", cutoff=CUTOFF, host=glass)
    with pytest.raises(ValueError, match=r"^host: ASE's reference state of O is 'diatom'"):
        embed(Atoms("O2", positions=[[0, 0, 0], [0, 0, 1.2]]), 0, strategy="high_symmetry", cutoff=2.0)


def test_bond_contact_follows_the_chemistry():
    from ase.build import molecule

    from alforge.embedding.checks import bond_contact

    assert bond_contact(bulk("Si", "diamond", 5.43)) == pytest.approx(0.85 * 2 * 1.11)
    assert bond_contact(molecule("CH4")) == pytest.approx(0.85 * 2 * 0.31), "the shortest: H-H"
    with pytest.raises(ValueError, match="no atoms"):
        bond_contact(Atoms())
