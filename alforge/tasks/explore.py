"""Run MD walkers with the iteration's model and store their frames as candidates; return the
iteration's candidate pool (its MD frames plus the unlabelled structures of a fixed pool)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from alforge.config import ExplorationConfig
from alforge.exploration.md import MDSettings, run_walker
from alforge.tasks.common import open_store
from alforge.tasks.featurize import atom_features, ensure_features


def _gamma_check(store_url: str, model_id: int, gamma_hi: float) -> Callable[[Atoms], str | None]:
    """Active sets from the model's own training atoms, and a per-frame γ check against them."""
    from alforge.exploration.extrapolation import gamma_check
    from alforge.mlip.mace_model import load_model
    from alforge.selectors.dopt import active_sets

    store = open_store(store_url)
    model = store.model(model_id)
    train_ids = [int(i) for i in model.train_ids]
    ensure_features(store_url, model_id, train_ids)
    rows, _ = atom_features(store_url, model_id, train_ids)
    numbers = np.concatenate([a.numbers for a in store.get_atoms(train_ids)])
    active = {int(z): aset for z, aset in active_sets(rows, numbers).items()}
    return gamma_check(load_model(store.model_file(model_id)), active, gamma_hi)


@task(name="explore", tags=["explore"], cache_policy=NO_CACHE)
def explore(
    store_url: str, campaign_id: int, iteration_id: int, model_id: int, cfg: ExplorationConfig, seed: int
) -> list[int]:
    """Candidate structure ids of this iteration: its MD frames (the stored ones if it was already
    explored) and every unlabelled, non-quarantined structure of the fixed pool."""
    from alforge.mlip.mace_model import load_calculator

    store = open_store(store_url)
    iteration = store.iteration(iteration_id)
    if iteration.explored:
        return store.candidate_pool_ids(campaign_id, iteration_id)
    if cfg.walkers == 0:  # pool only: nothing to run, but the iteration is explored
        store.add_structures(campaign_id, [], role="candidate", source="md", iteration_id=iteration_id,
                             completes_exploration=True)
        return store.candidate_pool_ids(campaign_id, iteration_id)
    model = store.model(model_id)
    rng = np.random.default_rng([seed, iteration.index])
    starts = [int(i) for i in rng.choice(model.train_ids, size=cfg.walkers, replace=len(model.train_ids) < cfg.walkers)]
    start_atoms = store.get_atoms(starts)
    calc = load_calculator(store.model_file(model_id))
    check = _gamma_check(store_url, model_id, cfg.gamma_hi) if cfg.gamma_hi is not None else None
    logger = get_run_logger()
    frames, parents, provenance = [], [], []
    for walker, (start_id, atoms) in enumerate(zip(starts, start_atoms)):
        temperature = cfg.temperatures[walker % len(cfg.temperatures)]
        settings = MDSettings(
            temperature_K=temperature,
            timestep_fs=cfg.timestep_fs,
            steps=cfg.steps,
            frame_interval=cfg.frame_interval,
            friction_per_fs=cfg.friction_per_fs,
            min_distance=cfg.min_distance,
            max_energy_change=cfg.max_energy_change,
        )
        atoms.info.clear()
        walker_seed = int(rng.integers(2**31))
        traj = run_walker(atoms, calc, settings, walker_seed, {"walker": walker, "model_id": model_id}, check)
        logger.info(
            "walker %d (T=%g K, from structure %d): %d steps, %d frames%s",
            walker, temperature, start_id, traj.steps_run, len(traj.frames),
            f", stopped: {traj.stop_reason}" if traj.stop_reason else "",
        )
        for frame in traj.frames:
            frames.append(frame)
            parents.append(start_id)
            provenance.append({k: frame.info[k] for k in ("walker", "md_step", "temperature_K", "model_id")})
    store.add_structures(
        campaign_id, frames, role="candidate", source="md", iteration_id=iteration_id,
        parent_ids=parents, provenance=provenance, completes_exploration=True,
    )
    return store.candidate_pool_ids(campaign_id, iteration_id)
