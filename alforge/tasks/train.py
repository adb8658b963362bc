"""Train the iteration's model on every finished training label, and evaluate it on the test set."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.mlip.params import MACEParams
from alforge.tasks.common import open_store

TRAINING_ROLES = ("seed", "candidate")


def training_ids(store_url: str, campaign_id: int) -> list[int]:
    store = open_store(store_url)
    labelled = set(store.labelled_ids(campaign_id))
    pool = []
    for role in TRAINING_ROLES:
        pool += store.structure_ids(campaign_id, role=role, include_quarantined=False)
    return sorted(i for i in pool if i in labelled)


@task(name="train", tags=["train"], cache_policy=NO_CACHE)
def train_model(
    store_url: str, campaign_id: int, iteration_id: int, params: MACEParams, workdir: str
) -> int:
    """Model id of this iteration, training it unless the store already has it.

    Continues from the previous iteration's weights (mace's format, loadable by ``MACECalculator``).
    """
    from alforge.mlip.mace_model import train_mace

    store = open_store(store_url)
    existing = store.model_for_iteration(iteration_id)
    if existing is not None:
        if not Path(existing.path).exists():
            raise FileNotFoundError(
                f"model {existing.id} of iteration {existing.iteration_index} is in the store but its file "
                f"{existing.path} is missing; restore it or start a new campaign"
            )
        return existing.id
    index = store.iteration(iteration_id).index
    previous = [m for m in store.models(campaign_id) if m.iteration_index < index]
    init = Path(previous[-1].path) if previous and Path(previous[-1].path).exists() else None
    ids = training_ids(store_url, campaign_id)
    if not ids:
        raise RuntimeError(f"campaign {campaign_id}: no labelled training structures to train on")
    atoms = store.get_labelled_atoms(ids)
    out = Path(workdir) / "models" / f"iteration-{index:03d}.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = train_mace(atoms, params, out, init_model=init)
    metrics = {**result.metrics, "epochs": result.epochs, "finetuned": result.finetuned, "n_train": len(ids)}
    return store.add_model(
        campaign_id, iteration_id, str(out), ids, metrics, parent_model_id=previous[-1].id if previous else None
    )


@task(name="train-committee", tags=["train"], cache_policy=NO_CACHE)
def train_committee(store_url: str, model_id: int, size: int, params: MACEParams, workdir: str) -> list[str]:
    """Paths of the model's committee (itself first), training the missing members: same data,
    seeds ``params.seed + m``, each continuing from the previous iteration's member ``m``."""
    from alforge.mlip.mace_model import train_mace

    store = open_store(store_url)
    model = store.model(model_id)
    members = store.committee_paths(model_id)
    previous = {}
    if model.parent_model_id is not None:
        previous = store.committee_paths(model.parent_model_id)
    atoms = None
    for m in range(1, size):
        if m in members:
            continue
        atoms = atoms or store.get_labelled_atoms([int(i) for i in model.train_ids])
        out = Path(workdir) / "models" / f"iteration-{model.iteration_index:03d}.member-{m}.model"
        init = Path(previous[m]) if m in previous and Path(previous[m]).exists() else None
        seed = params.seed + m
        result = train_mace(atoms, params.model_copy(update={"seed": seed}), out, init_model=init)
        store.add_committee_member(model_id, m, seed, str(out), result.metrics)
        members[m] = str(out)
    return [model.path] + [members[m] for m in range(1, size)]


@task(name="evaluate", tags=["evaluate"], cache_policy=NO_CACHE)
def evaluate_model(store_url: str, campaign_id: int, model_id: int) -> dict[str, float]:
    """Errors on the held-out test set, stored with the model as ``test_*`` metrics."""
    from alforge.mlip.mace_model import evaluate

    store = open_store(store_url)
    info = store.model(model_id)
    if "n_test" in info.metrics:  # evaluated before (an energy-only test set has no force metrics)
        return info.metrics
    test_ids = sorted(set(store.labelled_ids(campaign_id, role="test")))
    if not test_ids:
        return info.metrics
    errors = evaluate(Path(info.path), store.get_labelled_atoms(test_ids))
    metrics = {f"test_{k}": v for k, v in errors.items()} | {"n_test": len(test_ids)}
    store.update_model_metrics(model_id, metrics)
    return info.metrics | metrics
