"""The store on a real PostgreSQL server (the throwaway one of ``conftest.postgres_server``).

SQLite is the default store, but a cluster shares one PostgreSQL database between campaigns and
hosts; a schema or query that only SQLite forgives (types, constraint names, transaction
semantics) must fail here, not on a user's cluster. So: the Alembic migrations build the schema
on an empty PostgreSQL database and it matches the ORM; every kind of row round-trips exactly; a
real campaign killed mid-labelling resumes on PostgreSQL with nothing recomputed or retrained; two
campaigns run on one database at once; a transaction the server aborts (serialization failure,
deadlock, dropped connection, each provoked for real) is re-run whole, and given up on by name;
and a PostgreSQL URL without psycopg installed is one line naming the extra.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from ase import Atoms
from ase.build import bulk, molecule
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import DBAPIError

from alforge.storage import Store
from alforge.storage import models as orm
from alforge.storage import transactions
from alforge.storage.models import Base
from alforge.storage.schema import alembic_config
from alforge.storage.store import LabelRecord
from alforge.storage.transactions import StoreRetryError, run_with_retries
from alforge.storage.urls import StoreError
from alforge.structure_hash import canonical_hash
from conftest import TESTS, tiny_campaign
from test_retry import CLI, ENV, _attempts_per_label, _kill


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
    """A second process opening the same database (every campaign run does) changes nothing; a
    ``postgresql://`` URL without a driver opens it with psycopg (SQLAlchemy would pick psycopg2)."""
    first = Store(postgres_db_url)
    cid = first.get_or_create_campaign("c", {"k": 1})
    second = Store(postgres_db_url.replace("postgresql+psycopg://", "postgresql://"))
    assert second.engine.dialect.driver == "psycopg"
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


# ------------------------------------------------------------------ retries, pools, the driver


@pytest.fixture()
def quick_retries(monkeypatch):
    """Few attempts and short pauses: the retry logic, not the waiting, is under test."""
    monkeypatch.setattr(transactions, "ATTEMPTS", 4)
    monkeypatch.setattr(transactions, "BACKOFF_BASE_S", 0.001)


def _bump_status(store: Store, cid: int, calls: list[int], interfere: int) -> str:
    """One REPEATABLE READ transaction that reads the campaign row, then updates it; in its first
    ``interfere`` runs another transaction commits an update of the same row in between, so
    PostgreSQL aborts this one with a serialization failure (40001) — no mock involved."""
    calls.append(1)
    with store.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        status = conn.execute(text("SELECT status FROM campaigns WHERE id = :id"), {"id": cid}).scalar_one()
        if len(calls) <= interfere:
            with store.engine.begin() as other:
                other.execute(text("UPDATE campaigns SET status_message = 'other' WHERE id = :id"), {"id": cid})
        conn.execute(text("UPDATE campaigns SET status = :s WHERE id = :id"), {"s": status + "+", "id": cid})
    return status


def test_a_real_serialization_failure_is_retried_then_given_up_by_name(store, quick_retries):
    cid = store.get_or_create_campaign("c", {})
    store.set_campaign_status(cid, "s")
    calls: list[int] = []
    assert run_with_retries(lambda: _bump_status(store, cid, calls, interfere=2), "bump status") == "s"
    assert len(calls) == 3, "two aborted runs, then one that committed"
    (row,) = store.campaigns()
    assert (row.status, row.status_message) == ("s+", "other"), "the aborted runs left nothing behind"

    calls.clear()
    with pytest.raises(StoreRetryError) as err:
        run_with_retries(lambda: _bump_status(store, cid, calls, interfere=99), "bump status", where=store.url)
    assert len(calls) == 4
    message = str(err.value)
    assert message.startswith(f"store {store.url}: bump status gave up after 4 attempts")
    assert "serialization failure (40001)" in message and "\n" not in message
    assert store.campaigns()[0].status == "s+", "the given-up transaction changed nothing"


