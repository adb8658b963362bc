"""LTAU in a campaign (METHODS §7): fitted per model from what the store already holds.

A model's LTAU needs two things the campaign keeps: the training-error log its training stored
(:meth:`~alforge.storage.store.Store.training_errors`, rows = the training split's atoms) and the
per-atom ``invariant`` features of those training structures under the model (the embedding,
METHODS §1). :func:`fitted_ltau` builds the FAISS indices once per (model, settings) and process and
keeps the last few, so the selector and every frame check of an MD walker reuse them.

The settings are the ``ltau`` selector's parameters when the campaign selects with it, else
:data:`LTAU_SETTINGS` (:func:`campaign_ltau_settings`), so the selector and the MD stopping signal
(``exploration.ltau_max``) read the same uncertainty.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from alforge.tasks.common import open_store
from alforge.tasks.featurize import INVARIANT, ensure_features
from alforge.uncertainty.ltau import LTAU

if TYPE_CHECKING:
    from alforge.storage import Store

__all__ = [
    "LTAU_SETTINGS",
    "FittedLTAU",
    "campaign_ltau_settings",
    "campaign_uses_ltau",
    "ensure_ltau_inputs",
    "fitted_ltau",
    "ltau_check",
    "ltau_context",
    "ltau_evaluation",
    "walker_ltau_check",
]

#: LTAU settings a campaign may give (as ``ltau`` selector parameters), with their defaults
LTAU_SETTINGS: dict[str, Any] = {"k": 10, "atol": None, "rtol": 0.0, "index": "auto", "per_element": True}
#: fitted LTAUs kept per process (one per model and settings; the newest few)
CACHE_SIZE = 4


@dataclass(frozen=True)
class FittedLTAU:
    """A model's fitted :class:`LTAU` and how its training atoms map to training structures.

    ``train_groups[r]`` is the position (in ``structure_ids``) of the structure of the fitted row
    ``r``; atoms without reference forces are left out of the fit (their errors are NaN).
    """

    ltau: LTAU
    per_element: bool
    structure_ids: np.ndarray
    train_groups: np.ndarray

    def predict(self, embeddings: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        """LTAU ``p`` of each atom (rows of ``embeddings``, atomic ``numbers``)."""
        return self.ltau.predict(embeddings, elements=numbers if self.per_element else None)


def campaign_ltau_settings(store: Store, campaign_id: int) -> dict[str, Any]:
    """The LTAU settings of the campaign's latest config: the ``ltau`` selector's, else the defaults."""
    config = json.loads(store.config_versions(campaign_id)[-1].config_json)
    selector = config.get("selector") or {}
    params = selector.get("params", {}) if selector.get("name") == "ltau" else {}
    return {k: params.get(k, default) for k, default in LTAU_SETTINGS.items()}


def campaign_uses_ltau(store: Store, campaign_id: int) -> bool:
    """Whether the campaign's latest config selects with ``ltau`` or stops walkers on it."""
    config = json.loads(store.config_versions(campaign_id)[-1].config_json)
    return (config.get("selector") or {}).get("name") == "ltau" or (
        (config.get("exploration") or {}).get("ltau_max") is not None
    )


def ensure_ltau_inputs(store_url: str, model_id: int) -> None:
    """Compute the invariant features of the model's logged training structures if missing; raise
    when the model has no training-error log (trained before logs were stored)."""
    errors = open_store(store_url).training_errors(model_id)
    if errors is None:
        raise RuntimeError(
            f"model {model_id} has no stored training errors, which LTAU needs: it was trained before "
            "they were logged (or its run stopped between storing the model and its log); retrain it"
        )
    ensure_features(store_url, model_id, [int(i) for i in errors.structure_ids])


_CACHE: dict[tuple, FittedLTAU] = {}
_LOCK = threading.Lock()


def fitted_ltau(store: Store, model_id: int, settings: dict[str, Any]) -> FittedLTAU:
    """The model's LTAU for ``settings`` (:data:`LTAU_SETTINGS` keys), fitted from the store's
    training-error log and invariant features (see :func:`ensure_ltau_inputs`), cached per process."""
    full = {k: settings.get(k, default) for k, default in LTAU_SETTINGS.items()}
    key = (store.url, model_id, tuple(sorted(full.items())))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    fitted = _fit(store, model_id, full)
    with _LOCK:
        _CACHE[key] = fitted
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    return fitted


def _fit(store: Store, model_id: int, settings: dict[str, Any]) -> FittedLTAU:
    errors = store.training_errors(model_id)
    if errors is None:
        raise RuntimeError(f"model {model_id} has no stored training errors (see ensure_ltau_inputs)")
    ids = [int(i) for i in errors.structure_ids]
    features = store.get_features(model_id, INVARIANT, ids)
    sizes = [len(f) for f in features]
    if sizes != [int(n) for n in errors.atom_counts]:
        raise RuntimeError(f"model {model_id}: the training-error log's atom counts do not match the structures' features")
    embeddings = np.concatenate(features)
    groups = np.repeat(np.arange(len(ids)), sizes)
    keep = np.all(np.isfinite(errors.forces), axis=1)
    if not keep.any():
        raise RuntimeError(f"model {model_id}: no training atom has reference forces, LTAU has nothing to learn from")
    atol = settings["atol"]
    if atol is None:  # the final-epoch training MAE (read from the last epoch even of a quantile summary)
        atol = float(np.mean(errors.forces_last[keep], dtype=np.float64))
    fit_kwargs: dict[str, Any] = {}
    if settings["per_element"]:
        fit_kwargs["elements"] = np.concatenate([a.numbers for a in store.get_atoms(ids)])[keep]
    if settings["rtol"] > 0:
        labelled = store.get_labelled_atoms(ids)
        fit_kwargs["reference_norms"] = np.concatenate([np.linalg.norm(a.get_forces(), axis=1) for a in labelled])[keep]
    ltau = LTAU(atol=atol, rtol=settings["rtol"], k=settings["k"], index=settings["index"])
    ltau.fit(embeddings[keep], errors.forces[keep], **fit_kwargs)
    return FittedLTAU(ltau, bool(settings["per_element"]), np.asarray(ids), groups[keep])


