"""The campaign flow: seeds → (train → evaluate → explore → featurize → diagnostics → select →
label → summarise)ⁿ, one ``iteration`` subflow per model.

Iteration k trains model k on every finished training label; labelling happens between models,
so ``stopping.max_iterations`` models are trained. Every task is idempotent against the store,
so running the flow again on the same campaign resumes where a crash left it.

Runs are named for what they do, so the Prefect UI reads as the campaign does: the flow run is
``<campaign>``, each iteration ``<campaign>/iteration-<k>``, a label ``label <campaign>#<structure
id>``, every other task ``<step> <campaign>``; all carry the tags ``alforge`` and
``campaign:<campaign>`` (tasks also ``step:<step>``, iterations ``iteration:<k>``), which UI filters
and tag concurrency limits select on. Each iteration publishes its artifacts
(:mod:`alforge.monitoring.artifacts`) and one log line per step with its figures.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import yaml
from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.tasks import Task

from alforge.config import CampaignConfig, LabellerConfig, load_config
from alforge.config_changes import check_changes
from alforge.flows.execution import make_task_runner, worker_context
from alforge.flows.exploration import explore
from alforge.flows.stopping import failure_budget_reason, remaining_budget, stop_reason
from alforge.monitoring import slug
from alforge.monitoring.artifacts import publish_iteration
from alforge.monitoring.progress import Progress
from alforge.ownership import campaign_lease, holds_lease
from alforge.selectors import make_selector
from alforge.storage import Store
from alforge.tasks.common import bind_campaign, campaign_store_url, open_store
from alforge.tasks.diagnostics import diagnostics
from alforge.tasks.featurize import featurize
from alforge.tasks.ingest import ingest_pool, ingest_sources
from alforge.tasks.label import label_outcomes, label_structure, labeller_identity
from alforge.tasks.select import select_batch
from alforge.tasks.train import evaluate_model, train_committee, train_model
from alforge.tasks.worker import WorkerContext

log = logging.getLogger(__name__)


def _step(t: Task, campaign: str) -> Task:
    """``t`` with its runs named ``<step> <campaign>`` (campaign names hold no format braces)."""
    return t.with_options(task_run_name=f"{t.name} {campaign}")


def _tags(campaign: str) -> AbstractContextManager[set[str]]:
    """The tags of every run a campaign makes (tasks add ``step:``, iterations ``iteration:``)."""
    return tags("alforge", f"campaign:{campaign}")


def _where(campaign: str, iteration: int | None) -> str:
    return campaign if iteration is None else f"{campaign}/iteration-{iteration}"


@flow(name="label-batch")
def label_batch(
    campaign_id: int, cfg: LabellerConfig, campaign: str, worker: WorkerContext, iteration: int | None = None
) -> str | None:
    """Run every unfinished label of the campaign, ``labeller.concurrency`` at a time; returns why
    the campaign must pause (failure budget exceeded), or None. The store is the one the campaign
    is bound to in this process: a URL parameter would be recorded, password and all, by Prefect.
    The ``<slug>-labelling`` progress artifact advances as each label finishes."""
    store_url = campaign_store_url(campaign_id)
    todo = open_store(store_url).unfinished_labels(campaign_id)
    named = label_structure.with_options(task_run_name=f"label {campaign}#" + "{structure_id}")
    what = "seeds and test set" if iteration is None else f"iteration {iteration}"
    outcomes: dict[str, int] = {}
    with Progress(key=f"{slug(campaign)}-labelling", description=f"labelling {what}", total=len(todo)) as progress:
        futures = [named.submit(worker, lid, sid, cfg) for lid, sid in todo]
        for fut in as_completed(futures):
            status = fut.result()
            outcomes[status] = outcomes.get(status, 0) + 1
            progress.advance(1)
    if outcomes:
        get_run_logger().info(
            "label: %d labels, %s", len(futures), ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
        )
    return failure_budget_reason(cfg, _step(label_outcomes, campaign)(store_url, campaign_id))


def _label(url: str, cid: int, cfg: CampaignConfig, campaign: str, iteration: int | None = None) -> str | None:
    runner = make_task_runner(cfg, cfg.labeller.concurrency)
    bind_campaign(cid, url)
    batch = label_batch.with_options(task_runner=runner, flow_run_name=f"{_where(campaign, iteration)}/labels")
    return batch(cid, cfg.labeller, campaign, worker_context(cfg), iteration)


def _mev(x: float | None, unit: str) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f} meV/{unit}"


def _num(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def _pause(url: str, cid: int, name: str, reason: str) -> dict[str, Any]:
    open_store(url).set_campaign_status(cid, "paused", reason)
    print(f"campaign {name!r} paused: {reason}")
    return {"campaign": name, "iterations": [], "stop_reason": reason, "paused": True}


@task(name="summarise", tags=["alforge", "step:summarise"], cache_policy=NO_CACHE)
def summarise(
    store_url: str,
    campaign_id: int,
    iteration_id: int,
    metrics: dict,
    selection: dict | None,
    reason: str | None,
    diagnostics: dict,
    campaign: str,
    workdir: str,
    device: str,
) -> dict:
    """Record the iteration's summary in the store, then publish the campaign's artifacts (metrics
    table, summary, figures: :mod:`alforge.monitoring.artifacts`), which never fails the campaign."""
    store = open_store(store_url)
    counts = store.label_counts(campaign_id)
    summary = {
        "labels_done": counts.get("done", 0),
        "labels_failed": counts.get("failed", 0),
        "failures": store.failure_counts(campaign_id),
        "train_forces_rmse": metrics.get("train_forces_rmse"),
        "test_forces_rmse": metrics.get("test_forces_rmse"),
        "test_energy_rmse_per_atom": metrics.get("test_energy_rmse_per_atom"),
        "selected": len(selection["picked"]) if selection else 0,
        "diagnostics": diagnostics,
    }
    store.finish_iteration(iteration_id, summary, reason)
    publish_iteration(store, campaign_id, campaign, store.iteration(iteration_id).index, workdir, device)
    return summary


@contextmanager
def _owned(store: Store, cfg: CampaignConfig, *, wait: bool = False, accept_changes: bool = False) -> Iterator[int]:
    """Own the campaign for the ``with`` block: record it (a new campaign is created), refuse settings
    that differ from the stored ones unless accepted (:mod:`alforge.config_changes`), take the lease
    (:mod:`alforge.ownership`) and record a new config version under it; yields the campaign id."""
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
        yield cid


def campaign(
    config_path: str, *, overrides: dict[str, Any] | None = None, wait: bool = False, accept_changes: bool = False
) -> dict[str, Any]:
    """Run (or resume) the campaign described by ``config_path`` (with dotted-key ``overrides``,
    see :func:`alforge.config.load_config`) as its one owner.

    The lease is taken before Prefect starts, so a second run stops at once (or, with ``wait``,
    waits for the owner to finish); settings that differ from the stored ones are refused unless
    accepted (:mod:`alforge.config_changes`). Every way out releases the lease, puts this run's
    running labels back to pending and records a crash as the campaign's status (:mod:`alforge.ownership`).
    """
    cfg: CampaignConfig = load_config(config_path, overrides=overrides)
    with _owned(open_store(str(cfg.store)), cfg, wait=wait, accept_changes=accept_changes), _tags(cfg.name):
        return campaign_flow(config_path, overrides)


def _campaign_run_name() -> str:
    """The campaign flow run's name, the campaign's: read from the file (and overrides) without
    validating it, which the flow does next and reports properly; ``campaign`` if unreadable."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    name = (params.get("overrides") or {}).get("name")
    if name is None:
        try:
            with open(params["config_path"]) as fh:
                name = (yaml.safe_load(fh) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError, KeyError):
            name = None
    return str(name) if name else "campaign"


