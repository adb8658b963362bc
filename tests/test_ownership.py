"""One campaign, one owner, on the real store (SQLite and PostgreSQL): leases, label claims, model
rows and files, config history, and the context manager that owns a campaign for a run.

Races are real: every contender is its own :class:`Store` (its own engine and connections) on its
own thread, released together by a barrier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone

import pytest
from ase.build import bulk
from sqlalchemy import update

from alforge.config_changes import ConfigChanged, check_changes
from alforge.labelling.registry import make_labeller
from alforge.ownership import HOST, LeaseHeld, LeaseLost, campaign_lease, holder_gone
from alforge.storage import Store
from alforge.storage import models as orm
from alforge.storage.model_files import ModelFileError, file_sha256
from alforge.storage.store import LabelRecord


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_db_url")


@pytest.fixture()
def store(url):
    s = Store(url)
    yield s
    s.close()


@pytest.fixture()
def cid(store):
    return store.get_or_create_campaign("c", {"k": 1}, ("emt", "h"))


def _labels(store: Store, cid: int, n: int = 2) -> list[int]:
    cells = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=k + 1)
        cells.append(atoms)
    sids = store.add_structures(cid, cells, role="seed", source="t")
    store.request_labels(sids, "emt", "h")
    return [lid for lid, _ in store.unfinished_labels(cid)]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _race(url: str, n: int, attempt) -> list:
    """Run ``attempt(store, k)`` on ``n`` threads at once, each opening its own Store (engine,
    connections, migration check) right after the start signal; their results."""
    stores: list = [None] * n
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(k: int) -> None:
        barrier.wait()
        stores[k] = Store(url)
        results[k] = attempt(stores[k], k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    return results


def test_exactly_one_of_many_takes_the_lease(url, store, cid):
    results = _race(url, 6, lambda s, k: s.acquire_lease(cid, f"owner-{k}", HOST, 1000 + k).owner)
    winners = {r for r in results}
    assert len(winners) == 1, "every contender must see the same single owner"
    (winner,) = winners
    assert store.lease(cid).owner == winner
    assert sum(r == f"owner-{k}" for k, r in enumerate(results)) == 1


def test_live_lease_is_respected_stale_ones_are_taken_over(store, cid):
    first = store.acquire_lease(cid, "a", HOST, 11)
    assert first.owner == "a"
    assert store.acquire_lease(cid, "b", "elsewhere", 12).owner == "a", "a live lease is respected"
    assert store.acquire_lease(cid, "a", HOST, 11).owner == "a", "the owner may take its own lease again"
    # a dead pid on this host: gone, even before its lease expires
    store.acquire_lease(cid, "a", HOST, _dead_pid())
    assert store.acquire_lease(cid, "b", HOST, 12, holder_gone=holder_gone).owner == "b"
    assert not store.renew_lease(cid, "a"), "the old owner learns it lost the lease"
    # an expired lease is taken over wherever its holder ran
    store.release_lease(cid, "b")
    store.acquire_lease(cid, "c", "elsewhere", 13, ttl=-1.0)
    assert store.acquire_lease(cid, "d", HOST, 14).owner == "d"


def test_stale_lease_is_taken_over_by_one_contender(url, store, cid):
    store.acquire_lease(cid, "gone", HOST, _dead_pid())
    # the contenders are alive (this process), so the first to take over keeps the lease
    results = _race(url, 4, lambda s, k: s.acquire_lease(cid, f"new-{k}", HOST, os.getpid(), holder_gone=holder_gone).owner)
    assert len(set(results)) == 1 and results[0].startswith("new-")


def test_label_claims(store, cid):
    lid, other = _labels(store, cid)
    store.acquire_lease(cid, "a", HOST, 1)
    assert store.start_label(lid, owner="a")
    assert not store.start_label(lid, owner="b"), "a running label of a live owner is never started again"
    assert not store.start_label(lid, owner="a"), "nor by its own owner a second time"
    assert not store.finish_label(lid, LabelRecord("failed", failure_class="crash"), owner="b"), \
        "only the claim's owner stores the outcome"
    # the owner dies: its lease expires (no heartbeat) and the label is taken over
    store.acquire_lease(cid, "a", HOST, 1, ttl=-1.0)
    assert store.start_label(lid, owner="b")
    assert not store.finish_label(lid, LabelRecord("failed", failure_class="crash"), owner="a")
    assert store.finish_label(lid, LabelRecord("failed", failure_class="crash", error="x"), owner="b")
    # a claim that expired is taken over even while its owner's lease lives
    store.acquire_lease(cid, "c", HOST, 2, ttl=-1.0)
    store.acquire_lease(cid, "c", HOST, 2)
    assert store.start_label(other, owner="c", ttl=-1.0)
    assert store.start_label(other, owner="d")


def test_exactly_one_of_many_claims_a_label(url, store, cid):
    (lid,) = _labels(store, cid, 1)
    store.acquire_lease(cid, "dead", HOST, 1)
    store.start_label(lid, owner="dead")
    store.acquire_lease(cid, "dead", HOST, 1, ttl=-1.0)  # its run is gone: the label is up for grabs
    for k in range(6):  # every contender is a live owner (of a campaign of its own), so the first claim holds
        store.acquire_lease(store.get_or_create_campaign(f"other-{k}", {}), f"o{k}", HOST, os.getpid())
    results = _race(url, 6, lambda s, k: s.start_label(lid, owner=f"o{k}"))
    assert sum(results) == 1
    (row,) = store.labels(store.structure_ids(cid))
    assert row.status == "running" and row.claim_owner == f"o{results.index(True)}" and row.attempts == 2


def test_heartbeat_renews_claims_and_release_puts_them_back(store, cid):
    lid, other = _labels(store, cid)
    store.acquire_lease(cid, "a", HOST, 1)
    assert store.start_label(lid, owner="a", ttl=-1.0)  # the claim ran out, the lease did not
    assert store.renew_lease(cid, "a")
    assert not store.start_label(lid, owner="b"), "the heartbeat renewed the claim"
    assert store.release_lease(cid, "a", "failed", "RuntimeError: boom")
    rows = {r.id: r for r in store.labels(store.structure_ids(cid))}
    assert rows[lid].status == "pending" and rows[lid].claim_owner is None
    assert store.lease(cid) is None
    (campaign,) = store.campaigns()
    assert (campaign.status, campaign.status_message) == ("failed", "RuntimeError: boom")
    store.acquire_lease(cid, "b", HOST, 2)
    assert not store.release_lease(cid, "a", "failed", "late"), "a lost lease is not released"
    assert store.campaigns()[0].status_message == "RuntimeError: boom"


def test_model_rows_and_files(store, cid, tmp_path):
    it = store.get_or_create_iteration(cid, 1)
    first, second = tmp_path / "iteration-001-aaaa.model", tmp_path / "iteration-001-bbbb.model"
    first.write_bytes(b"first model")
    second.write_bytes(b"second model")
    mid = store.add_model(cid, it, str(first), [1], {}, sha256=file_sha256(first))
    # the loser of the race gets the winner's id, not an IntegrityError, and the row is unchanged
    assert store.add_model(cid, it, str(second), [1, 2], {}, sha256=file_sha256(second)) == mid
    assert store.model(mid).path == str(first) and store.model(mid).sha256 == file_sha256(first)
    assert store.model_file(mid) == first
    first.write_bytes(b"planted")
    with pytest.raises(ModelFileError) as err:
        store.model_file(mid)
    assert str(first) in str(err.value)
    assert file_sha256(first) in str(err.value) and store.model(mid).sha256 in str(err.value)
    first.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        store.model_file(mid)
    legacy = store.add_model(cid, store.get_or_create_iteration(cid, 2), str(second), [1], {})
    with pytest.raises(ModelFileError, match="no SHA-256"):
        store.model_file(legacy)
    assert store.add_committee_member(mid, 1, 7, str(second), {}, sha256=file_sha256(second)) == str(second)
    assert store.add_committee_member(mid, 1, 7, "/other.model", {}, sha256="0" * 64) == str(second)
    assert store.committee_files(mid) == {1: second}


def test_config_history_is_kept(store):
    cid = store.get_or_create_campaign("h", {"a": 1}, ("emt", "x"))
    assert store.get_or_create_campaign("h", {"a": 2}) == cid, "an existing campaign's config is not replaced"
    assert store.record_config(cid, {"a": 3}, [{"field": "a", "old": 1, "new": 3}], ("emt", "x")) == 2
    versions = store.config_versions(cid)
    assert [json.loads(v.config_json) for v in versions] == [{"a": 1}, {"a": 3}]
    assert json.loads(versions[1].changes_json) == [{"field": "a", "old": 1, "new": 3}]
    assert (versions[0].calculator, versions[0].params_hash) == ("emt", "x")
    assert json.loads(store.campaigns()[0].config_json) == {"a": 3}


def test_reset_failed_labels(store, cid):
    a, b = _labels(store, cid)
    for lid, cls in ((a, "crash"), (b, "scf_not_converged")):
        store.start_label(lid)
        store.finish_label(lid, LabelRecord("failed", failure_class=cls, error="x"))
    assert store.reset_failed_labels(cid, classes=["timeout"]) == 0
    assert store.reset_failed_labels(cid, roles=["test"]) == 0
    assert store.reset_failed_labels(cid, classes=["crash"], roles=["seed"]) == 1
    assert store.label_counts(cid) == {"pending": 1, "failed": 1}
    sid_b = store.structure_ids(cid)[1]
    with store.session() as s, s.begin():
        s.execute(update(orm.Structure).where(orm.Structure.id == sid_b).values(quarantined=True))
    assert store.reset_failed_labels(cid) == 0, "a quarantined structure's label stays failed"


def test_campaign_lease_context(store, cid):
    lid, _ = _labels(store, cid)
    with pytest.raises(RuntimeError, match="boom"):
        with campaign_lease(store, cid, "c", owner="me"):
            assert store.start_label(lid, owner="me")
            with pytest.raises(LeaseHeld, match=r"campaign 'c' is being run by pid \d+ on host"):
                with campaign_lease(store, cid, "c", owner="other"):
                    pass
            raise RuntimeError("boom\nsecond line")
    (campaign,) = store.campaigns()
    assert (campaign.status, campaign.status_message) == ("failed", "RuntimeError: boom")
    assert store.lease(cid) is None
    assert store.label_counts(cid) == {"pending": 2}
    with pytest.raises(KeyboardInterrupt):
        with campaign_lease(store, cid, "c", owner="me"):
            raise KeyboardInterrupt
    assert store.campaigns()[0].status == "interrupted" and store.lease(cid) is None
    with campaign_lease(store, cid, "c", owner="me"):
        store.set_campaign_status(cid, "finished")
    assert store.campaigns()[0].status == "finished", "a normal exit leaves the status the flow set"


def test_wait_for_the_owner(store, cid):
    store.acquire_lease(cid, "first", "elsewhere", 1)
    release = threading.Timer(1.0, store.release_lease, args=(cid, "first"))
    release.start()
    with campaign_lease(store, cid, "c", wait=True, poll=0.2, owner="second") as lease:
        assert lease.owner == "second"
    release.join()


def _cfg(**labeller) -> dict:
    return {"name": "c", "labeller": {"name": "emt", "kwargs": {}, "concurrency": 1, **labeller},
            "mlip": {"max_epochs": 6}, "stopping": {"max_iterations": 2}}


def test_config_changes_are_classified():
    old, ident = _cfg(), ("emt", "h1")
    assert [str(c) for c in check_changes("c", old, ident, {**old, "stopping": {"max_iterations": 5}}, ident, False)] \
        == ["stopping.max_iterations: 2 -> 5"]
    with pytest.raises(ConfigChanged, match=r"labeller\.name: 'emt' -> 'lj'.*new campaign.*alforge relabel"):
        check_changes("c", old, ident, _cfg(name="lj"), ("lj", "h2"), True)
    mlip = {**old, "mlip": {"max_epochs": 8}}
    with pytest.raises(ConfigChanged, match=r"mlip\.max_epochs: 6 -> 8.*--accept-changes"):
        check_changes("c", old, ident, mlip, ident, False)
    assert len(check_changes("c", old, ident, mlip, ident, True)) == 1
    budget = check_changes("c", old, ident, _cfg(concurrency=4, kwargs={"log": "x"}), ident, False)
    assert [str(c) for c in budget] == ["labeller.concurrency: 1 -> 4", "labeller.kwargs.log: None -> 'x'"], \
        "labeller settings outside its identity are taken (and recorded)"
    with pytest.raises(ConfigChanged, match=r"labeller\.kwargs\.log"):
        check_changes("c", old, None, _cfg(kwargs={"log": "x"}), ident, True)  # stored without an identity
    imported = {"name": "c", "created_by": "alforge import"}  # `alforge import` made the campaign
    assert check_changes("c", imported, None, old, ident, False), "its first run adds labeller and mlip"


def test_non_physics_kwargs_are_a_property_of_the_labeller():
    def identity(**kwargs):
        return make_labeller("slow_emt:make", **kwargs).provenance()["params_hash"]

    assert identity(delay=0.1, log="a.log") == identity(delay=2.0, log="b.log")
    assert make_labeller("emt").provenance()["params_hash"] != make_labeller("emt", asap_cutoff=True).provenance()["params_hash"]


def test_lease_times_are_utc(store, cid):
    lease = store.acquire_lease(cid, "a", HOST, 1)
    now = datetime.now(timezone.utc)
    assert lease.acquired_at.tzinfo is not None and abs((now - lease.acquired_at).total_seconds()) < 600


def test_runs_opening_a_new_store_at_once_migrate_it_once(url):
    stores = _race(url, 4, lambda s, k: len(s.campaigns()))  # each contender's Store() migrates
    assert stores == [0, 0, 0, 0]


def test_a_failed_label_gets_one_new_round_per_pick(store, cid):
    (lid,) = _labels(store, cid, 1)
    sid = store.structure_ids(cid)[0]
    store.start_label(lid)
    store.finish_label(lid, LabelRecord("failed", failure_class="crash", error="x"))
    picked_at = datetime.now(timezone.utc)
    store.request_labels([sid], "emt", "h", retry_failed_before=picked_at)
    assert store.label_counts(cid) == {"pending": 1}, "picked after it failed: a new round"
    store.start_label(lid)
    store.finish_label(lid, LabelRecord("failed", failure_class="crash", error="x"))
    store.request_labels([sid], "emt", "h", retry_failed_before=picked_at)  # a rerun reusing that pick
    assert store.label_counts(cid) == {"failed": 1}, "failed again in that round: stays failed on reruns"
    store.request_labels([sid], "emt", "h")  # seeds and tests are requested without a pick
    assert store.label_counts(cid) == {"failed": 1}


@pytest.fixture
def default_sigint():
    """SIGINT as a fresh process has it: an earlier in-process test (``alforge run``'s handlers, or
    a library's) may have left another disposition in this worker, and the heartbeat interrupts the
    main thread with SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_run_that_loses_its_lease_stops(store, cid, default_sigint):
    with pytest.raises(LeaseLost, match="another run took it over"):
        with campaign_lease(store, cid, "c", ttl=0.4, owner="slow"):
            store.acquire_lease(cid, "slow", HOST, os.getpid(), ttl=-1.0)  # its heartbeat missed
            assert store.acquire_lease(cid, "fast", "elsewhere", 1).owner == "fast"
            time.sleep(30)  # interrupted by the heartbeat long before this ends
    assert store.lease(cid).owner == "fast", "the new owner's lease is left alone"