def ltau_context(store_url: str, model_id: int, candidates: list[int], params: dict[str, Any]) -> dict[str, Any]:
    """What the ``ltau`` selector reads: ``atom_p`` of every candidate atom, ``groups`` (each atom's
    position in ``candidates``) and ``train_scores`` (the training structures' own ``p_i`` reduced
    as the selector reduces)."""
    from alforge.selectors.ltau import reduce_per_structure

    store = open_store(store_url)
    ensure_ltau_inputs(store_url, model_id)
    ensure_features(store_url, model_id, candidates)
    fitted = fitted_ltau(store, model_id, params)
    features = store.get_features(model_id, INVARIANT, candidates)
    numbers = np.concatenate([a.numbers for a in store.get_atoms(candidates)])
    groups = np.repeat(np.arange(len(candidates)), [len(f) for f in features])
    atom_p = fitted.predict(np.concatenate(features), numbers)
    present = np.unique(fitted.train_groups)  # training structures with at least one fitted atom
    remap = np.searchsorted(present, fitted.train_groups)
    train_scores = reduce_per_structure(fitted.ltau.train_p_, remap, len(present), params.get("reduce", "max"))
    return {"atom_p": atom_p, "groups": groups, "train_scores": train_scores}


def ltau_check(model: Any, fitted: FittedLTAU, ltau_max: float, device: str = "auto") -> Callable[[Atoms], str | None]:
    """An ``extra_check`` for :func:`alforge.exploration.md.run_walker`: stop a walker at the first
    recorded frame whose largest atom LTAU ``p`` exceeds ``ltau_max`` (one model forward per frame
    for the embedding, then a kNN lookup per atom)."""
    from alforge.mlip.features import compute_features

    def check(atoms: Atoms) -> str | None:
        (features,) = compute_features(model, [atoms], device=device)
        p = fitted.predict(features.invariant, atoms.numbers)
        worst = int(np.argmax(p))
        return f"LTAU p = {p[worst]:.3g} > {ltau_max:g} at atom {worst}" if p[worst] > ltau_max else None

    return check


def walker_ltau_check(
    store: Store, campaign_id: int, model_id: int, model_file: Path, ltau_max: float
) -> Callable[[Atoms], str | None]:
    """The walker's LTAU check with the campaign's settings, from the store (the exploration plan
    has made sure the training structures' features are there: :func:`ensure_ltau_inputs`)."""
    from alforge.mlip.mace_model import load_model

    fitted = fitted_ltau(store, model_id, campaign_ltau_settings(store, campaign_id))
    return ltau_check(load_model(model_file), fitted, ltau_max)


def ltau_evaluation(store_url: str, campaign_id: int, model_id: int, settings: dict[str, Any]) -> dict[str, Any]:
    """METHODS §7 on the campaign's labelled test set (atoms with reference forces): the calibration
    curve of confidence ``1 − p`` against the fraction of atoms whose force error is within ``atol``
    (``s`` = 1), its ECE, and Spearman of ``p`` with the per-atom force-error norm."""
    from alforge.mlip.mace_model import load_calculator
    from alforge.uncertainty.calibration import spearman
    from alforge.uncertainty.ltau import calibration_curve

    store = open_store(store_url)
    all_test = store.labelled_ids(campaign_id, role="test")
    test_ids = [i for i, a in zip(all_test, store.get_labelled_atoms(all_test)) if a.calc.results.get("forces") is not None]
    if not test_ids:
        return {"n_atoms": 0, "reason": "no labelled test structure with reference forces"}
    ensure_ltau_inputs(store_url, model_id)
    ensure_features(store_url, model_id, test_ids)
    fitted = fitted_ltau(store, model_id, settings)
    labelled = store.get_labelled_atoms(test_ids)
    p = fitted.predict(np.concatenate(store.get_features(model_id, INVARIANT, test_ids)),
                       np.concatenate([a.numbers for a in labelled]))
    calc = load_calculator(store.model_file(model_id))
    errors = []
    for atoms in labelled:
        work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        work.calc = calc
        errors.append(np.linalg.norm(atoms.get_forces() - work.get_forces(), axis=1))
    error = np.concatenate(errors)
    curve = calibration_curve(p, error, fitted.ltau.atol_)
    return {
        "n_atoms": int(p.size), "atol": fitted.ltau.atol_, "k": fitted.ltau.k, "mean_p": float(p.mean()),
        "ece": curve.ece, "spearman": spearman(error, p) if np.ptp(p) > 0 and np.ptp(error) > 0 else None,
        "curve": {"confidence": _finite(curve.confidence), "observed": _finite(curve.observed),
                  "counts": curve.counts.tolist()},
    }


def _finite(values: np.ndarray) -> list[float | None]:
    """JSON-safe: empty bins (NaN) as None."""
    return [float(v) if np.isfinite(v) else None for v in values]
