"""Compute and store per-atom features of structures under one model (METHODS §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import DTypeLike
from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.tasks.common import open_store

if TYPE_CHECKING:
    from alforge.mlip.loss_weights import LossWeights

LAST_LAYER = "last_layer"
INVARIANT = "invariant"
ENERGY = "energy"  # the model's energy of the structure, shape (1,): residuals for calibration
LABEL_ROWS = "label_rows"  # R_s with R_sᵀR_s = the loss Gauss–Newton rows a label adds (mlip/jacobians.py)
CHUNK = 256  # structures per compute-and-store round: bounded memory, steady progress in the store


def ensure_features(store_url: str, model_id: int, structure_ids: list[int]) -> int:
    """Compute and store last-layer (float64) and invariant (float32) features of the structures
    that lack them under this model; returns how many were computed."""
    store = open_store(store_url)
    # ENERGY is the newest kind: structures featurized before it existed are computed again
    todo = store.missing_features(model_id, ENERGY, list(dict.fromkeys(structure_ids)))
    if not todo:  # nothing to compute: no torch/MACE import (~5-20 s), as in every select step
        return 0
    from alforge.mlip.features import compute_features

    path = store.model_file(model_id)  # hash-checked before it is loaded
    for start in range(0, len(todo), CHUNK):
        ids = todo[start : start + CHUNK]
        feats = compute_features(path, store.get_atoms(ids))
        store.put_features(
            model_id,
            {
                LAST_LAYER: ({i: f.last_layer for i, f in zip(ids, feats)}, "<f8"),
                INVARIANT: ({i: f.invariant for i, f in zip(ids, feats)}, "<f4"),
                ENERGY: ({i: np.array([f.energy]) for i, f in zip(ids, feats)}, "<f8"),
            },
        )
    return len(todo)


@task(name="featurize", tags=["alforge", "step:featurize"], cache_policy=NO_CACHE)
def featurize(store_url: str, model_id: int, structure_ids: list[int], with_training_set: bool = False) -> int:
    """Features of ``structure_ids`` and, if asked, of the model's own training set (selectors
    build ``H`` from it); returns how many structures were computed."""
    train = [int(i) for i in open_store(store_url).model(model_id).train_ids] if with_training_set else []
    return ensure_features(store_url, model_id, list(structure_ids) + train)


def structure_features(
    store_url: str, model_id: int, structure_ids: list[int], dtype: DTypeLike = np.float64
) -> np.ndarray:
    """``f_s = Σ_j f_j``: the structure-level last-layer features (METHODS §1), (n, d), summed in
    float64 while the per-atom blobs stream from the store (they are never all in memory)."""
    return open_store(store_url).get_feature_sums(model_id, LAST_LAYER, structure_ids, dtype=dtype)


def model_energies(store_url: str, model_id: int, structure_ids: list[int]) -> np.ndarray:
    return np.array([e[0] for e in open_store(store_url).get_features(model_id, ENERGY, structure_ids)])


def atom_features(
    store_url: str, model_id: int, structure_ids: list[int], dtype: DTypeLike = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom last-layer rows and, for each row, the position of its structure in ``structure_ids``.

    The rows are one ``dtype`` array the store fills in place, chunk by chunk: float32 halves what a
    million candidate atoms hold (0.5 GB at d = 128) and nothing else is allocated at that size.
    """
    stacked = open_store(store_url).get_feature_rows(model_id, LAST_LAYER, structure_ids, dtype=dtype)
    return stacked.rows, stacked.groups()


def ensure_label_rows(
    store_url: str,
    model_id: int,
    structure_ids: list[int],
    weights: LossWeights,
    dtype: DTypeLike = np.float64,
) -> list[np.ndarray]:
    """Per structure, the compact factor ``R_s`` of the energy + force (+ stress) rows its label
    adds to the model's loss Hessian under ``weights`` (those of the model's stored ``H``, so the
    blocks and ``H`` agree); computed once per (structure, model). The blocks are views of one
    ``dtype`` array read in chunks from the store (:meth:`Store.get_feature_rows`)."""
    store = open_store(store_url)
    todo = store.missing_features(model_id, LABEL_ROWS, list(dict.fromkeys(structure_ids)))
    if todo:  # the Jacobians need torch and the model; stored rows need neither
        from alforge.mlip.jacobians import label_rows

        path = store.model_file(model_id)  # hash-checked before it is loaded
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        rows = label_rows(path, store.get_atoms(chunk), weights)
        store.put_features(model_id, {LABEL_ROWS: (dict(zip(chunk, rows)), "<f8")})
    return store.get_feature_rows(model_id, LABEL_ROWS, structure_ids, dtype=dtype).blocks()
