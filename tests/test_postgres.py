"""The store on a real PostgreSQL server (the throwaway one of ``conftest.postgres_server``).

SQLite is the default store, but a cluster shares one PostgreSQL database between campaigns and
hosts; a schema or query that only SQLite forgives (types, constraint names, transaction
semantics) must fail here, not on a user's cluster. So: the Alembic migrations build the schema
on an empty PostgreSQL database and it matches the ORM; every kind of row round-trips exactly; and
a real campaign killed mid-labelling resumes on PostgreSQL with nothing recomputed or retrained.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from ase import Atoms
from ase.build import bulk, molecule
from sqlalchemy import inspect

from alforge.storage import Store
from alforge.storage.models import Base
from alforge.storage.schema import alembic_config
from alforge.storage.store import LabelRecord
from alforge.structure_hash import canonical_hash
from conftest import TESTS, tiny_campaign


@pytest.fixture()
def store(postgres_db_url: str):
    s = Store(postgres_db_url)
    yield s
    s.close()


def test_migrations_build_the_schema_and_match_the_orm(store):
    assert store.engine.dialect.name == "postgresql"
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert set(inspect(store.engine).get_table_names()) >= set(Base.metadata.tables)


def test_migrating_again_is_a_no_op(postgres_db_url):
    """A second process opening the same database (every campaign run does) changes nothing."""
    first = Store(postgres_db_url)
    cid = first.get_or_create_campaign("c", {"k": 1})
    second = Store(postgres_db_url)
    assert second.campaign_id("c") == cid
    first.close()
    second.close()


def _periodic() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=1)
    atoms.info.update({"temperature": 300.0, "tag": "md", "vec": np.arange(3.0), "n": 7})
    atoms.new_array("charges", np.linspace(-1, 1, len(atoms)))
    return atoms


def test_structures_round_trip_exactly_and_deduplicate(store):
    cid = store.get_or_create_campaign("c", {"k": 1})
    atoms, water = _periodic(), molecule("H2O")
    noisy = atoms.copy()
    noisy.positions += 1e-12  # the same structure by canonical hash
    ids = store.add_structures(cid, [atoms, water, noisy], role="seed", source="test")
    assert ids[0] == ids[2] != ids[1]
    back, back_water = store.get_atoms(ids[:2])
    assert np.array_equal(back.positions, atoms.positions)  # float64 bytes, bit-exact
    assert np.array_equal(back.cell.array, atoms.cell.array) and np.array_equal(back.pbc, atoms.pbc)
    assert np.array_equal(back.arrays["charges"], atoms.arrays["charges"])
    assert back.info["temperature"] == 300.0 and np.array_equal(back.info["vec"], np.arange(3.0))
    assert not back_water.pbc.any() and back_water.get_chemical_formula() == "H2O"


def test_labels_models_features_hessians_selections(store):
    cid = store.get_or_create_campaign("c", {})
    sids = store.add_structures(cid, [_periodic(), molecule("H2O")], role="seed", source="t")
    store.request_labels(sids, "emt", "h")
    store.request_labels(sids, "emt", "h")  # idempotent
    (lid0, _), (lid1, _) = store.unfinished_labels(cid)
    assert store.start_label(lid0)
    forces = np.random.default_rng(0).normal(size=(8, 3))
    store.finish_label(lid0, LabelRecord("done", energy=-1.5, forces=forces, stress=np.eye(3), wall_time=0.1),
                       attempts=[{"kwargs": {"x": 1}, "decision": "accept"}])
    assert not store.start_label(lid0), "a finished label is never restarted"
    assert store.start_label(lid1)
    store.finish_label(lid1, LabelRecord("failed", failure_class="crash", error="boom"), quarantine=True)
    assert store.label_counts(cid) == {"done": 1, "failed": 1}
    assert store.quarantined_ids(cid) == [sids[1]]
    assert [a.attempt for a in store.attempts(lid0)] == [1]
    (labelled,) = store.get_labelled_atoms([sids[0]])
    assert labelled.get_potential_energy() == -1.5 and np.array_equal(labelled.get_forces(), forces)

    it = store.get_or_create_iteration(cid, 1)
    mid = store.add_model(cid, it, "/m.model", sids[:1], {"train_forces_rmse": 0.1})
    store.update_model_metrics(mid, {"test_forces_rmse": 0.2})
    assert store.model_for_iteration(it).metrics == {"train_forces_rmse": 0.1, "test_forces_rmse": 0.2}
    feats = {sids[0]: np.arange(40.0).reshape(8, 5), sids[1]: np.ones((3, 5))}
    store.put_features(mid, {"last_layer": (feats, "<f8")})
    store.put_features(mid, {"last_layer": (feats, "<f8")})  # replaces, never duplicates
    assert store.feature_count(cid) == 2
    back = store.get_features(mid, "last_layer", [sids[1], sids[0]])
    assert np.array_equal(back[0], feats[sids[1]]) and np.array_equal(back[1], feats[sids[0]])
    matrix = np.random.default_rng(1).normal(size=(4, 4))
    store.put_hessian(mid, "loss", matrix, 1e-3, "weight_decay", {"energy": 1.0}, 2)
    store.put_hessian(mid, "loss", 2 * matrix, 1e-3, "weight_decay", {"energy": 1.0}, 2)
    assert np.array_equal(store.get_hessian(mid, "loss")["matrix"], 2 * matrix)
    store.add_selection(it, mid, "mig", {"a": 1}, sids, [sids[1]], [0.5])
    sel = store.selection_for_iteration(it)
    assert list(sel["picked_ids"]) == [sids[1]] and sel["scores"][0] == 0.5


def _done_labels(url: str) -> dict[int, tuple]:
    """structure id -> (finished_at, energy) of done labels; empty while the store is being made."""
    store = Store(url)
    try:
        cids = [c.id for c in store.campaigns()]
        if not cids:
            return {}
        return {l.structure_id: (l.finished_at, l.energy)
                for l in store.labels(store.structure_ids(cids[0])) if l.status == "done"}
    finally:
        store.close()


@pytest.mark.slow
def test_killed_campaign_resumes_on_postgres_recomputing_nothing(tmp_path, postgres_db_url, prefect_harness):
    """SIGKILL an ``alforge run`` mid-labelling; the resume labels only what was left and trains
    model 1 once; a further rerun of the finished campaign recomputes and retrains nothing."""
    from alforge.flows.campaign import campaign

    log = tmp_path / "calls.log"
    path = tiny_campaign(
        tmp_path,
        store=postgres_db_url,
        labeller={"name": "slow_emt:make", "kwargs": {"delay": 0.7, "log": str(log)}},
        stopping={"max_iterations": 1},
    )
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "alforge.cli", "run", str(path)]
    output = tmp_path / "run.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300  # generous: Prefect's start-up on a loaded machine
    try:
        while time.time() < deadline and len(_done_labels(postgres_db_url)) < 3:
            assert proc.poll() is None, f"the campaign ended before it could be killed:\n{output.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _done_labels(postgres_db_url)
    assert 3 <= len(done_before) < 10, "the kill must land mid-labelling"

    result = campaign(str(path))  # in-process: slow_emt imports from tests/, on pytest's path
    assert result["stop_reason"] == "reached max_iterations = 1"
    done_after = _done_labels(postgres_db_url)
    assert len(done_after) == 6 + 4, "every seed and test structure ends up labelled"
    for sid, record in done_before.items():
        assert done_after[sid] == record, f"finished label of structure {sid} was rewritten"
    calls = [line.split()[1] for line in log.read_text().splitlines()]
    assert len(calls) == len(set(calls)) == 10, "each structure computed exactly once over both runs"

    store = Store(postgres_db_url)
    cid = store.campaign_id("tiny")
    (model,) = store.models(cid)
    stamp = Path(model.path).stat().st_mtime_ns
    assert set(canonical_hash(a) for a in store.get_atoms(list(done_after))) == set(calls)

    campaign(str(path))
    assert [m.id for m in store.models(cid)] == [model.id], "nothing retrained"
    assert Path(model.path).stat().st_mtime_ns == stamp
    assert _done_labels(postgres_db_url) == done_after
    assert len(log.read_text().splitlines()) == 10, "nothing relabelled"
    store.close()
