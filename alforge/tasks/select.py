"""Pick the iteration's batch with the configured selector and request labels for it.

This is the thin adapter between the store and the array-only selectors: it assembles feature
matrices (structure-level ``f_s`` or per-atom rows with groups, by the selector's ``level``),
calls ``select`` and records the result verbatim (selector, parameters, ids, scores).
"""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.config import SelectorConfig
from alforge.selectors import make_selector
from alforge.tasks.common import open_store
from alforge.tasks.featurize import atom_features, ensure_features, structure_features


def _numbers(store, structure_ids: list[int]) -> np.ndarray:
    """Atomic number of every atom, structure after structure (the rows of ``atom_features``)."""
    atoms = store.get_atoms(structure_ids)
    return np.concatenate([a.numbers for a in atoms]) if atoms else np.empty(0, dtype=int)


@task(name="select", tags=["select"], cache_policy=NO_CACHE)
def select_batch(
    store_url: str,
    campaign_id: int,
    iteration_id: int,
    model_id: int,
    cfg: SelectorConfig,
    calculator: str,
    params_hash: str,
) -> dict:
    """``{'picked': ids, 'scores': [...]}`` of this iteration; reuses a stored selection."""
    store = open_store(store_url)
    stored = store.selection_for_iteration(iteration_id)
    if stored is None:
        # This iteration's MD frames, plus earlier candidates whose label failed but that are not
        # quarantined: a failed structure gets another labelling round only if it is picked again.
        labelled = set(store.labelled_ids(campaign_id))
        fresh = store.candidate_pool_ids(campaign_id, iteration_id)  # + the unlabelled fixed pool
        retry = store.failed_ids(campaign_id, role="candidate")
        candidates = [i for i in dict.fromkeys(fresh + retry) if i not in labelled]
        ensure_features(store_url, model_id, retry)
        train_ids = [int(i) for i in store.model(model_id).train_ids]
        selector = make_selector(cfg.name, **cfg.params)
        context: dict = {}
        committee = getattr(selector, "committee_size", 0)
        if committee and candidates:
            from alforge.mlip.committee import max_force_deviation

            paths = [store.model(model_id).path, *store.committee_paths(model_id).values()]
            if len(paths) < committee:
                raise RuntimeError(f"model {model_id} has {len(paths)} committee models, selector needs {committee}")
            context["force_deviation"] = max_force_deviation(paths[:committee], store.get_atoms(candidates))
        if selector.needs_targets:
            target_ids = store.structure_ids(campaign_id, role="target")
            context["targets"] = structure_features(store_url, model_id, target_ids)
        if not candidates:
            picked, scores, info = [], np.empty(0), {"reason": "no candidates"}
        else:
            if selector.level == "atom":
                # per-atom rows; groups = position of the row's structure in `candidates`
                cand_rows, groups = atom_features(store_url, model_id, candidates)
                train_rows, _ = atom_features(store_url, model_id, train_ids)
                context |= {
                    "groups": groups,
                    "elements": _numbers(store, candidates),
                    "train_elements": _numbers(store, train_ids),
                }
                result = selector.select(cand_rows, cfg.batch_size, train=train_rows, **context)
            else:
                result = selector.select(
                    structure_features(store_url, model_id, candidates),
                    cfg.batch_size,
                    train=structure_features(store_url, model_id, train_ids),
                    **context,
                )
            picked, scores, info = [candidates[int(i)] for i in result.indices], result.scores, result.info
        store.add_selection(
            iteration_id, model_id, cfg.name, selector.get_params(), candidates, picked, scores, info
        )
        stored = store.selection_for_iteration(iteration_id)
    picked = [int(i) for i in stored["picked_ids"]]
    # idempotent (resumes a crash right here); a re-picked failed structure starts a new round
    store.request_labels(picked, calculator, params_hash, retry_failed=True)
    return {"picked": picked, "scores": [float(s) for s in stored["scores"]], "n_candidates": len(stored["candidate_ids"])}
