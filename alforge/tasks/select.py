"""Pick the iteration's batch with the configured selector and request labels for it.

This is the thin adapter between the store and the array-only selectors: it assembles what the
selector declares it needs (structure rows or per-atom rows with groups, by its ``level``; the
model's one stored Hessian for ``uses_hessian``; the label blocks for ``label_rows``; targets;
committee deviations), calls ``select`` and records the result verbatim (selector, parameters,
ids, scores).

Structure rows of ``H``-based selectors are ``f_s / n_s``, the per-atom energy row the loss is
trained on (METHODS §2), with the training energy weight λ_E as the selector's ``weight`` unless
the campaign file sets one: then a structure-level score and the loss Hessian are in the same units.

Every feature array handed to a selector is read from the store in chunks into one preallocated
array (:meth:`Store.get_feature_rows` / :meth:`Store.get_feature_sums`), float32 for the selectors
of :data:`FLOAT32_SELECTORS`, so a pool of a million candidate atoms costs 0.5 GB (d = 128) plus what
the selector itself allocates, not a list of per-structure float64 arrays plus their concatenation
(``benchmarks/bench_select_path.py``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike
from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.config import SelectorConfig, UncertaintyConfig
from alforge.selectors import get_selector_class, make_selector
from alforge.selectors.base import Selector
from alforge.tasks.carve import carve_centres, carved_in
from alforge.tasks.common import open_store
from alforge.tasks.featurize import (
    LAST_LAYER,
    atom_features,
    ensure_features,
    ensure_label_rows,
    structure_features,
)
from alforge.tasks.hessian import ensure_hessian
from alforge.uncertainty.rigidity import Hessian

#: Selectors whose feature inputs are read as float32: half the memory of the stored float64
#: features; they score in float64 (or check float32 bounds in float64), so their picks are those of
#: float64 inputs (tests/test_selectors_float32.py, tests/test_select_stream.py). Every other
#: selector gets float64 rows, so the scores it records (e.g. lpr's LPR) keep full precision.
FLOAT32_SELECTORS = frozenset({"mig", "mig_label", "dopt"})


def row_dtype(selector_name: str) -> type[np.floating]:
    """The dtype of the feature rows ``select_batch`` reads for this selector."""
    return np.float32 if selector_name in FLOAT32_SELECTORS else np.float64


def _numbers(store, structure_ids: list[int]) -> np.ndarray:
    """Atomic number of every atom, structure after structure (the rows of ``atom_features``)."""
    atoms = store.get_atoms(structure_ids)
    return np.concatenate([a.numbers for a in atoms]) if atoms else np.empty(0, dtype=int)


def iteration_seed(base: int, iteration_index: int) -> int:
    """A fresh seed per iteration, derived from the campaign's (or the selector's) seed."""
    return int(np.random.SeedSequence([int(base), int(iteration_index)]).generate_state(1)[0])


def energy_rows(
    store_url: str, model_id: int, structure_ids: list[int], dtype: DTypeLike = np.float64
) -> np.ndarray:
    """``f_s / n_s`` per structure: the per-atom energy row of the trained loss (summed in float64
    as the per-atom blobs stream from the store)."""
    return open_store(store_url).get_feature_sums(model_id, LAST_LAYER, structure_ids, dtype=dtype, mean=True)


def _label_blocks(
    store_url: str, model_id: int, ids: list[int], hessian: Hessian, dtype: DTypeLike = np.float64
) -> list[np.ndarray]:
    """What a label of each structure adds to ``H``: its energy + force (+ stress) rows for the
    loss form, its weighted energy row for the energy-only form; views of one ``dtype`` array."""
    if hessian.form == "energy":
        rows = energy_rows(store_url, model_id, ids, dtype)
        rows *= np.sqrt(hessian.weights.energy)
        return list(rows[:, None, :])
    return ensure_label_rows(store_url, model_id, ids, hessian.weights, dtype=dtype)


def _configured(cfg: SelectorConfig, seed: int, iteration_index: int, hessian: Hessian | None) -> Selector:
    """The selector with this iteration's seed (random, committee) and λ_E as its row weight."""
    params = dict(cfg.params)
    current = make_selector(cfg.name, **params).get_params()
    if "seed" in current:
        params["seed"] = iteration_seed(params.get("seed", seed), iteration_index)
    if hessian is not None and "weight" in current and "weight" not in cfg.params:
        params["weight"] = hessian.weights.energy
    return make_selector(cfg.name, **params)


