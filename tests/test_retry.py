"""One campaign, one owner, through the real CLI: concurrent ``alforge run`` processes, ``--wait``,
a stale lease of a dead run, refused labeller changes, ``alforge retry`` and a tampered model file.

Every run is a subprocess of ``python -m alforge.cli``; nothing of the store is mocked. Prefect's
ephemeral API may take long to start on a loaded machine, so the limits are generous and nothing
is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.exc import DBAPIError

from alforge.config import load_config
from alforge.ownership import HOST
from alforge.storage import Store
from alforge.storage import models as orm
from alforge.storage.model_files import file_sha256
from alforge.structure_hash import canonical_hash
from conftest import TESTS, tiny_campaign

pytestmark = pytest.mark.slow

ENV = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
CLI = [sys.executable, "-m", "alforge.cli"]


def _alforge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _start(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([*CLI, *args], env=ENV, stdout=out, stderr=subprocess.STDOUT)


def _lease_pid(url: str) -> int | None:
    """The pid holding a lease in the store, read without creating (or migrating) it."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT pid FROM campaign_leases")).scalar()
    except DBAPIError:  # no schema yet
        return None
    finally:
        engine.dispose()


def _attempts_per_label(store: Store) -> Counter:
    with store.session() as s:
        return Counter(dict(s.execute(
            select(orm.LabelAttempt.label_id, func.count()).group_by(orm.LabelAttempt.label_id)
        ).all()))


def _check_models(store: Store, cid: int, workdir: Path) -> None:
    """One model per iteration, no stray model files, and each file's hash is its row's."""
    rows = store.models(cid)
    assert [m.iteration_index for m in rows] == sorted({m.iteration_index for m in rows})
    assert sorted(str(p) for p in (workdir / "models").glob("*.model")) == sorted(m.path for m in rows)
    for m in rows:
        assert file_sha256(m.path) == m.sha256


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_runs_on_one_campaign_compute_each_label_once(tmp_path, request, database):
    calls = tmp_path / "calls.log"
    store = {} if database == "sqlite" else {"store": request.getfixturevalue("postgres_db_url")}
    path = tiny_campaign(
        tmp_path,
        labeller={"name": "slow_emt:make", "kwargs": {"delay": 0.3, "log": str(calls)}},
        stopping={"max_iterations": 2},
        **store,
    )
    cfg = load_config(path)
    first = _start("run", str(path), log=tmp_path / "first.log")
    waiter = None
    try:
        deadline = time.monotonic() + 600
        while _lease_pid(str(cfg.store)) != first.pid:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.5)
        refused = _alforge("run", str(path), timeout=600)
        assert refused.returncode != 0
        message = refused.stderr.strip().splitlines()[-1]
        assert f"campaign 'tiny' is being run by pid {first.pid} on host {HOST}" in message, refused.stderr
        assert "--wait" in message
        waiter = _start("run", "--wait", str(path), log=tmp_path / "waiter.log")
        assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert waiter.wait(timeout=900) == 0, (tmp_path / "waiter.log").read_text()[-3000:]
    finally:
        _kill(first)
        if waiter is not None:
            _kill(waiter)
    assert "waiting for it to finish" in (tmp_path / "waiter.log").read_text()

    store = Store(str(cfg.store))
    cid = store.campaign_id("tiny")
    computed = Counter(line.split()[1] for line in calls.read_text().splitlines())
    assert computed and max(computed.values()) == 1, "a structure was labelled twice"
    assert {int(line.split()[0]) for line in calls.read_text().splitlines()} == {first.pid}
    labelled = store.get_atoms(store.labelled_ids(cid))
    assert set(computed) == {canonical_hash(a) for a in labelled}
    attempts = _attempts_per_label(store)
    assert attempts and set(attempts.values()) == {1}, "each label is computed exactly once"
    assert len(store.models(cid)) == 2
    _check_models(store, cid, cfg.workdir)
    assert store.lease(cid) is None and store.campaigns()[0].status == "finished"


