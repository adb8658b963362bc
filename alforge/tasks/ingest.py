"""Load seed, test and pool structures into the store, keeping labels that come with seeds and tests.

Test structures may come with energy only (common for test sets): they are evaluated on energy
alone. Seeds need forces, since they are trained on. Pool structures are stored as unlabelled
candidates (any labels in the pool file are stripped; the ``lookup`` labeller reads them when picked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.cache_policies import NO_CACHE

from alforge.config import StructureSource
from alforge.sources import check_labelled, iter_source_chunks, read_source
from alforge.storage.store import LabelRecord, Store
from alforge.tasks.common import open_store

IMPORTED = "import"


@task(name="ingest", tags=["alforge", "step:ingest"], cache_policy=NO_CACHE)
def ingest_sources(
    store_url: str,
    campaign_id: int,
    sources: list[StructureSource],
    role: str,
    calculator: str | None,
    params_hash: str | None,
    require_labels: bool = False,
) -> list[int]:
    """Store the structures; imported labels become finished labels, the rest are requested
    from the campaign's labeller (``calculator``/``params_hash``) if one is given. With
    ``require_labels`` every structure must come labelled (``alforge import``).

    Every source is read and checked before the first row is written, so a bad frame in any of
    them leaves the store as it was."""
    store = open_store(store_url)
    read = []
    for source in sources:
        structures, labels, origin = read_source(source, require_forces=role == "seed" or require_labels)
        if require_labels:
            check_labelled(source, labels)
        read.append((structures, labels, origin))
    all_ids: list[int] = []
    for structures, labels, origin in read:
        ids = store.add_structures(
            campaign_id, structures, role=role, source=origin, provenance=[{"origin": origin}] * len(structures)
        )
        all_ids.extend(ids)
        imported = {sid: lab for sid, lab in zip(ids, labels) if lab is not None}
        if imported:
            calc_name = f"{IMPORTED}:{origin}"
            store.request_labels(list(imported), calc_name, "file")
            for label_id, sid in store.unfinished_labels(campaign_id, calculator=calc_name):
                if sid in imported and store.start_label(label_id):
                    lab = imported[sid]
                    store.finish_label(
                        label_id,
                        LabelRecord("done", energy=lab.energy, forces=lab.forces, stress=lab.stress, code_version=origin),
                    )
        unlabelled = [sid for sid, lab in zip(ids, labels) if lab is None]
        if unlabelled and calculator is not None and params_hash is not None:
            already = set(store.labelled_ids(campaign_id))
            store.request_labels([i for i in unlabelled if i not in already], calculator, params_hash)
    return all_ids


POOL = "pool"  # Structure.source of pool candidates (provenance: file, index, frame)


def _pool_marker(workdir: str, source: StructureSource) -> Path:
    """A file beside the campaign noting that ``source`` (as it is now on disk) was wholly ingested."""
    ident: dict = source.model_dump(mode="json")
    if source.file is not None:
        st = os.stat(source.file)
        ident["stat"] = [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return Path(workdir) / "pool" / f"{digest}.json"


def _ingested(store: Store, campaign_id: int, workdir: str, source: StructureSource) -> bool:
    """Whether ``source`` was wholly ingested into this store before (its marker, confirmed by the count)."""
    marker = _pool_marker(workdir, source)
    if not marker.exists():
        return False
    recorded = json.loads(marker.read_text())
    return store.count_structures(campaign_id, role="candidate", source=POOL) >= recorded["pool_total"]


@task(name="ingest-pool", tags=["alforge", "step:ingest"], cache_policy=NO_CACHE)
def ingest_pool(
    store_url: str, campaign_id: int, sources: list[StructureSource], workdir: str, chunk_size: int = 1000
) -> int:
    """Store the pool as unlabelled ``candidate`` structures (source ``pool``, no iteration), reading
    each file in chunks; returns how many pool candidates the store holds.

    Idempotent: structures are deduplicated by canonical hash (a pool frame equal to a seed stays a
    seed), and a source wholly ingested before (a marker under ``workdir/pool/`` that the store's
    count of pool candidates confirms) is not read again, so resuming a campaign on a 1e5 pool is free.
    Every frame still to ingest is checked in a first pass (chunk by chunk, nothing kept) before the
    first row is written, so a bad frame anywhere leaves no half-ingested pool.
    """
    store = open_store(store_url)
    try:
        logger = get_run_logger()
    except MissingContextError:  # called as ingest_pool.fn outside a flow
        logger = logging.getLogger(__name__)
    todo = [source for source in sources if not _ingested(store, campaign_id, workdir, source)]
    for source in todo:
        for _ in iter_source_chunks(source, chunk_size):  # raises SourceError naming the frame
            pass
    for source in todo:
        marker = _pool_marker(workdir, source)
        added = 0
        for structures, provenance in iter_source_chunks(source, chunk_size):
            before = store.count_structures(campaign_id, role="candidate", source=POOL)
            store.add_structures(campaign_id, structures, role="candidate", source=POOL, provenance=provenance)
            added += store.count_structures(campaign_id, role="candidate", source=POOL) - before
        total = store.count_structures(campaign_id, role="candidate", source=POOL)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"source": source.model_dump(mode="json"), "pool_total": total}))
        logger.info("pool %s [%s]: %d new candidates, %d in the pool", source.file, source.index, added, total)
    return store.count_structures(campaign_id, role="candidate", source=POOL)
