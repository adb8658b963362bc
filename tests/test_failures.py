"""Fault injection through a whole campaign: failures are events in the store, never crashes.

The ``faulty`` labeller wraps EMT and, for structures chosen by a digest rule, crashes, hangs past
its timeout, reports a non-converged SCF or returns NaN. The expected fate of every structure
follows from the default retry policy with ``quarantine_after: 2``:
crash → failed after 1 attempt; hang → timeout, retried once, then quarantined;
scf → retried once with more iterations and then labelled; nan → non_finite after 1 attempt.
"""

from __future__ import annotations

import json

import pytest

from alforge.config import load_config
from alforge.labelling.registry import make_labeller
from alforge.storage import Store
from alforge.storage import models as orm
from conftest import tiny_campaign

pytestmark = pytest.mark.slow

FAULTY = {
    "inner": "emt",
    "rules": [
        {"mode": "crash", "modulo": 6, "remainder": 0},
        {"mode": "hang", "modulo": 6, "remainder": 1},
        {"mode": "scf", "modulo": 6, "remainder": 2},
        {"mode": "nan", "modulo": 6, "remainder": 3},
    ],
    "timeout": 1.5,
    "hang_seconds": 60,
    "scf_iterations": 50,
    "scf_iterations_needed": 100,
}
EXPECTED = {  # mode -> (status, failure class, attempts, quarantined)
    None: ("done", None, 1, False),
    "crash": ("failed", "crash", 1, False),
    "hang": ("failed", "timeout", 2, True),
    "scf": ("done", None, 2, False),
    "nan": ("failed", "non_finite", 1, False),
}


def _faulty_campaign(tmp_path, **labeller):
    return tiny_campaign(
        tmp_path,
        labeller={"name": "faulty", "kwargs": FAULTY, "quarantine_after": 2, "concurrency": 2,
                  "max_failed_fraction": None, **labeller},
        selector={"name": "mig", "batch_size": 4},
        exploration={"walkers": 2, "steps": 18, "frame_interval": 3},
        stopping={"max_iterations": 3},
    )


def test_campaign_survives_every_failure_class(tmp_path, prefect_harness):
    from alforge.flows.campaign import campaign

    path = _faulty_campaign(tmp_path)
    result = campaign(str(path))
    assert not result["paused"] and result["stop_reason"] == "reached max_iterations = 3"

    store = Store(load_config(path).store)
    cid = store.campaign_id("tiny")
    labeller = make_labeller("faulty", **FAULTY)
    ids = store.structure_ids(cid)
    modes = {a.info["alforge_id"]: labeller.fault_for(a) for a in store.get_atoms(ids)}
    labels = {l.structure_id: l for l in store.labels(ids)}
    quarantined = set(store.quarantined_ids(cid))
    assert set(modes.values()) >= {None, "crash", "hang", "scf", "nan"}, "every fault must occur"
    seen = set()
    for sid, label in labels.items():
        status, failure, n_attempts, in_quarantine = EXPECTED[modes[sid]]
        attempts = store.attempts(label.id)
        assert label.status == status, (sid, modes[sid])
        assert label.failure_class == failure, (sid, modes[sid])
        # a failed, non-quarantined candidate may be re-picked: each round repeats the same attempts
        assert len(attempts) % n_attempts == 0 and len(attempts) >= n_attempts, (sid, modes[sid], len(attempts))
        assert (sid in quarantined) == (in_quarantine or len(attempts) >= 2 and status == "failed"), sid
        if status == "failed":
            assert label.error, "failures keep their message"
            if failure in ("crash", "timeout"):
                assert label.output_tail, "and the code's last output lines"
            assert attempts[-1].decision in ("give_up", "quarantine")
        if modes[sid] == "scf":
            first, second = attempts[0], attempts[1]
            assert first.failure_class == "scf_not_converged" and first.decision == "retry"
            assert json.loads(second.kwargs_json)["scf_iterations"] == 100, "the retry raised the iterations"
        if status == "done":
            assert label.energy is not None and label.host and label.wall_time is not None
            assert json.loads(label.metadata_json)["code"] == "faulty[emt]"
        seen.add(modes[sid])
    assert {"crash", "hang", "scf", "nan", None} <= seen

    # good labels are all kept and trained on; quarantined structures are never offered again
    models = store.models(cid)
    assert len(models) == 3
    done = set(store.labelled_ids(cid))
    for m in models:
        assert set(int(i) for i in m.train_ids) <= done
    for it in store.iterations(cid):
        sel = store.selection_for_iteration(it.id)
        if sel is None:
            continue
        offered = set(int(i) for i in sel["candidate_ids"])
        for sid in offered & quarantined:
            quarantined_at = max(a.created_at for a in store.attempts(labels[sid].id))
            with store.session() as s:
                created = s.get(orm.Selection, sel["id"]).created_at
            assert created < quarantined_at, f"quarantined structure {sid} was offered again"


def test_failure_budget_pauses_then_resumes(tmp_path, prefect_harness):
    from alforge.flows.campaign import campaign

    path = _faulty_campaign(tmp_path, max_failed=0)
    result = campaign(str(path))
    assert result["paused"] and "max_failed = 0" in result["stop_reason"]
    store = Store(load_config(path).store)
    cid = store.campaign_id("tiny")
    (row,) = [c for c in store.campaigns() if c.id == cid]
    assert row.status == "paused" and "raise the budget" in row.status_message
    assert store.models(cid) == [], "a paused campaign does no further work"
    done_before = {l.id: l.finished_at for l in store.labels(store.structure_ids(cid)) if l.status == "done"}
    assert done_before, "labels finished before the pause are kept"

    path.write_text(path.read_text().replace("max_failed: 0", "max_failed: 1000"))
    result = campaign(str(path))
    assert not result["paused"]
    assert [c.status for c in store.campaigns() if c.id == cid] == ["finished"]
    after = {l.id: l.finished_at for l in store.labels(store.structure_ids(cid)) if l.status == "done"}
    assert all(after[k] == v for k, v in done_before.items()), "no finished label recomputed on resume"
