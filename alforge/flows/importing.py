"""Import an existing labelled dataset into a campaign as seeds (``alforge import``)."""

from __future__ import annotations

from prefect import flow

from alforge.config import StructureSource
from alforge.tasks.common import open_store
from alforge.tasks.ingest import ingest_sources


@flow(name="import-dataset", log_prints=True)
def import_dataset(store_url: str, campaign: str, source: StructureSource, role: str = "seed") -> dict[str, int]:
    """Every frame of ``source`` must carry a label under the given keys (no labeller is involved).

    ``store_url`` is a :func:`~alforge.tasks.common.store_handle`: Prefect records flow parameters,
    so never a URL with its password."""
    store = open_store(store_url)
    cid = store.get_or_create_campaign(campaign, {"name": campaign, "created_by": "alforge import"})
    before = len(store.labelled_ids(cid))
    ids = ingest_sources(store_url, cid, [source], role, calculator=None, params_hash=None, require_labels=True)
    added = len(store.labelled_ids(cid)) - before
    print(f"imported {len(ids)} structures ({added} new labelled) from {source.file} into campaign {campaign!r}")
    return {"structures": len(ids), "new_labels": added}