def test_a_connection_lost_at_commit_is_not_retried():
    """A transaction whose COMMIT lost its connection may have committed: re-running it could apply
    it twice, so only a connection lost while a statement ran is retried."""
    def lost(statement: str | None) -> DBAPIError:
        return DBAPIError(statement, None, Exception("server closed the connection"), connection_invalidated=True)

    assert transactions.retry_reason(lost("UPDATE labels SET status = 'done'")) == "connection lost"
    assert transactions.retry_reason(lost(None)) is None
    calls: list[int] = []

    def commit_fails() -> None:
        calls.append(1)
        raise lost(None)

    with pytest.raises(DBAPIError):
        run_with_retries(commit_fails, "commit")
    assert calls == [1]


def _fail_attempt_inserts(store: Store, times: int, how: str) -> None:
    """A trigger that makes the first ``times`` INSERTs into label_attempts fail on the server: with
    SQLSTATE ``how`` raised there, or (``how="disconnect"``) by the server ending the session. A
    sequence counts them: it is not rolled back with the aborted transaction."""
    action = ("PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);" if how == "disconnect"
              else f"RAISE EXCEPTION 'injected failure' USING ERRCODE = '{how}';")
    with store.engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE attempt_faults"))
        conn.execute(text(f"""
            CREATE FUNCTION attempt_fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('attempt_faults') <= {times} THEN {action} END IF;
                RETURN NEW;
            END $$"""))
        conn.execute(text("CREATE TRIGGER attempt_fault BEFORE INSERT ON label_attempts "
                          "FOR EACH STATEMENT EXECUTE FUNCTION attempt_fault()"))


def _runs(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT last_value FROM attempt_faults")).scalar_one()


@pytest.mark.parametrize("how", ["40001", "40P01", "disconnect"])
def test_a_store_transaction_aborted_midway_is_rerun_whole(store, quick_retries, how):
    """finish_label marks the label done and then inserts its attempts; an abort at the insert
    rolls the whole transaction back and the re-run applies all of it once."""
    cid = store.get_or_create_campaign("c", {})
    (sid,) = store.add_structures(cid, [_periodic()], role="seed", source="t")
    store.request_labels([sid], "emt", "h")
    ((lid, _),) = store.unfinished_labels(cid)
    assert store.start_label(lid, owner="me")
    _fail_attempt_inserts(store, 2, how)
    record = LabelRecord("done", energy=-1.0, forces=np.zeros((8, 3)))
    assert store.finish_label(lid, record, attempts=[{"decision": "accept"}], owner="me")
    assert _runs(store) == 3, "two aborted transactions, then the one that committed"
    (label,) = store.labels([sid])
    assert label.status == "done" and label.energy == -1.0
    assert _attempts_per_label(store) == Counter({lid: 1}), "the attempt is stored once"


def test_a_transaction_aborted_every_time_is_given_up_naming_the_method(store, quick_retries):
    cid = store.get_or_create_campaign("c", {})
    (sid,) = store.add_structures(cid, [_periodic()], role="seed", source="t")
    store.request_labels([sid], "emt", "h")
    ((lid, _),) = store.unfinished_labels(cid)
    assert store.start_label(lid, owner="me")
    _fail_attempt_inserts(store, 99, "40P01")
    with pytest.raises(StoreRetryError, match=r"Store\.finish_label gave up after 4 attempts.*deadlock \(40P01\)"):
        store.finish_label(lid, LabelRecord("done", energy=-1.0), attempts=[{"decision": "accept"}], owner="me")
    assert _runs(store) == 4
    (label,) = store.labels([sid])
    assert label.status == "running" and label.claim_owner == "me", "nothing of it was applied"


def test_many_labelling_threads_share_the_pool(store):
    """20 threads, more than the pool keeps open (POOL_SIZE), hold a connection at the same time
    (a bounded pool would make some wait past its timeout, and the barrier would break), then
    claim and finish labels at once: each label is finished by exactly one of them."""
    cid = store.get_or_create_campaign("c", {})
    cells = []
    for k in range(24):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=k + 1)
        cells.append(atoms)
    store.request_labels(store.add_structures(cid, cells, role="seed", source="t"), "emt", "h")
    lids = [lid for lid, _ in store.unfinished_labels(cid)]
    together = threading.Barrier(20, timeout=120)

    def work(worker: int) -> int:
        with store.session() as s:
            s.execute(text("SELECT 1"))
            together.wait()
        mine = 0
        for lid in lids:
            if store.start_label(lid, owner=f"w{worker}"):
                record = LabelRecord("done", energy=float(worker), forces=np.zeros((4, 3)))
                mine += store.finish_label(lid, record, attempts=[{"decision": "accept"}], owner=f"w{worker}")
        return mine

    with ThreadPoolExecutor(max_workers=20) as pool:
        finished = list(pool.map(work, range(20)))
    assert sum(finished) == len(lids) == 24
    assert store.label_counts(cid) == {"done": 24}
    assert set(_attempts_per_label(store).values()) == {1}


