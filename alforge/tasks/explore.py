"""MD exploration with the iteration's model, one task per walker (alforge/flows/exploration.py
runs them on the campaign's task runner): :func:`plan_walkers` draws every walker's start and seed
from the campaign seed, :func:`run_md_walker` runs one walker anywhere and stores its frames as
candidates of the iteration.

A walker stores its own frames (one transaction, deduplicated by structure hash), so a walker on
another process needs nothing but its arguments; the flow marks the iteration explored once every
walker is stored. A run that crashed between walkers runs them again on resume with the same starts
and seeds: frames already stored are the same structures and map to their stored ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from alforge.config import ExplorationConfig
from alforge.exploration.md import MDSettings, repeated, run_walker
from alforge.tasks.common import open_store
from alforge.tasks.featurize import atom_features, ensure_features
from alforge.tasks.worker import WorkerContext


@dataclass(frozen=True)
class Walker:
    """One MD trajectory to run: where it starts, how hot, and its random seed."""

    index: int
    start_id: int
    temperature_K: float
    seed: int


@dataclass(frozen=True)
class ExplorationPlan:
    walkers: list[Walker]
    #: per element, the MaxVol active set of the model's training atoms (``exploration.gamma_hi``
    #: stops a walker past it); computed once here rather than by every walker
    active_sets: dict | None


@task(name="explore", tags=["alforge", "step:explore"], cache_policy=NO_CACHE)
def plan_walkers(
    store_url: str, campaign_id: int, iteration_id: int, model_id: int, cfg: ExplorationConfig, seed: int
) -> ExplorationPlan:
    """Each walker's start (a training structure of the model), temperature and seed, all drawn
    from ``(seed, iteration index)``: the same plan every time the iteration is explored."""
    store = open_store(store_url)
    iteration = store.iteration(iteration_id)
    model = store.model(model_id)
    rng = np.random.default_rng([seed, iteration.index])
    starts = [int(i) for i in rng.choice(model.train_ids, size=cfg.walkers, replace=len(model.train_ids) < cfg.walkers)]
    walkers = [
        Walker(k, start, cfg.temperatures[k % len(cfg.temperatures)], int(rng.integers(2**31)))
        for k, start in enumerate(starts)
    ]
    if cfg.probe_min_reliable is not None:  # trained once here; every walker loads it from the store
        from alforge.tasks.probe import campaign_probe_settings, ensure_probe

        ensure_probe(store_url, model_id, **campaign_probe_settings(store, campaign_id))
    if cfg.ltau_max is not None:  # the training atoms' embeddings, read by every walker's LTAU check
        from alforge.tasks.ltau import ensure_ltau_inputs

        ensure_ltau_inputs(store_url, model_id)
    return ExplorationPlan(walkers, _active_sets(store_url, model_id) if cfg.gamma_hi is not None else None)


def _active_sets(store_url: str, model_id: int) -> dict:
    """Active sets from the model's own training atoms, for the per-frame γ check."""
    from alforge.selectors.dopt import active_sets

    store = open_store(store_url)
    train_ids = [int(i) for i in store.model(model_id).train_ids]
    ensure_features(store_url, model_id, train_ids)
    rows, _ = atom_features(store_url, model_id, train_ids)
    numbers = np.concatenate([a.numbers for a in store.get_atoms(train_ids)])
    return {int(z): aset for z, aset in active_sets(rows, numbers).items()}


@task(name="explore-walker", tags=["alforge", "step:explore"], cache_policy=NO_CACHE)
def run_md_walker(
    worker: WorkerContext,
    campaign_id: int,
    iteration_id: int,
    model_id: int,
    walker: Walker,
    cfg: ExplorationConfig,
    active_sets: dict | None,
) -> list[int]:
    """Run one walker with the model and store its frames as candidates; returns their ids. Runs in
    any process: all it needs comes in its arguments (``worker``: alforge/tasks/worker.py)."""
    from alforge.mlip.mace_model import load_calculator, load_model

    store = worker.open()
    model_file = store.model_file(model_id)  # checked against its stored hash
    (atoms,) = store.get_atoms([walker.start_id])
    atoms.info.clear()
    atoms = repeated(atoms, cfg.supercell)  # exploration.supercell: large cells for the lpr selector
    check = None
    if active_sets is not None and cfg.gamma_hi is not None:
        from alforge.exploration.extrapolation import gamma_check

        check = gamma_check(load_model(model_file), active_sets, cfg.gamma_hi)
    if cfg.probe_min_reliable is not None:  # PROBE p_reliable below the cutoff stops the walker
        from alforge.tasks.probe import chain_checks, walker_probe_check

        probe = walker_probe_check(store, campaign_id, model_id, model_file, cfg.probe_min_reliable)
        check = chain_checks(check, probe)
    if cfg.ltau_max is not None:  # LTAU p above the cutoff stops the walker
        from alforge.tasks.ltau import walker_ltau_check
        from alforge.tasks.probe import chain_checks

        check = chain_checks(check, walker_ltau_check(store, campaign_id, model_id, model_file, cfg.ltau_max))
    settings = MDSettings(
        temperature_K=walker.temperature_K,
        timestep_fs=cfg.timestep_fs,
        steps=cfg.steps,
        frame_interval=cfg.frame_interval,
        friction_per_fs=cfg.friction_per_fs,
        min_distance=cfg.min_distance,
        max_energy_change=cfg.max_energy_change,
    )
    provenance = {"walker": walker.index, "model_id": model_id}
    if cfg.supercell is not None:
        provenance["supercell"] = list(cfg.supercell)
    traj = run_walker(atoms, load_calculator(model_file), settings, walker.seed, provenance, check)
    get_run_logger().info(
        "walker %d (T=%g K, from structure %d): %d steps, %d frames%s",
        walker.index, walker.temperature_K, walker.start_id, traj.steps_run, len(traj.frames),
        f", stopped: {traj.stop_reason}" if traj.stop_reason else "",
    )
    keys = ("walker", "md_step", "temperature_K", "model_id", *(("supercell",) if cfg.supercell else ()))
    return store.add_structures(
        campaign_id, traj.frames, role="candidate", source="md", iteration_id=iteration_id,
        parent_ids=[walker.start_id] * len(traj.frames), provenance=[{k: f.info[k] for k in keys} for f in traj.frames],
    )
