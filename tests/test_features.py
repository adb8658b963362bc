"""Tests of the fast feature path (issue 12): the graphs ``compute_features`` builds itself, batching
by atom count, the radial MLP shared by an edge and its reverse, and agreement with mace's own
batching and with ``MACECalculator.get_descriptors``.

One tiny float64 model (8 channels, max_L 1 so the interactions carry non-scalar messages) is
trained for one epoch per module: the checks compare ways of evaluating the same model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import alforge.mlip.mace_import  # noqa: F401  # isort: skip  (before e3nn: see there)
from e3nn.nn import FullyConnectedNet  # isort: skip
from alforge.mlip.device import default_dtype
from alforge.mlip.features import (
    _edge_pairs,
    _graph,
    _hooked,
    _shared_radial_mlp,
    _species,
    compute_features,
)
from alforge.mlip.jacobians import atom_batches
from alforge.mlip.mace_model import (
    iterate_batches,
    load_calculator,
    load_model,
    model_z_table,
    train_mace,
    unlabelled_config,
)
from alforge.mlip.params import MACEParams
from cu_cells import cu_cells, cu_cluster

TINY = dict(num_channels=8, max_L=1, max_ell=2, mlp_irreps="8x0e", batch_size=4, device="cpu", max_epochs=1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("features") / "model.pt"
    train_mace(cu_cells(6, seed=0), MACEParams(**TINY), path)
    return path


def _slab() -> Atoms:
    """Periodic in x and y only: mace replaces the cell's z row before building the neighbour list."""
    atoms = bulk("Cu", "fcc", 3.6, cubic=True).repeat((2, 1, 1))
    atoms.pbc = (True, True, False)
    atoms.rattle(0.05, seed=5)
    return atoms


def _lone_atoms() -> Atoms:
    """Two atoms farther apart than any cutoff: a graph without edges."""
    return Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]])


def _structures() -> list[Atoms]:
    """Mixed sizes (4, 8, 32 atoms) and boundary conditions, in an order that splits batches unevenly."""
    big = bulk("Cu", "fcc", 3.61, cubic=True).repeat((2, 2, 2))
    big.rattle(0.05, seed=7)
    return [*cu_cells(3, seed=1), big, cu_cluster(), _slab(), _lone_atoms(), *cu_cells(2, seed=2)]


