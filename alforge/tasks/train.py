"""Train the iteration's model on every finished training label, and evaluate it on the test set."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.mlip.params import MACEParams
from alforge.monitoring import DETAIL, slug
from alforge.monitoring.progress import Progress
from alforge.storage.model_files import file_sha256
from alforge.tasks.common import open_store

if TYPE_CHECKING:
    from alforge.mlip.mace_model import TrainResult
    from alforge.storage import Store

TRAINING_ROLES = ("seed", "candidate")


def training_ids(store_url: str, campaign_id: int) -> list[int]:
    store = open_store(store_url)
    labelled = set(store.labelled_ids(campaign_id))
    pool = []
    for role in TRAINING_ROLES:
        pool += store.structure_ids(campaign_id, role=role, include_quarantined=False)
    return sorted(i for i in pool if i in labelled)


def _unique_model_path(workdir: str, stem: str) -> Path:
    """A file name no other run uses (``<stem>-<8 hex>.model``): a model file is never replaced, so a
    row can never come to describe another run's model."""
    return Path(workdir) / "models" / f"{stem}-{uuid.uuid4().hex[:8]}.model"


def _discard(path: Path) -> None:
    """Remove a model this run trained but another run stored first (and its settings file)."""
    from alforge.mlip.mace_model import training_settings_path

    for p in (path, training_settings_path(path)):
        p.unlink(missing_ok=True)


class EpochLog:
    """``on_epoch`` of :func:`~alforge.mlip.mace_model.train_mace` for a task: one run-log line per
    epoch (marked :data:`~alforge.monitoring.DETAIL`: the UI shows it, the default console does not),
    the ``<slug>-training`` progress bar (if given), and the rows for the store's ``training_epochs``
    (``seconds``: since the previous epoch ended, or, for the first, since this log was made)."""

    def __init__(self, progress: Progress | None, what: str) -> None:
        from prefect import get_run_logger

        self.progress = progress
        self.what = what
        self.rows: list[dict[str, Any]] = []
        self._logger = get_run_logger()
        self._last = time.monotonic()

    def __call__(self, epoch: int, total: int, train_loss: float, valid: dict[str, float]) -> None:
        now = time.monotonic()
        row = {
            "epoch": epoch, "epochs": total, "train_loss": train_loss, "valid_loss": valid.get("loss"),
            "valid_energy_rmse_per_atom": valid.get("energy_rmse_per_atom"),
            "valid_forces_rmse": valid.get("forces_rmse"), "seconds": now - self._last,
        }
        self._last = now
        self.rows.append(row)
        text = f"{self.what}: epoch {epoch}/{total}  train loss {train_loss:.4g}"
        if row["valid_forces_rmse"] is not None:
            text += f"  valid F-RMSE {1000 * row['valid_forces_rmse']:.1f} meV/Å"
        if row["valid_energy_rmse_per_atom"] is not None:
            text += f"  E-RMSE {1000 * row['valid_energy_rmse_per_atom']:.1f} meV/atom"
        self._logger.info(text + f"  ({row['seconds']:.1f} s)", extra=DETAIL)
        if self.progress is not None:
            self.progress.total = total  # a finetune runs fewer epochs than a training from scratch
            self.progress.advance(1)