@task(name="select", tags=["alforge", "step:select"], cache_policy=NO_CACHE)
def select_batch(
    store_url: str,
    campaign_id: int,
    iteration_id: int,
    model_id: int,
    cfg: SelectorConfig,
    calculator: str,
    params_hash: str,
    uncertainty: UncertaintyConfig,
    seed: int = 0,
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
        if getattr(get_selector_class(cfg.name), "carves", False):  # a rerun never picks its own carvings
            carved = carved_in(store, campaign_id, iteration_id)
            candidates = [i for i in candidates if i not in carved]
        ensure_features(store_url, model_id, retry)
        train_ids = [int(i) for i in store.model(model_id).train_ids]
        hessian = None
        if get_selector_class(cfg.name).uses_hessian:
            hessian = ensure_hessian(store_url, model_id, form=uncertainty.hessian, regularizer=uncertainty.regularizer)
        selector = _configured(cfg, seed, store.iteration(iteration_id).index, hessian)
        dtype = row_dtype(selector.name)
        context: dict = {} if hessian is None else {"hessian": hessian}
        committee = getattr(selector, "committee_size", 0)
        if committee and candidates:
            from alforge.mlip.committee import max_force_deviation

            paths = [store.model_file(model_id), *store.committee_files(model_id).values()]
            if len(paths) < committee:
                raise RuntimeError(f"model {model_id} has {len(paths)} committee models, selector needs {committee}")
            context["force_deviation"] = max_force_deviation(paths[:committee], store.get_atoms(candidates))
        if selector.name == "probe" and candidates:  # PROBE's p_reliable (METHODS §6)
            from alforge.tasks.probe import probe_context

            context |= probe_context(store_url, model_id, candidates, selector.get_params())
        if selector.name == "ltau" and candidates:  # LTAU p of every candidate atom (METHODS §7)
            from alforge.tasks.ltau import ltau_context

            context |= ltau_context(store_url, model_id, candidates, selector.get_params())
        if selector.needs_targets:
            target_ids = store.structure_ids(campaign_id, role="target")
            rows = energy_rows if hessian is not None else structure_features
            context["targets"] = rows(store_url, model_id, target_ids, dtype)
        if selector.label_rows != "none" and candidates:
            context["label_rows"] = _label_blocks(store_url, model_id, candidates, hessian, dtype)
        if not candidates:
            picked, scores, info = [], np.empty(0), {"reason": "no candidates"}
        else:
            if selector.level == "atom":
                # per-atom rows; groups = position of the row's structure in `candidates`
                cand_rows, groups = atom_features(store_url, model_id, candidates, dtype)
                train_rows, _ = atom_features(store_url, model_id, train_ids, dtype)
                context |= {
                    "groups": groups,
                    "elements": _numbers(store, candidates),
                    "train_elements": _numbers(store, train_ids),
                }
                result = selector.select(cand_rows, cfg.batch_size, train=train_rows, **context)
            elif hessian is not None:
                # Scored by its label rows alone, a selector takes no candidate rows: reading and
                # summing every per-atom row only to check a shape was 1.6 s of 1e6 atoms.
                cand_rows = (
                    None if selector.label_rows == "required"
                    else energy_rows(store_url, model_id, candidates, dtype)
                )
                result = selector.select(cand_rows, cfg.batch_size, **context)
            else:
                result = selector.select(
                    structure_features(store_url, model_id, candidates, dtype),
                    cfg.batch_size,
                    train=structure_features(store_url, model_id, train_ids, dtype),
                    **context,
                )
            picked, scores, info = [candidates[int(i)] for i in result.indices], result.scores, result.info
            if result.info.get("centres"):  # lpr: the environments' embedded structures are the picks
                picked, scores, info = carve_centres(
                    store, campaign_id, iteration_id, model_id, candidates, result, selector
                )
        store.add_selection(
            iteration_id, model_id, cfg.name, selector.get_params(), candidates, picked, scores, info
        )
        stored = store.selection_for_iteration(iteration_id)
    picked = [int(i) for i in stored["picked_ids"]]
    # idempotent (resumes a crash right here). A failed structure picked by this selection starts
    # one new round: a label that failed again after the pick stays failed on reruns (`alforge retry`)
    store.request_labels(picked, calculator, params_hash, retry_failed_before=stored["created_at"])
    return {
        "picked": picked,
        "scores": [float(s) for s in stored["scores"]],
        "n_candidates": len(stored["candidate_ids"]),
        "selector": stored["selector"],
        "params": stored["params"],
    }