def _tag_flow_run(campaign: str) -> None:
    """Give this flow run the campaign's tags when it was created without them (a deployment's run:
    its tags are the deployment's). Advisory: an API error is a warning, never a failed campaign."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    wanted = {"alforge", f"campaign:{campaign}"}
    if wanted <= set(ctx.flow_run.tags):
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, tags=sorted(wanted | set(ctx.flow_run.tags)))
    except Exception as exc:  # noqa: BLE001 - tags are for the UI; the campaign goes on
        log.warning("campaign %s: could not tag its flow run: %s", campaign, exc)


@flow(name="campaign", flow_run_name=_campaign_run_name, log_prints=True)
def campaign_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The campaign's work in order, the deployable flow. Run through :func:`campaign` (``alforge
    run``), the process already owns the campaign; started any other way (a worker running a
    deployment), the flow records the campaign and takes its lease itself, as ``alforge run`` does."""
    cfg: CampaignConfig = load_config(config_path, overrides=overrides)
    _tag_flow_run(cfg.name)
    store = open_store(str(cfg.store))
    try:
        owned = holds_lease(store, store.campaign_id(cfg.name))
    except KeyError:  # a campaign not created yet: _owned creates it
        owned = False
    with nullcontext() if owned else _owned(store, cfg), _tags(cfg.name):
        return _run(cfg, store)


