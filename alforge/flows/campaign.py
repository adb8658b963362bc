"""The campaign flow: seeds → (train → evaluate → explore → featurize → select → label)ⁿ.

Iteration k trains model k on every finished training label; labelling happens between models,
so ``stopping.max_iterations`` models are trained. Every task is idempotent against the store,
so running the flow again on the same campaign resumes where a crash left it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from alforge.config import CampaignConfig, LabellerConfig, load_config
from alforge.config_changes import check_changes
from alforge.flows.execution import make_task_runner, worker_context
from alforge.flows.exploration import explore
from alforge.flows.stopping import failure_budget_reason, remaining_budget, stop_reason
from alforge.ownership import campaign_lease
from alforge.selectors import make_selector
from alforge.tasks.common import bind_campaign, campaign_store_url, open_store
from alforge.tasks.diagnostics import diagnostics
from alforge.tasks.featurize import featurize
from alforge.tasks.ingest import ingest_pool, ingest_sources
from alforge.tasks.label import label_outcomes, label_structure, labeller_identity
from alforge.tasks.select import select_batch
from alforge.tasks.train import evaluate_model, train_committee, train_model
from alforge.tasks.worker import WorkerContext


@flow(name="label-batch")
def label_batch(campaign_id: int, cfg: LabellerConfig, worker: WorkerContext) -> str | None:
    """Run every unfinished label of the campaign, ``labeller.concurrency`` at a time; returns why
    the campaign must pause (failure budget exceeded), or None. The store is the one the campaign
    is bound to in this process: a URL parameter would be recorded, password and all, by Prefect."""
    store_url = campaign_store_url(campaign_id)
    todo = open_store(store_url).unfinished_labels(campaign_id)
    futures = [label_structure.submit(worker, lid, sid, cfg) for lid, sid in todo]
    wait(futures)
    outcomes: dict[str, int] = {}
    for fut in futures:
        status = fut.result()
        outcomes[status] = outcomes.get(status, 0) + 1
    if outcomes:
        print(f"labelled {len(futures)}: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    return failure_budget_reason(cfg, label_outcomes(store_url, campaign_id))


def _label(url: str, cid: int, cfg: CampaignConfig) -> str | None:
    runner = make_task_runner(cfg, cfg.labeller.concurrency)
    bind_campaign(cid, url)
    return label_batch.with_options(task_runner=runner)(cid, cfg.labeller, worker_context(cfg))


def _pause(url: str, cid: int, name: str, reason: str) -> dict[str, Any]:
    open_store(url).set_campaign_status(cid, "paused", reason)
    print(f"campaign {name!r} paused: {reason}")
    return {"campaign": name, "iterations": [], "stop_reason": reason, "paused": True}


@task(name="summarise", cache_policy=NO_CACHE)
def summarise(
    store_url: str, campaign_id: int, iteration_id: int, metrics: dict, selected: int, reason: str | None, diagnostics: dict
) -> dict:
    store = open_store(store_url)
    counts = store.label_counts(campaign_id)
    summary = {
        "labels_done": counts.get("done", 0),
        "labels_failed": counts.get("failed", 0),
        "train_forces_rmse": metrics.get("train_forces_rmse"),
        "test_forces_rmse": metrics.get("test_forces_rmse"),
        "test_energy_rmse_per_atom": metrics.get("test_energy_rmse_per_atom"),
        "selected": selected,
        "diagnostics": diagnostics,
    }
    store.finish_iteration(iteration_id, summary, reason)
    return summary


def _fmt(x: float | None, unit: str) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f} m{unit}"


def campaign(config_path: str, *, wait: bool = False, accept_changes: bool = False) -> dict[str, Any]:
    """Run (or resume) the campaign described by ``config_path`` as its one owner.

    The lease is taken before Prefect starts, so a second run stops at once (or, with ``wait``,
    waits for the owner to finish); settings that differ from the stored ones are refused unless
    accepted (:mod:`alforge.config_changes`). Every way out releases the lease, puts this run's
    running labels back to pending and records a crash as the campaign's status (:mod:`alforge.ownership`).
    """
    cfg: CampaignConfig = load_config(config_path)
    store = open_store(str(cfg.store))
    identity = labeller_identity(cfg.labeller)
    config = cfg.model_dump(mode="json")
    cid = store.get_or_create_campaign(cfg.name, config, identity)
    # refused settings are refused before the lease: the campaign's status stays what it was
    latest = store.config_versions(cid)[-1]
    stored = (latest.calculator, latest.params_hash) if latest.calculator is not None else None
    changes = check_changes(cfg.name, json.loads(latest.config_json), stored, config, identity, accept_changes)
    with campaign_lease(store, cid, cfg.name, wait=wait):
        if changes or stored is None:  # a new version of the history, never an overwrite
            store.record_config(cid, config, [c.as_dict() for c in changes], identity)
        for change in changes:
            print(f"campaign {cfg.name!r}: setting changed: {change}")
        return campaign_flow(config_path)


@flow(name="campaign", log_prints=True)
def campaign_flow(config_path: str) -> dict[str, Any]:
    """The campaign's work in order; call it through :func:`campaign`, which owns the campaign."""
    cfg: CampaignConfig = load_config(config_path)
    # Scratch directories of external codes go beside the campaign unless the user chose a place.
    os.environ.setdefault("ALFORGE_SCRATCH", str(cfg.workdir / "scratch"))
    url = str(cfg.store)
    store = open_store(url)
    cid = store.campaign_id(cfg.name)
    store.set_campaign_status(cid, "running")
    calculator, params_hash = labeller_identity(cfg.labeller)
    ingest_sources(url, cid, cfg.seeds, "seed", calculator, params_hash)
    if cfg.test:
        ingest_sources(url, cid, cfg.test, "test", calculator, params_hash)
    if cfg.targets:  # structures of interest: featurized every iteration, never labelled
        ingest_sources(url, cid, cfg.targets, "target", None, None)
    if cfg.exploration.pool:  # fixed candidates, stored once; labelled only when selected
        ingest_pool(url, cid, cfg.exploration.pool, str(cfg.workdir))
    if pause := _label(url, cid, cfg):
        return _pause(url, cid, cfg.name, pause)

    last_selection: dict | None = None
    reason: str | None = None
    summaries = []
    for k in range(1, cfg.stopping.max_iterations + 1):
        iteration_id = store.get_or_create_iteration(cid, k)
        model_id = train_model(url, cid, iteration_id, cfg.mlip, str(cfg.workdir))
        metrics = evaluate_model(url, cid, model_id)
        selected_so_far = len(store.labelled_ids(cid, role="candidate"))
        reason = stop_reason(cfg.stopping, metrics, selected_so_far, last_selection)
        if reason is None and k == cfg.stopping.max_iterations:
            reason = f"reached max_iterations = {k}"
        selected = 0
        candidates = explore(url, cid, iteration_id, model_id, cfg, cfg.name, k) if reason is None else []
        watched = store.labelled_ids(cid, role="test") + store.structure_ids(cid, role="target")
        featurize(url, model_id, candidates + watched, with_training_set=True)
        diag = diagnostics(url, cid, model_id, candidates, cfg.uncertainty)
        if reason is None:
            committee = getattr(make_selector(cfg.selector.name, **cfg.selector.params), "committee_size", 0)
            if committee:
                train_committee(url, model_id, committee, cfg.mlip, str(cfg.workdir))
            budget = remaining_budget(cfg.stopping, cfg.selector.batch_size, selected_so_far)
            selector_cfg = cfg.selector.model_copy(update={"batch_size": budget})
            last_selection = select_batch(
                url, cid, iteration_id, model_id, selector_cfg, calculator, params_hash, cfg.uncertainty, cfg.seed
            )
            selected = len(last_selection["picked"])
            if pause := _label(url, cid, cfg):
                return _pause(url, cid, cfg.name, pause)
        summary = summarise(url, cid, iteration_id, metrics, selected, reason, diag)
        summaries.append(summary)
        print(
            f"iteration {k}: labels {summary['labels_done']} done / {summary['labels_failed']} failed, "
            f"force RMSE train {_fmt(summary['train_forces_rmse'], 'eV/Å')} "
            f"test {_fmt(summary['test_forces_rmse'], 'eV/Å')}, selected {selected}"
            + (f" — stopping: {reason}" if reason else "")
        )
        if reason:
            break
    store.set_campaign_status(cid, "finished", reason)
    return {"campaign": cfg.name, "iterations": summaries, "stop_reason": reason, "paused": False}