def _former_features(model: torch.nn.Module, structures: list[Atoms]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """``(last_layer, invariant, energy)`` the way ``compute_features`` computed them before issue 12:
    mace's ``AtomicData``/DataLoader batching, the model's own forward pass, nothing shared."""
    out = []
    with _hooked(model) as read, default_dtype(torch.float64), torch.no_grad():
        configs = [unlabelled_config(a) for a in structures]
        for batch in iterate_batches(configs, model_z_table(model), float(model.r_max), 3):
            energy = model(batch.to_dict(), training=False, compute_force=False)["energy"].numpy()
            last_layer, invariant = (t.numpy() for t in read())
            ptr = batch.ptr.numpy()
            out += [(last_layer[a:b], invariant[a:b], float(e)) for a, b, e in zip(ptr[:-1], ptr[1:], energy)]
    return out


class _TinyZ(torch.nn.Module):
    """Just the element table of a Cu-only model (``model_z_table`` reads ``atomic_numbers``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("atomic_numbers", torch.tensor([29]))


def test_graph_equals_mace_batch() -> None:
    """Tensor by tensor, for the keys the forward pass reads, including pbc edge cases."""
    structures = _structures()
    z_table = model_z_table(_TinyZ())
    with default_dtype(torch.float64):
        (reference,) = iterate_batches([unlabelled_config(a) for a in structures], z_table, 4.5, len(structures))
        graph, pairs = _graph(structures, _species(structures, z_table), len(z_table), 4.5, "cpu")
    reference = reference.to_dict()
    for key, value in graph.items():
        assert value.dtype == reference[key].dtype and torch.equal(value, reference[key]), key
    assert pairs is not None and pairs[1].shape[0] == graph["edge_index"].shape[1]


def test_edge_pairs_join_each_edge_with_its_reverse() -> None:
    structures = _structures()
    z_table = model_z_table(_TinyZ())
    with default_dtype(torch.float64):
        graph, (first, inverse) = _graph(structures, _species(structures, z_table), len(z_table), 4.5, "cpu")
    edges = graph["edge_index"].numpy()
    shifts = graph["unit_shifts"].numpy().astype(int)
    keys = {(int(i), int(j), *map(int, s)): e for e, (i, j, s) in enumerate(zip(edges[0], edges[1], shifts))}
    for e, (i, j, s) in enumerate(zip(edges[0], edges[1], shifts)):
        reverse = keys[(int(j), int(i), *map(int, -s))]
        assert inverse[e] == inverse[reverse]
    assert np.bincount(inverse.numpy()).tolist() == [2] * len(first)  # exactly the two directions
    assert _edge_pairs(np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3))) is None


def test_shared_mlp_evaluates_half_the_rows_and_falls_back_when_rows_differ() -> None:
    torch.manual_seed(0)
    mlp = FullyConnectedNet([3, 5, 2], torch.nn.functional.silu).double()
    holder = torch.nn.Module()
    holder.conv_tp_weights = mlp
    model = torch.nn.Module()
    model.interactions = torch.nn.ModuleList([holder])
    rows_seen: list[int] = []  # rows the MLP's first layer computes
    next(iter(mlp.children())).register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[0]))
    pairs = (torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]))
    half = torch.randn(2, 3, dtype=torch.float64)
    symmetric, asymmetric = half[[0, 1, 0, 1]], torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = [mlp(x) for x in (symmetric, asymmetric)]
        rows_seen.clear()
        with _shared_radial_mlp(model) as set_pairs:
            set_pairs(pairs)
            shared = [mlp(x) for x in (symmetric, asymmetric)]
        after = mlp(symmetric)
    assert rows_seen[:2] == [2, 4]  # shared for the symmetric rows, all rows otherwise
    for got, want in zip(shared, expected):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert rows_seen[-1] == 4 and torch.equal(after, expected[0])  # hooks removed on exit


@pytest.mark.slow
def test_features_equal_the_former_implementation(model_path: Path) -> None:
    """Own graphs, atom batches and the shared radial MLP change nothing beyond rounding."""
    structures = _structures()
    model = load_model(model_path, "cpu")
    former = _former_features(model, structures)
    feats = compute_features(model, structures, device="cpu")
    for (last_layer, invariant, energy), f in zip(former, feats, strict=True):
        np.testing.assert_allclose(f.last_layer, last_layer, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(f.invariant, invariant, rtol=1e-10, atol=1e-13)
        assert f.energy == pytest.approx(energy, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "atoms_per_batch, batch_size", [(None, None), (1, None), (20, None), (10**6, None), (10**6, 3)]
)
def test_atom_batching_matches_one_structure_per_batch(
    model_path: Path, atoms_per_batch: int | None, batch_size: int | None
) -> None:
    structures = _structures()
    model = load_model(model_path, "cpu")
    single = compute_features(model, structures, device="cpu", batch_size=1)
    batched = compute_features(
        model, structures, device="cpu", batch_size=batch_size, atoms_per_batch=atoms_per_batch
    )
    assert [len(f.last_layer) for f in batched] == [len(a) for a in structures]
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.last_layer, s.last_layer, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(b.invariant, s.invariant, rtol=1e-10, atol=1e-13)
        np.testing.assert_array_equal(b.e0, s.e0)
        assert b.energy == pytest.approx(s.energy, rel=1e-12)


@pytest.mark.slow
def test_invariants_equal_mace_descriptors(model_path: Path) -> None:
    """The invariant features are the last layer's columns of ``MACECalculator.get_descriptors``."""
    structures = _structures()[:6]
    calc = load_calculator(model_path, device="cpu")
    feats = compute_features(model_path, structures, device="cpu")
    for atoms, f in zip(structures, feats):
        descriptors = calc.get_descriptors(atoms, invariants_only=True)
        np.testing.assert_allclose(f.invariant, descriptors[:, -f.invariant.shape[1] :], rtol=1e-10, atol=1e-13)


def test_atom_batches_respect_both_limits() -> None:
    assert atom_batches([4, 4, 4, 4, 4], 8) == [range(0, 2), range(2, 4), range(4, 5)]
    assert atom_batches([4, 4, 4, 4, 4], 100, max_structures=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert atom_batches([50, 4, 4], 8) == [range(0, 1), range(1, 3)]  # too big: alone
    assert atom_batches([3, 3, 3], 8, max_structures=1) == [range(0, 1), range(1, 2), range(2, 3)]


@pytest.mark.parametrize("field", ["batch_size", "atoms_per_batch"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_batch_limits_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        compute_features(Path("unused.pt"), cu_cells(1, seed=0), device="cpu", **{field: value})
