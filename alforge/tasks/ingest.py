"""Load seed and test structures into the store, keeping labels that come with them."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.config import StructureSource
from alforge.sources import SourceError, read_source
from alforge.storage.store import LabelRecord
from alforge.tasks.common import open_store

IMPORTED = "import"


@task(name="ingest", tags=["ingest"], cache_policy=NO_CACHE)
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
    ``require_labels`` every structure must come labelled (``alforge import``)."""
    store = open_store(store_url)
    all_ids: list[int] = []
    for source in sources:
        structures, labels, origin = read_source(source)
        if require_labels:
            unlabelled = [i for i, lab in enumerate(labels) if lab is None]
            if unlabelled:
                raise SourceError(
                    f"{source.file}: frame(s) {unlabelled[:10]} have no energy under key "
                    f"{source.energy_key!r}; name the keys (--energy-key/--forces-key/--stress-key)"
                )
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
