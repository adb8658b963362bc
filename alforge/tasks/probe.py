"""PROBE in a campaign (METHODS §6): one reliability classifier per model, trained once and stored.

:func:`ensure_probe` returns the model's stored probe, or trains one on the structures the model
was fitted to (its training split, as :func:`alforge.tasks.hessian.training_split` reads it): their
stored per-atom ``invariant`` features and predicted energies against their labels, saves it beside
the model file and stores it as an auxiliary model tied to the model's file hash; reruns reuse it.
The probe's training settings are the ``probe`` selector's parameters when the campaign selects
with it, else the defaults (:func:`campaign_probe_settings`), so the selector, the MD stopping
signal (``exploration.probe_min_reliable``) and the per-iteration evaluation read the same probe.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from alforge.tasks.common import open_store
from alforge.tasks.featurize import INVARIANT, ensure_features, model_energies
from alforge.tasks.hessian import training_split
from alforge.uncertainty.probe import Probe, ProbeOutput, load_probe, train_probe

__all__ = [
    "PROBE_SETTINGS",
    "campaign_probe_settings",
    "chain_checks",
    "ensure_probe",
    "probe_check",
    "probe_context",
    "probe_evaluation",
    "probe_outputs",
    "walker_probe_check",
]

#: training settings a campaign may give (as ``probe`` selector parameters), with their defaults
PROBE_SETTINGS: dict[str, Any] = {
    "target": "energy", "percentile": 50.0, "per_atom": False, "max_epochs": 300, "patience": 25, "train_seed": 0,
}


def _kind(target: str) -> str:
    return "probe" if target == "energy" else f"probe_{target}"


def campaign_probe_settings(store: Any, campaign_id: int) -> dict[str, Any] | None:
    """The probe settings of the campaign's latest config (``store``: an open Store), or ``None``
    when it uses no probe (neither the ``probe`` selector nor ``exploration.probe_min_reliable``)."""
    config = json.loads(store.config_versions(campaign_id)[-1].config_json)
    selector = config.get("selector") or {}
    uses = selector.get("name") == "probe" or (config.get("exploration") or {}).get("probe_min_reliable") is not None
    if not uses:
        return None
    params = selector.get("params", {}) if selector.get("name") == "probe" else {}
    return {k: params.get(k, default) for k, default in PROBE_SETTINGS.items()}


def _force_errors(model_path: Path, labelled: Sequence[Atoms], device: str) -> list[np.ndarray]:
    """Per structure, ``‖F_ref − F̂‖`` per atom under the model (the force variant's labels)."""
    from alforge.mlip.mace_model import load_calculator

    calc = load_calculator(model_path, device)
    out = []
    for atoms in labelled:
        work = atoms.copy()
        work.calc = calc
        out.append(np.linalg.norm(atoms.get_forces() - work.get_forces(), axis=1))
    return out


def ensure_probe(store_url: str, model_id: int, *, device: str = "auto", **settings: Any) -> Probe:
    """The model's probe for ``settings`` (:data:`PROBE_SETTINGS`; ``target`` picks the kind):
    loaded from the store (hash-checked, tied to this model's file), else trained, saved, stored.

    A probe already stored for (model, kind) is reused whatever ``settings`` say now: it is trained
    once per model, and its own settings are in the store (``aux_model(...)["params"]``).
    """
    unknown = set(settings) - set(PROBE_SETTINGS)
    if unknown:
        raise ValueError(f"unknown probe settings {sorted(unknown)}; expected some of {sorted(PROBE_SETTINGS)}")
    settings = {**PROBE_SETTINGS, **settings}
    kind = _kind(settings["target"])
    store = open_store(store_url)
    info = store.model(model_id)
    stored = store.aux_model_file(model_id, kind)
    if stored is not None:
        return load_probe(stored, backbone_sha256=info.sha256)

    from alforge.mlip.mace_model import read_training_settings

    model_path = store.model_file(model_id)  # hash-checked before anything is computed from it
    fitted, _ = training_split(info.train_ids, read_training_settings(Path(info.path)), info.path)
    ensure_features(store_url, model_id, fitted)
    features = store.get_features(model_id, INVARIANT, fitted)
    energies = model_energies(store_url, model_id, fitted)
    labelled = store.get_labelled_atoms(fitted)
    target, seed = settings.pop("target"), settings.pop("train_seed")
    if target == "forces":
        errors = {"force_errors": _force_errors(model_path, labelled, device)}
    else:
        errors = {"reference_energies": [a.get_potential_energy() for a in labelled]}
    probe = train_probe(
        features, energies, **errors, target=target, seed=seed, device=device, backbone_sha256=info.sha256,
        **settings,
    )
    path = Path(info.path).with_name(f"{Path(info.path).stem}.{kind}-{uuid.uuid4().hex[:8]}.pt")
    probe.save(path)
    from alforge.storage.model_files import file_sha256

    params = {"target": target, "train_seed": seed, **settings, "threshold": probe.threshold}
    params["n_structures"] = len(fitted)
    holder = store.add_aux_model(model_id, kind, str(path), file_sha256(path), info.sha256, params, probe.info)
    if holder != str(path):  # another run stored its probe first: use that one
        path.unlink(missing_ok=True)
        return load_probe(store.aux_model_file(model_id, kind), backbone_sha256=info.sha256)
    return probe


def probe_outputs(store_url: str, model_id: int, structure_ids: list[int], probe: Probe) -> ProbeOutput:
    """The probe on structures featurized under the model (stored invariant features and energies)."""
    ensure_features(store_url, model_id, structure_ids)
    features = open_store(store_url).get_features(model_id, INVARIANT, structure_ids)
    return probe.predict(features, model_energies(store_url, model_id, structure_ids))


def probe_context(store_url: str, model_id: int, candidate_ids: list[int], params: dict[str, Any]) -> dict:
    """The ``probe`` selector's context: ``p_reliable`` and per-atom ``importance`` per candidate,
    from the model's probe trained with the selector's ``params`` (its training settings)."""
    probe = ensure_probe(store_url, model_id, **{k: v for k, v in params.items() if k in PROBE_SETTINGS})
    out = probe_outputs(store_url, model_id, candidate_ids, probe)
    return {"p_reliable": out.p_reliable, "importance": out.importance}


def probe_check(model: Any, probe: Probe, min_reliable: float, device: str = "auto") -> Callable[[Atoms], str | None]:
    """An ``extra_check`` for :func:`alforge.exploration.md.run_walker`: stop a walker at the first
    recorded frame whose ``p_reliable`` is below ``min_reliable`` (one model forward per frame)."""
    from alforge.mlip.features import compute_features

    def check(atoms: Atoms) -> str | None:
        (features,) = compute_features(model, [atoms], device=device)
        p = float(probe.predict([features.invariant], [features.energy], device=device).p_reliable[0])
        return f"PROBE p_reliable = {p:.3g} < {min_reliable:g}" if p < min_reliable else None

    return check


def chain_checks(*checks: Callable[[Atoms], str | None] | None) -> Callable[[Atoms], str | None] | None:
    """One ``extra_check`` from several (``None`` ones skipped): the first reason to stop, in order."""
    active = [c for c in checks if c is not None]
    if len(active) <= 1:
        return active[0] if active else None

    def check(atoms: Atoms) -> str | None:
        return next((r for r in (c(atoms) for c in active) if r), None)

    return check


def walker_probe_check(
    store: Any, campaign_id: int, model_id: int, model_file: Path, min_reliable: float
) -> Callable[[Atoms], str | None]:
    """The walker's PROBE check, with the probe the exploration plan trained (read from ``store``,
    hash-checked and tied to the model's file, so a walker in another process loads the same one)."""
    from alforge.mlip.mace_model import load_model

    settings = campaign_probe_settings(store, campaign_id) or dict(PROBE_SETTINGS)
    kind = _kind(settings["target"])
    path = store.aux_model_file(model_id, kind)
    if path is None:
        raise RuntimeError(f"model {model_id} has no {kind} in the store; the exploration plan trains it first")
    probe = load_probe(path, backbone_sha256=store.model(model_id).sha256)
    return probe_check(load_model(model_file), probe, min_reliable)


def probe_evaluation(store_url: str, campaign_id: int, model_id: int, settings: dict[str, Any]) -> dict:
    """METHODS §6 metrics of the model's probe on the campaign's labelled test set, with the
    majority-class baseline and, when the model has committee members, the ensemble-std one.

    Labels use the probe's own class boundary (the training-error percentile): a test structure is
    reliable if its energy error (per atom if so trained) is at most that boundary. The force variant
    is scored per atom against its force-error boundary, without the ensemble baseline.
    """
    from alforge.uncertainty import reliability as rel

    store = open_store(store_url)
    test_ids = store.labelled_ids(campaign_id, role="test")
    if len(test_ids) < 2:
        return {"n": len(test_ids), "reason": "fewer than 2 labelled test structures"}
    probe = ensure_probe(store_url, model_id, **settings)
    out = probe_outputs(store_url, model_id, test_ids, probe)
    labelled = store.get_labelled_atoms(test_ids)
    sizes = np.array([len(a) for a in labelled])
    record: dict[str, Any] = {"target": probe.config.target, "threshold": probe.threshold, "per_atom": probe.per_atom}
    if probe.config.target == "forces":
        errors = np.concatenate(_force_errors(store.model_file(model_id), labelled, "auto"))
        labels = (errors <= probe.threshold).astype(np.int64)
        record["probe"] = rel.reliability_report(labels, np.concatenate(out.atom_p_reliable), errors)
        record["majority"] = rel.majority_baseline(labels)
        return record
    ref = np.array([a.get_potential_energy() for a in labelled])
    errors = np.abs(model_energies(store_url, model_id, test_ids) - ref)
    errors = errors / sizes if probe.per_atom else errors
    labels = (errors <= probe.threshold).astype(np.int64)
    record["probe"] = rel.reliability_report(labels, out.p_reliable, errors)
    record["majority"] = rel.majority_baseline(labels)
    members = list(store.committee_files(model_id, skip_missing=True).values())
    if members:
        from alforge.mlip.mace_model import load_calculator

        energies = [model_energies(store_url, model_id, test_ids)]
        for path in members:
            calc = load_calculator(path)
            energies.append(np.array([calc.get_potential_energy(a.copy()) for a in labelled]))
        record["ensemble_std"] = rel.ensemble_std_baseline(labels, np.stack(energies), sizes, errors)
    return record
