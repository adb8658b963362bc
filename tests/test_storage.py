"""Store: exact Atoms round-trip, dedup, label state machine, features, schema = migrations."""

from __future__ import annotations

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from ase import Atoms
from ase.build import bulk, molecule

from alforge.storage import Store
from alforge.storage.models import Base
from alforge.storage.store import LabelRecord


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


@pytest.fixture()
def cid(store):
    return store.get_or_create_campaign("c", {"k": 1})


def _periodic() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=1)
    atoms.info.update({"temperature": 300.0, "tag": "md", "vec": np.arange(3.0), "n": 7})
    atoms.new_array("charges", np.linspace(-1, 1, len(atoms)))
    atoms.set_tags(np.arange(len(atoms)))
    return atoms


def _molecule() -> Atoms:
    atoms = molecule("H2O")
    atoms.info["name"] = "water"
    return atoms


@pytest.mark.parametrize("make", [_periodic, _molecule])
def test_atoms_round_trip_is_exact(store, cid, make):
    atoms = make()
    (sid,) = store.add_structures(cid, [atoms], role="seed", source="test")
    (back,) = store.get_atoms([sid])
    assert np.array_equal(back.numbers, atoms.numbers)
    assert np.array_equal(back.positions, atoms.positions)  # bit-exact
    assert np.array_equal(back.cell.array, atoms.cell.array)
    assert np.array_equal(back.pbc, atoms.pbc)
    for key, value in atoms.info.items():
        assert np.array_equal(back.info[key], value), key
    assert set(back.arrays) == set(atoms.arrays)
    for key, value in atoms.arrays.items():
        assert np.array_equal(back.arrays[key], value), key
    assert back.info["alforge_id"] == sid


def test_dedup_by_canonical_hash(store, cid):
    a = _periodic()
    noisy = a.copy()
    noisy.positions += 1e-12  # text-format noise: the same structure
    moved = a.copy()
    moved.positions[0, 0] += 0.01  # a different structure
    ids = store.add_structures(cid, [a, noisy, moved, a], role="candidate", source="md")
    assert ids[0] == ids[1] == ids[3] != ids[2]
    assert store.add_structures(cid, [a], role="seed", source="again") == [ids[0]]
    assert len(store.structure_ids(cid)) == 2
    other = store.get_or_create_campaign("other", {})
    assert store.add_structures(other, [a], role="seed", source="x") != [ids[0]]


def test_label_state_machine_and_labelled_atoms(store, cid):
    atoms = [_periodic(), _molecule()]
    sids = store.add_structures(cid, atoms, role="seed", source="test")
    store.request_labels(sids, "emt", "h")
    store.request_labels(sids, "emt", "h")  # idempotent
    todo = store.unfinished_labels(cid)
    assert [s for _, s in todo] == sids
    lid0, lid1 = (lid for lid, _ in todo)
    assert store.start_label(lid0)
    forces = np.random.default_rng(0).normal(size=(len(atoms[0]), 3))
    stress = np.eye(3) * 0.01
    store.finish_label(lid0, LabelRecord("done", energy=-1.5, forces=forces, stress=stress, wall_time=0.1))
    assert not store.start_label(lid0), "a finished label must never be restarted"
    assert store.start_label(lid1)
    store.finish_label(lid1, LabelRecord("failed", failure_class="crash", error="boom"))
    assert store.unfinished_labels(cid) == []
    assert store.labelled_ids(cid) == [sids[0]]
    assert store.label_counts(cid) == {"done": 1, "failed": 1}
    (back,) = store.get_labelled_atoms([sids[0]])
    assert back.get_potential_energy() == -1.5
    assert np.array_equal(back.get_forces(), forces)
    assert np.array_equal(back.calc.results["stress"], stress)


def test_running_label_of_a_killed_run_is_unfinished(store, cid):
    (sid,) = store.add_structures(cid, [_molecule()], role="seed", source="t")
    store.request_labels([sid], "emt", "h")
    ((lid, _),) = store.unfinished_labels(cid)
    store.start_label(lid)  # process dies here
    assert store.unfinished_labels(cid) == [(lid, sid)]


def test_features_and_models(store, cid):
    sids = store.add_structures(cid, [_periodic(), _molecule()], role="seed", source="t")
    it = store.get_or_create_iteration(cid, 1)
    assert store.get_or_create_iteration(cid, 1) == it
    mid = store.add_model(cid, it, "/m.model", sids, {"train_forces_rmse": 0.1})
    store.update_model_metrics(mid, {"test_forces_rmse": 0.2})
    info = store.model_for_iteration(it)
    assert info.metrics == {"train_forces_rmse": 0.1, "test_forces_rmse": 0.2}
    assert list(info.train_ids) == sids
    feats = {sids[0]: np.arange(16 * 5.0).reshape(16, 5), sids[1]: np.ones((3, 5))}
    assert store.missing_features(mid, "last_layer", sids) == sids
    store.put_features(mid, {"last_layer": (feats, "<f8")})
    store.put_features(mid, {"last_layer": (feats, "<f8")})  # replaces, never duplicates
    assert store.missing_features(mid, "last_layer", sids) == []
    back = store.get_features(mid, "last_layer", [sids[1], sids[0]])
    assert np.array_equal(back[0], feats[sids[1]]) and np.array_equal(back[1], feats[sids[0]])
    with pytest.raises(KeyError, match="invariant"):
        store.get_features(mid, "invariant", sids)
    store.add_selection(it, mid, "mig", {"a": 1}, sids, [sids[1]], [0.5])
    sel = store.selection_for_iteration(it)
    assert list(sel["picked_ids"]) == [sids[1]] and sel["scores"][0] == 0.5


def test_sqlite_runs_with_wal_and_foreign_keys(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_migrations_match_the_orm(store):
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