@pytest.mark.parametrize("url", ["postgresql+psycopg://alforge:s3cret@127.0.0.1:1/db",
                                 "postgresql://alforge:s3cret@127.0.0.1:1/db",
                                 "postgres://alforge:s3cret@127.0.0.1:1/db"])
def test_a_postgresql_url_without_psycopg_names_the_extra(monkeypatch, capsys, url):
    """psycopg is an extra: without it (an import that fails, as if it were not installed) a store
    on PostgreSQL is one line, through the API and the CLI, naming what to install."""
    from alforge.cli import main

    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StoreError) as err:
        Store(url)
    message = str(err.value)
    assert "psycopg" in message and "pip install 'alforge[postgres]'" in message
    assert "s3cret" not in message and "\n" not in message
    assert main(["status", "--store", url]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"alforge: {message}"


@pytest.mark.slow
def test_two_campaigns_on_one_postgres_store_at_once(tmp_path, postgres_server, postgres_db_url, prefect_harness):
    """Two ``alforge run`` processes on two campaigns of one new PostgreSQL database (the same seed
    structures, so only the campaign tells them apart), three labelling threads each: both finish,
    each campaign's structures and labels are its own, each label computed and stored once. Both
    report to the test harness's Prefect server (one server to start, not an ephemeral one each)."""
    from prefect.settings import PREFECT_API_URL

    env = dict(ENV, PREFECT_API_URL=PREFECT_API_URL.value())
    server_log = postgres_server.root / "server.log"
    log_start = server_log.stat().st_size
    runs = {}
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        log = tmp_path / name / "calls.log"
        path = tiny_campaign(
            tmp_path / name, name=name, store=postgres_db_url, stopping={"max_iterations": 1},
            mlip={"max_epochs": 2},
            labeller={"name": "slow_emt:make", "kwargs": {"delay": 0.05, "log": str(log)}, "concurrency": 3},
        )
        with open(tmp_path / name / "run.log", "w") as out:
            proc = subprocess.Popen([*CLI, "run", str(path)], env=env, stdout=out, stderr=subprocess.STDOUT)
        runs[name] = (proc, log)
    try:
        for name, (proc, _) in runs.items():
            assert proc.wait(timeout=900) == 0, (tmp_path / name / "run.log").read_text()[-3000:]
    finally:
        for proc, _ in runs.values():
            _kill(proc)
    with server_log.open("rb") as fh:
        fh.seek(log_start)
        server_said = fh.read().decode(errors="replace")
    assert "deadlock detected" not in server_said, "retried, but the two campaigns must not lock each other"

    store = Store(postgres_db_url)
    try:
        assert {c.name: c.status for c in store.campaigns()} == {"alpha": "finished", "beta": "finished"}
        attempts = _attempts_per_label(store)
        for name, (proc, log) in runs.items():
            cid = store.campaign_id(name)
            sids = store.structure_ids(cid)
            hashes = [canonical_hash(a) for a in store.get_atoms(sids)]
            assert len(hashes) == len(set(hashes)), f"{name}: a structure stored twice"
            calls = [line.split() for line in log.read_text().splitlines()]
            assert {int(pid) for pid, _ in calls} == {proc.pid}, f"{name} was labelled by its own run only"
            assert sorted(h for _, h in calls) == sorted(canonical_hash(a) for a in store.get_atoms(store.labelled_ids(cid)))
            labels = store.labels(sids)
            assert labels and {label.status for label in labels} == {"done"}
            assert Counter(label.structure_id for label in labels).most_common(1)[0][1] == 1
            assert all(attempts[label.id] == 1 for label in labels), f"{name}: a label computed twice"
            assert store.lease(cid) is None
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(orm.Label)) == len(attempts)
    finally:
        store.close()