def _edit(path: Path, **sections) -> None:
    raw = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        raw[key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_retry_changes_stale_lease_and_tampered_model(tmp_path):
    # structures whose digest is 1 mod 5 crash: two seeds and one test structure of this campaign
    faulty = {"name": "faulty", "kwargs": {"inner": "emt", "rules": [{"mode": "crash", "modulo": 5, "remainder": 1}]},
              "max_failed_fraction": 1.0}
    path = tiny_campaign(tmp_path, labeller=faulty, stopping={"max_iterations": 1})
    cfg = load_config(path)
    first = _alforge("run", str(path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    store = Store(str(cfg.store))
    cid = store.campaign_id("tiny")
    failed_seeds = store.failed_ids(cid, role="seed")
    failed_tests = store.failed_ids(cid, role="test")
    assert failed_seeds and failed_tests, "the fault rule must hit a seed and a test structure"
    attempts_before = _attempts_per_label(store)

    # a labeller with other physics is refused before any work, naming the field
    lj = tmp_path / "lj.yaml"
    lj.write_text(path.read_text())
    _edit(lj, labeller={"name": "lj"})
    refused = _alforge("run", str(lj), timeout=300)
    assert refused.returncode != 0
    assert "labeller.name: 'faulty' -> 'lj'" in refused.stderr and "new campaign" in refused.stderr
    assert store.campaigns()[0].status == "finished", "a refused rerun leaves the status alone"

    # retry: only the named class and role go back to pending
    retried = _alforge("retry", str(path), "--class", "crash", "--role", "seed", timeout=300)
    assert retried.returncode == 0, retried.stderr
    assert f"{len(failed_seeds)} failed label(s) back to pending" in retried.stdout
    assert store.failed_ids(cid, role="test") == failed_tests, "failed test labels stay failed"
    assert not store.failed_ids(cid, role="seed")

    # "fix the labeller" (the fault rules are not physics: same identity, taken as it comes) and
    # change an MLIP setting, which needs accepting
    raw = yaml.safe_load(path.read_text())
    _edit(path, labeller={**faulty, "kwargs": {"inner": "emt", "rules": []}},
          mlip={**raw["mlip"], "max_epochs": raw["mlip"]["max_epochs"] + 1})
    refused = _alforge("run", str(path), timeout=300)
    assert refused.returncode != 0 and "mlip.max_epochs: 6 -> 7" in refused.stderr
    assert "--accept-changes" in refused.stderr and "labeller" not in refused.stderr.splitlines()[-1]

    # a stale lease of a run that died (dead pid on this host) holding one retried label running
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = str(uuid.uuid4())
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    store.acquire_lease(cid, owner, HOST, dead.pid, ttl=3600)
    (held_label,) = [lab.id for lab in store.labels(failed_seeds[:1])]
    with store.session() as s, s.begin():
        s.execute(update(orm.Label).where(orm.Label.id == held_label)
                  .values(status="running", claim_owner=owner, claim_expires_at=later))

    rerun = _alforge("run", "--accept-changes", str(path))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert store.lease(cid) is None
    assert not store.failed_ids(cid, role="seed"), "the retried seeds are labelled by the fixed labeller"
    assert store.failed_ids(cid, role="test") == failed_tests, "a rerun never re-requests failed labels itself"
    attempts_after = _attempts_per_label(store)
    seed_labels = {lab.id for lab in store.labels(failed_seeds)}
    for lid, n in attempts_after.items():
        assert n == attempts_before[lid] + (lid in seed_labels), f"label {lid}: {attempts_before[lid]} -> {n}"
    versions = store.config_versions(cid)
    assert len(versions) == 2 and json.loads(versions[0].config_json)["labeller"]["kwargs"]["rules"]
    assert [c["field"] for c in json.loads(versions[1].changes_json)] == ["labeller.kwargs.rules", "mlip.max_epochs"]
    _check_models(store, cid, cfg.workdir)

    # a model file changed behind the store's back is refused, naming file and both hashes
    (model,) = store.models(cid)
    with open(model.path, "ab") as fh:
        fh.write(b"planted")
    tampered = _alforge("run", str(path))
    assert tampered.returncode != 0
    assert model.path in tampered.stderr and model.sha256 in tampered.stderr
    assert file_sha256(model.path) in tampered.stderr
    campaign = store.campaigns()[0]
    assert campaign.status == "failed" and "ModelFileError" in campaign.status_message
    assert store.lease(cid) is None