def _run(cfg: CampaignConfig, store: Store) -> dict[str, Any]:
    # Scratch directories of external codes go beside the campaign unless the user chose a place.
    os.environ.setdefault("ALFORGE_SCRATCH", str(cfg.workdir / "scratch"))
    url, name = str(cfg.store), cfg.name
    cid = store.campaign_id(name)
    store.set_campaign_status(cid, "running")
    calculator, params_hash = labeller_identity(cfg.labeller)
    ingest = _step(ingest_sources, name)
    ingest(url, cid, cfg.seeds, "seed", calculator, params_hash)
    if cfg.test:
        ingest(url, cid, cfg.test, "test", calculator, params_hash)
    if cfg.targets:  # structures of interest: featurized every iteration, never labelled
        ingest(url, cid, cfg.targets, "target", None, None)
    if cfg.exploration.pool:  # fixed candidates, stored once; labelled only when selected
        _step(ingest_pool, name)(url, cid, cfg.exploration.pool, str(cfg.workdir))
    if pause := _label(url, cid, cfg, name):
        return _pause(url, cid, name, pause)

    last_selection: dict | None = None
    reason: str | None = None
    summaries = []
    for k in range(1, cfg.stopping.max_iterations + 1):
        with tags(f"iteration:{k}"):
            out = iteration_flow.with_options(flow_run_name=_where(name, k))(cid, k, cfg, last_selection)
        if out["paused"]:
            return _pause(url, cid, name, out["paused"])
        summary, reason = out["summary"], out["reason"]
        last_selection = out["selection"] or last_selection
        summaries.append(summary)
        print(
            f"iteration {k}: labels {summary['labels_done']} done / {summary['labels_failed']} failed, "
            f"force RMSE train {_mev(summary['train_forces_rmse'], 'Å')} "
            f"test {_mev(summary['test_forces_rmse'], 'Å')}, selected {summary['selected']}"
            + (f" — stopping: {reason}" if reason else "")
        )
        if reason:
            break
    store.set_campaign_status(cid, "finished", reason)
    return {"campaign": name, "iterations": summaries, "stop_reason": reason, "paused": False}


