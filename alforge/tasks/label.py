"""Label one structure with the campaign's labeller; every outcome is stored, none is raised."""

from __future__ import annotations

import socket
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from alforge.config import LabellerConfig
from alforge.labelling.base import Labeller, LabelFailure
from alforge.storage.store import LabelRecord
from alforge.tasks.common import open_store


def make_campaign_labeller(cfg: LabellerConfig) -> Labeller:
    from alforge.labelling.ase_calculator import ASECalculatorLabeller

    return ASECalculatorLabeller(cfg.name, cfg.kwargs, max_force=cfg.max_force)


def labeller_identity(cfg: LabellerConfig) -> tuple[str, str]:
    """``(calculator, params_hash)`` under which this labeller's results are stored."""
    prov = make_campaign_labeller(cfg).provenance()
    return prov["code"], prov["params_hash"]


@task(name="label", tags=["label"], cache_policy=NO_CACHE)
def label_structure(store_url: str, label_id: int, structure_id: int, cfg: LabellerConfig) -> str:
    """Compute and store one label. A label already finished is skipped, never recomputed."""
    store = open_store(store_url)
    if not store.start_label(label_id):
        return "skipped"
    (atoms,) = store.get_atoms([structure_id])
    labeller = make_campaign_labeller(cfg)  # per call: calculators are not thread-safe
    prov = labeller.provenance()
    host = socket.gethostname()
    start = time.perf_counter()
    try:
        label = labeller.label(atoms)
    except LabelFailure as failure:
        get_run_logger().warning(
            "structure %s: %s: %s", structure_id, failure.failure_class.value, failure.message
        )
        record = LabelRecord(
            "failed",
            failure_class=failure.failure_class.value,
            error=failure.message,
            output_tail=failure.output_tail or None,
            wall_time=time.perf_counter() - start,
            host=host,
            code_version=prov.get("version"),
        )
    else:
        meta: dict[str, Any] = dict(label.metadata)
        record = LabelRecord(
            "done",
            energy=label.energy,
            forces=label.forces,
            stress=label.stress,
            wall_time=time.perf_counter() - start,
            host=host,
            code_version=prov.get("version"),
            metadata=meta or None,
        )
    store.finish_label(label_id, record)
    return record.status
