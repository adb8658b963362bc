"""Label one structure with the campaign's labeller, retrying as the policy says.

Every outcome is stored, none is raised: a DFT failure is an event in the store (failure class,
message, the code's last output lines, every attempt and the policy's decision), never a crash of
the campaign. A label that is already finished, or claimed by another live run, is skipped, never
recomputed. The task may run in another process (a Dask worker): the claim's owner is the
campaign lease's owner, passed in, never the worker's own id, and the attempt records the host and
pid that computed it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from alforge.config import LabellerConfig
from alforge.labelling.base import FailureClass, Labeller
from alforge.labelling.policy import RetryPolicy, label_with_policy
from alforge.labelling.registry import make_labeller
from alforge.storage.store import LabelRecord
from alforge.tasks.common import open_store
from alforge.tasks.worker import WorkerContext


def labeller_factory(cfg: LabellerConfig) -> Callable[..., Labeller]:
    """Builds a fresh labeller per attempt: labellers keep per-run state and are not thread-safe."""
    return functools.partial(make_labeller, cfg.name)


def retry_policy(cfg: LabellerConfig) -> RetryPolicy:
    base = RetryPolicy.for_labeller(cfg.name)
    max_retries = {**base.max_retries, **{FailureClass(k): n for k, n in cfg.retries.items()}}
    return dataclasses.replace(base, max_retries=max_retries, quarantine_after=cfg.quarantine_after)


def labeller_identity(cfg: LabellerConfig) -> tuple[str, str]:
    """``(calculator, params_hash)`` under which this labeller's results are stored."""
    prov = make_labeller(cfg.name, **cfg.labeller_kwargs()).provenance()
    return prov["code"], prov["params_hash"]


@task(name="label", tags=["alforge", "step:label"], cache_policy=NO_CACHE)
def label_structure(worker: WorkerContext, label_id: int, structure_id: int, cfg: LabellerConfig) -> str:
    """Compute and store one label; returns ``done``, ``failed``, ``quarantined`` or ``skipped``.
    Runs in any process: all it needs comes in ``worker`` (alforge/tasks/worker.py)."""
    store = worker.open()
    if not store.start_label(label_id, owner=worker.owner):  # finished, or a live run computes it
        return "skipped"
    (atoms,) = store.get_atoms([structure_id])
    atoms.info.pop("alforge_id", None)
    earlier = store.failed_attempt_classes(label_id)
    label, attempts = label_with_policy(
        labeller_factory(cfg), atoms, retry_policy(cfg), cfg.labeller_kwargs(), previous_failures=earlier
    )
    last = attempts[-1]
    meta = {**last.metadata, "worker_pid": os.getpid()}  # with ``host``: which process computed it
    common = {
        "wall_time": sum(a.wall_time for a in attempts),
        "host": meta.get("host") or socket.gethostname(),
        "code_version": meta.get("version") or None,
    }
    if label is not None:
        record = LabelRecord(
            "done", energy=label.energy, forces=label.forces, stress=label.stress,
            metadata={**meta, **label.metadata, "attempts": len(attempts)}, **common,
        )
    else:
        get_run_logger().warning(
            "structure %s: %s after %d attempt(s): %s (%s)",
            structure_id, last.failure_class.value, len(attempts), last.message, last.decision_reason,
        )
        record = LabelRecord(
            "failed", failure_class=last.failure_class.value, error=last.message,
            output_tail=last.output_tail or None, metadata=meta or None, **common,
        )
    quarantine = last.decision == "quarantine"
    if not store.finish_label(label_id, record, [a.to_dict() for a in attempts], quarantine, owner=worker.owner):
        return "skipped"  # the claim was lost (the lease released or taken over): not ours to store
    return "quarantined" if quarantine else record.status


@task(name="label-outcomes", tags=["alforge", "step:label"], cache_policy=NO_CACHE)
def label_outcomes(store_url: str, campaign_id: int) -> dict[str, int]:
    """Label counts by status, for the failure budget."""
    return open_store(store_url).label_counts(campaign_id)