@flow(name="iteration", log_prints=True, validate_parameters=False)
def iteration_flow(campaign_id: int, k: int, cfg: CampaignConfig, last_selection: dict | None) -> dict[str, Any]:
    """Iteration ``k``: train → evaluate → explore → featurize → diagnostics → select → label →
    summarise. Returns the iteration's ``summary``, its ``selection`` (None when it stopped before
    selecting), the stop ``reason`` and ``paused`` (why the labelling failure budget paused the
    campaign, or None). ``cfg`` is recorded by Prefect with its store URL redacted; the store is
    the one :func:`bind_campaign` noted for ``campaign_id``."""
    logger = get_run_logger()
    url = campaign_store_url(campaign_id)
    store, name, workdir = open_store(url), cfg.name, str(cfg.workdir)
    calculator, params_hash = labeller_identity(cfg.labeller)
    iteration_id = store.get_or_create_iteration(campaign_id, k)

    model_id = _step(train_model, name)(url, campaign_id, iteration_id, cfg.mlip, workdir)
    trained = store.model(model_id).metrics
    logger.info(
        "train: %s structures, %s epochs, force RMSE train %s valid %s",
        trained.get("n_train", len(store.model(model_id).train_ids)), trained.get("epochs", "?"),
        _mev(trained.get("train_forces_rmse"), "Å"), _mev(trained.get("valid_forces_rmse"), "Å"),
    )
    metrics = _step(evaluate_model, name)(url, campaign_id, model_id)
    if "n_test" in metrics:
        logger.info(
            "evaluate: %d test structures, energy RMSE %s, force RMSE %s", metrics["n_test"],
            _mev(metrics.get("test_energy_rmse_per_atom"), "atom"), _mev(metrics.get("test_forces_rmse"), "Å"),
        )
    selected_so_far = len(store.labelled_ids(campaign_id, role="candidate"))
    reason = stop_reason(cfg.stopping, metrics, selected_so_far, last_selection)
    if reason is None and k == cfg.stopping.max_iterations:
        reason = f"reached max_iterations = {k}"
    candidates: list[int] = []
    if reason is None:
        candidates = explore(url, campaign_id, iteration_id, model_id, cfg, name, k)
        logger.info("explore: %d candidates", len(candidates))
    watched = store.labelled_ids(campaign_id, role="test") + store.structure_ids(campaign_id, role="target")
    computed = _step(featurize, name)(url, model_id, candidates + watched, with_training_set=True)
    logger.info("featurize: %d structures computed (candidates, test, targets, training set)", computed)
    diag = _step(diagnostics, name)(url, campaign_id, model_id, candidates, cfg.uncertainty)
    calibration = diag.get("calibration") or {}
    logger.info(
        "diagnostics: H %s, ς %s (%s); calibration α² %s, Spearman %s on %d test structures",
        diag["hessian"]["form"], _num(diag["hessian"]["regularizer"]), diag["hessian"]["regularizer_method"],
        _num(calibration.get("alpha2")), _num(calibration.get("spearman"), ".2f"), calibration.get("n", 0),
    )
    selection: dict | None = None
    if reason is None:
        committee = getattr(make_selector(cfg.selector.name, **cfg.selector.params), "committee_size", 0)
        if committee:
            _step(train_committee, name)(url, model_id, committee, cfg.mlip, workdir)
        budget = remaining_budget(cfg.stopping, cfg.selector.batch_size, selected_so_far)
        selector_cfg = cfg.selector.model_copy(update={"batch_size": budget})
        selection = _step(select_batch, name)(
            url, campaign_id, iteration_id, model_id, selector_cfg, calculator, params_hash, cfg.uncertainty, cfg.seed
        )
        scores = selection["scores"]
        logger.info(
            "select: %s picked %d of %d candidates%s", selection["selector"], len(selection["picked"]),
            selection["n_candidates"], f", scores {min(scores):.3g} … {max(scores):.3g}" if scores else "",
        )
        if pause := _label(url, campaign_id, cfg, name, k):
            return {"summary": None, "selection": selection, "reason": None, "paused": pause}
    summary = _step(summarise, name)(
        url, campaign_id, iteration_id, metrics, selection, reason, diag, name, workdir, cfg.mlip.device
    )
    return {"summary": summary, "selection": selection, "reason": reason, "paused": None}