@task(name="train", tags=["alforge", "step:train"], cache_policy=NO_CACHE)
def train_model(
    store_url: str, campaign_id: int, iteration_id: int, params: MACEParams, workdir: str
) -> int:
    """Model id of this iteration, training it unless the store already has it.

    Continues from the previous iteration's weights (alforge's weights-only model file),
    once their file's hash matches the store. The new model goes to a unique path and its row
    carries the file's SHA-256; if another run stored this iteration's model first, that one wins
    and this run's file is removed.
    """
    from alforge.mlip.mace_model import train_mace

    store = open_store(store_url)
    existing = store.model_for_iteration(iteration_id)
    if existing is not None:
        store.model_file(existing.id)  # its file is there and is the one stored (ModelFileError if not)
        return existing.id
    index = store.iteration(iteration_id).index
    previous = [m for m in store.models(campaign_id) if m.iteration_index < index]
    init = store.model_file(previous[-1].id) if previous and Path(previous[-1].path).exists() else None
    ids = training_ids(store_url, campaign_id)
    if not ids:
        raise RuntimeError(f"campaign {campaign_id}: no labelled training structures to train on")
    atoms = store.get_labelled_atoms(ids)
    out = _unique_model_path(workdir, f"iteration-{index:03d}")
    out.parent.mkdir(parents=True, exist_ok=True)
    epochs = params.finetune_epochs if init is not None else params.max_epochs
    key = f"{slug(store.campaign_name(campaign_id))}-training"
    with Progress(key=key, description=f"training iteration {index}", total=epochs) as progress:
        log = EpochLog(progress, f"iteration {index}")
        result = train_mace(atoms, params, out, init_model=init, on_epoch=log)
    metrics = {**result.metrics, "epochs": result.epochs, "finetuned": result.finetuned, "n_train": len(ids)}
    model_id = store.add_model(
        campaign_id, iteration_id, str(out), ids, metrics,
        parent_model_id=previous[-1].id if previous else None, sha256=file_sha256(out),
    )
    if store.model(model_id).path != str(out):
        _discard(out)  # the winner stored its own epochs
    else:
        store.add_training_epochs(model_id, log.rows)
        store_training_errors(store, model_id, [ids[i] for i in result.training["train_indices"]], result)
    return model_id


def store_training_errors(store: Store, model_id: int, train_ids: list[int], result: TrainResult) -> None:
    """Store the per-sample training errors of ``result`` for the model (``train_ids``: its fitted
    structures, in training order), as :func:`~alforge.uncertainty.ltau.summarize_error_log`
    compacts them: at most 64 float16 columns, so ≤ 130 bytes per atom however many epochs."""
    from alforge.storage.store import TrainingErrors
    from alforge.uncertainty.ltau import summarize_error_log

    log = result.errors
    forces, form = summarize_error_log(log.forces)
    energy, _ = summarize_error_log(log.energy)
    store.put_training_errors(model_id, TrainingErrors(
        structure_ids=np.asarray(train_ids, dtype=np.int64), atom_counts=log.atom_counts,
        forces=forces, energy=energy, forces_last=log.forces[:, -1], energy_last=log.energy[:, -1],
        n_epochs=log.forces.shape[1], form=form,
    ))


@task(name="train-committee", tags=["alforge", "step:train"], cache_policy=NO_CACHE)
def train_committee(store_url: str, model_id: int, size: int, params: MACEParams, workdir: str) -> list[str]:
    """Paths of the model's committee (itself first), training the missing members: same data,
    seeds ``params.seed + m``, each continuing from the previous iteration's member ``m``. Files
    and rows as in :func:`train_model`: unique paths, hashes, the first stored member wins."""
    from alforge.mlip.mace_model import train_mace

    store = open_store(store_url)
    model = store.model(model_id)
    members = {m: str(p) for m, p in store.committee_files(model_id).items()}
    previous = {}
    if model.parent_model_id is not None:
        previous = store.committee_files(model.parent_model_id, skip_missing=True)
    atoms = None
    for m in range(1, size):
        if m in members:
            continue
        atoms = atoms or store.get_labelled_atoms([int(i) for i in model.train_ids])
        out = _unique_model_path(workdir, f"iteration-{model.iteration_index:03d}.member-{m}")
        out.parent.mkdir(parents=True, exist_ok=True)
        seed = params.seed + m
        log = EpochLog(None, f"iteration {model.iteration_index} committee member {m}")
        result = train_mace(
            atoms, params.model_copy(update={"seed": seed}), out, init_model=previous.get(m), on_epoch=log
        )
        stored = store.add_committee_member(model_id, m, seed, str(out), result.metrics, sha256=file_sha256(out))
        if stored != str(out):
            _discard(out)
        members[m] = stored
    return [str(store.model_file(model_id))] + [members[m] for m in range(1, size)]


@task(name="evaluate", tags=["alforge", "step:evaluate"], cache_policy=NO_CACHE)
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
    errors = evaluate(store.model_file(model_id), store.get_labelled_atoms(test_ids))
    metrics = {f"test_{k}": v for k, v in errors.items()} | {"n_test": len(test_ids)}
    store.update_model_metrics(model_id, metrics)
    return info.metrics | metrics
