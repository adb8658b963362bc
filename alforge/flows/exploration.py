"""An iteration's exploration: its MD walkers as tasks on the campaign's task runner (threads, or
Dask workers: alforge/flows/execution.py), then its candidate pool (MD frames plus the unlabelled
structures of a fixed pool). Explored once: a stored exploration is read back, never run again."""

from __future__ import annotations

from prefect import flow
from prefect.futures import wait

from alforge.config import CampaignConfig, ExplorationConfig
from alforge.flows.execution import make_task_runner, worker_context
from alforge.tasks.common import bind_campaign, campaign_store_url, open_store
from alforge.tasks.explore import plan_walkers, run_md_walker
from alforge.tasks.worker import WorkerContext


@flow(name="explore")
def explore_walkers(
    campaign_id: int, iteration_id: int, model_id: int, cfg: ExplorationConfig, seed: int, worker: WorkerContext,
    campaign: str,
) -> list[int]:
    """Run every walker of the plan (as many at once as the runner takes), each storing its own
    frames; then mark the iteration explored. The store is the one the campaign is bound to in
    this process (a URL parameter would be recorded by Prefect)."""
    store_url = campaign_store_url(campaign_id)
    plan = plan_walkers.with_options(task_run_name=f"explore {campaign}")(
        store_url, campaign_id, iteration_id, model_id, cfg, seed
    )
    named = run_md_walker.with_options(task_run_name=f"explore {campaign}#walker-" + "{walker.index}")
    futures = [
        named.submit(worker, campaign_id, iteration_id, model_id, walker, cfg, plan.active_sets)
        for walker in plan.walkers
    ]
    wait(futures)
    for fut in futures:
        fut.result()  # a walker that raised fails the exploration before it is marked done
    return _explored(store_url, campaign_id, iteration_id)


def _explored(store_url: str, campaign_id: int, iteration_id: int) -> list[int]:
    store = open_store(store_url)
    store.add_structures(campaign_id, [], role="candidate", source="md", iteration_id=iteration_id,
                         completes_exploration=True)
    return store.candidate_pool_ids(campaign_id, iteration_id)


def explore(
    url: str, campaign_id: int, iteration_id: int, model_id: int, cfg: CampaignConfig, campaign: str, iteration: int
) -> list[int]:
    """Candidate structure ids of iteration ``iteration``: its MD frames (the stored ones if it was
    already explored) and every unlabelled, non-quarantined structure of the fixed pool. A task
    runner (a Dask cluster, maybe) is started only when there are walkers to run."""
    store = open_store(url)
    if store.iteration(iteration_id).explored:
        return store.candidate_pool_ids(campaign_id, iteration_id)
    if cfg.exploration.walkers == 0:  # pool only: nothing to run, but the iteration is explored
        return _explored(url, campaign_id, iteration_id)
    bind_campaign(campaign_id, url)
    # Threads of one process take the walkers one at a time: a MACE calculator sets torch's
    # process-wide default dtype, so two loading at once break each other. Worker processes do not.
    parallel = cfg.exploration.walkers if cfg.execution.task_runner == "dask" else 1
    runner = make_task_runner(cfg, parallel)
    run = explore_walkers.with_options(task_runner=runner, flow_run_name=f"{campaign}/iteration-{iteration}/explore")
    return run(campaign_id, iteration_id, model_id, cfg.exploration, cfg.seed, worker_context(cfg), campaign)
