"""Turn the centres of an ``lpr`` selection into small structures to label (METHODS §5).

Called by :func:`alforge.tasks.select.select_batch` when a selection holds centres ``(structure,
atom)``: each centre's environment is embedded with the selector's strategy and parameters
(:func:`alforge.embedding.embed`), the generated structures are stored as candidates of the
iteration (source ``embedding``, parent the large structure, provenance the embedding's record plus
the centre's LPR), and they replace the centre among the picks: they are what goes to labelling.
Whole-structure picks stay as they are.

**Resumable.** The stored selection is the record: it is written after the carving, and a rerun
that finds it never carves. A run interrupted between carving and storing the selection selects
again on the same candidates (this iteration's own carvings are excluded: :func:`carved_in`), the
same features, ``H`` and seed, so it picks the same centres; every rattle is seeded by
``(selector seed, parent, atom)``, so the same structures come out and map to their stored ids.

**Sanity.** ``embed`` drops a structure that fails its checks (contact distance across images, a
degenerate cell, atoms outside it), logging why; each structure handed back is checked once more
here before it is stored. Both kinds of loss are counted in the selection's info
(``carving.discarded``), per centre and in total.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from ase import Atoms
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from alforge.selectors.base import Selection, Selector

#: ``source`` of the structures carved here.
SOURCE = "embedding"


def carved_in(store, campaign_id: int, iteration_id: int) -> set[int]:
    """Ids of the structures carved in this iteration (never candidates of its own selection)."""
    index = store.iteration(iteration_id).index
    return {
        r["id"] for r in store.structure_records(campaign_id, role="candidate")
        if r["source"] == SOURCE and r["iteration"] == index
    }


def _plain(value: Any) -> Any:
    """JSON for numpy values and Atoms in an embedding record."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Atoms):
        return value.get_chemical_formula()
    return str(value)


def _centre_seed(seed: int, parent_id: int, atom: int) -> int:
    """A rattle seed per centre, independent of where in the batch the centre was picked."""
    return int(np.random.SeedSequence([int(seed), int(parent_id), int(atom)]).generate_state(1)[0])


def _embedding_kwargs(store, model_id: int, selector: Selector) -> dict[str, Any]:
    """``embed`` keywords from the selector's parameters; the cutoff defaults to the model's r_max."""
    cutoff = selector.cutoff
    if cutoff is None:
        from alforge.mlip.mace_model import load_model

        cutoff = float(load_model(store.model_file(model_id), device="cpu").r_max)
    kwargs: dict[str, Any] = {
        "strategy": selector.strategy, "cutoff": cutoff, "copies": selector.copies,
        "rattle": selector.rattle,
    }
    if selector.buffer is not None:
        kwargs["buffer"] = selector.buffer
    if selector.host is not None:
        from ase.io import read

        kwargs["host"] = read(selector.host)
    return kwargs


def carve_centres(
    store,
    campaign_id: int,
    iteration_id: int,
    model_id: int,
    candidates: list[int],
    result: Selection,
    selector: Selector,
) -> tuple[list[int], np.ndarray, dict[str, Any]]:
    """The selection's picks with every centre replaced by its stored embedded structures.

    Returns ``(picked ids, scores, info)``: a carved structure's score is its centre's LPR, and
    ``info`` is the selection's own plus ``carving`` (strategy, cutoff, per centre the parent id,
    atom, LPR, generated ids and discarded count; total discarded).
    """
    from alforge.embedding import embed
    from alforge.embedding.checks import bond_contact, structure_problem

    try:
        logger = get_run_logger()
    except MissingContextError:  # called outside a flow (tests, scripts)
        logger = logging.getLogger(__name__)
    centre_atom = {int(c["pick"]): int(c["atom"]) for c in result.info["centres"]}
    kwargs = _embedding_kwargs(store, model_id, selector)
    expected = selector.copies + int(selector.strategy == "high_symmetry")  # + the pristine host
    picked: list[int] = []
    scores: list[float] = []
    record: list[dict[str, Any]] = []
    for k, (index, score) in enumerate(zip(result.indices, result.scores)):
        parent_id = int(candidates[int(index)])
        if k not in centre_atom:
            picked.append(parent_id)
            scores.append(float(score))
            continue
        atom = centre_atom[k]
        (parent,) = store.get_atoms([parent_id])
        parent.info.clear()
        contact = selector.contact if selector.contact is not None else bond_contact(parent)
        made = embed(parent, atom, seed=_centre_seed(selector.seed, parent_id, atom), contact=contact, **kwargs)
        sane = []
        for structure in made:
            problem = structure_problem(structure, contact)
            if problem:
                logger.warning("carving structure %d atom %d: dropped a structure: %s", parent_id, atom, problem)
            else:
                sane.append(structure)
        discarded = max(expected - len(made), 0) + len(made) - len(sane)
        provenance = [
            json.loads(json.dumps({**s.info["embedding"], "parent_id": parent_id, "lpr": float(score)}, default=_plain))
            for s in sane
        ]
        for s in sane:
            s.info.clear()
        ids = store.add_structures(
            campaign_id, sane, role="candidate", source=SOURCE, iteration_id=iteration_id,
            parent_ids=[parent_id] * len(sane), provenance=provenance,
        ) if sane else []
        record.append({"parent_id": parent_id, "atom": atom, "lpr": float(score), "ids": ids, "discarded": discarded})
        for i in ids:
            if i not in picked:  # the pristine host of several centres is one structure
                picked.append(i)
                scores.append(float(score))
        logger.info(
            "carving structure %d atom %d (LPR %.3g): %d %s structures%s", parent_id, atom, score, len(ids),
            selector.strategy, f", {discarded} discarded" if discarded else "",
        )
    info = dict(result.info)
    info["carving"] = {
        "strategy": selector.strategy, "cutoff": kwargs["cutoff"], "centres": record,
        "discarded": int(sum(c["discarded"] for c in record)),
    }
    return picked, np.asarray(scores), info
