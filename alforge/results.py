"""A campaign's results as read from its store, shared by the CLI (``alforge status --json``,
``alforge export``) and the Python API (:class:`alforge.Campaign`), so both say the same thing.

Everything here only reads the store (and, for an export, writes the output files); plain dicts
and lists come back, which the CLI prints as JSON and the API turns into DataFrames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms

from alforge.storage import Store
from alforge.storage import models as orm

ROLES = ("seed", "candidate", "test", "target")


class NoModelError(LookupError):
    """The campaign (or the iteration asked for) has no trained model yet."""


def campaign_status(store: Store, campaign: orm.Campaign) -> dict[str, Any]:
    """One campaign's entry of ``alforge status --json``: status, structure and label counts,
    failures by class, quarantined structures and the learning curve."""
    cid = campaign.id
    return {
        "campaign": campaign.name,
        "status": campaign.status,
        "status_message": campaign.status_message,
        "structures": {r: store.count_structures(cid, role=r) for r in ROLES},
        "labels": store.label_counts(cid),
        "failures": store.failure_counts(cid),
        "quarantined": len(store.quarantined_ids(cid)),
        "learning_curve": store.learning_curve(cid),
    }


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: nested diagnostics as flat table columns."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            out.update(_flatten(item, name + "."))
        else:
            out[name] = item
    return out


def iteration_rows(store: Store, campaign_id: int) -> list[dict[str, Any]]:
    """One row per iteration: labels, the model's train/valid/test energy and force errors (eV/atom,
    eV/Å) and every other stored metric, candidates weighed and selected, the stop reason, the rest
    of the iteration's summary and its diagnostics, flattened to dotted columns (``failures.crash``,
    ``calibration.alpha2``, ``pr_test.q50``)."""
    models = {m.iteration_index: m for m in store.models(campaign_id)}
    rows = []
    for it in store.iterations(campaign_id):
        summary = json.loads(it.summary_json) if it.summary_json else {}
        model = models.get(it.index)
        selection = store.selection_for_iteration(it.id)
        row: dict[str, Any] = {
            "iteration": it.index,
            "model_id": model.id if model else None,
            "n_train": int(len(model.train_ids)) if model else None,
            "labels_done": summary.get("labels_done"),
            "labels_failed": summary.get("labels_failed"),
            "candidates": int(len(selection["candidate_ids"])) if selection else 0,
            "selected": int(len(selection["picked_ids"])) if selection else 0,
            "stop_reason": it.stop_reason,
            "finished": it.finished_at is not None,
        }
        recorded = {k: v for k, v in summary.items() if k != "diagnostics"}  # e.g. failures by class
        for part in (model.metrics if model else {}, _flatten(recorded), _flatten(summary.get("diagnostics") or {})):
            for key, value in part.items():
                row.setdefault(key, value)
        rows.append(row)
    return rows


def selection_rows(store: Store, campaign_id: int) -> list[dict[str, Any]]:
    """One row per iteration that selected: selector, its parameters, how many candidates it
    weighed, the picked structure ids in pick order and each pick's score when picked."""
    rows = []
    for it in store.iterations(campaign_id):
        sel = store.selection_for_iteration(it.id)
        if sel is None:
            continue
        rows.append({
            "iteration": it.index,
            "selector": sel["selector"],
            "params": sel["params"],
            "candidates": int(len(sel["candidate_ids"])),
            "picked_ids": [int(i) for i in sel["picked_ids"]],
            "scores": [float(s) for s in sel["scores"]],
        })
    return rows


def labelled_set(store: Store, campaign_id: int, test: bool = False) -> list[Atoms]:
    """The labelled training set (seeds and selected candidates; the test set too with ``test``)
    with labels as a SinglePointCalculator: what ``alforge export`` writes."""
    roles = ("seed", "candidate", "test") if test else ("seed", "candidate")
    ids = [i for r in roles for i in store.labelled_ids(campaign_id, role=r)]
    atoms = store.get_labelled_atoms(ids)
    for a in atoms:
        a.info.pop("label_calculator", None)
    return atoms


@dataclass(frozen=True)
class Export:
    """What :func:`export` wrote: how many structures, and the iteration of the model (if any)."""

    n_structures: int
    model_iteration: int | None


def export(store: Store, name: str, out: Path, *, model: Path | None = None, test: bool = False) -> Export:
    """Write campaign ``name``'s labelled set to ``out`` (extxyz) and, with ``model``, its latest
    model there in mace's own format. Everything is read and the model's hash checked before the
    first file is written, so a failed export leaves no partial output."""
    import ase.io

    cid = store.campaign_id(name)
    atoms = labelled_set(store, cid, test=test)
    latest, model_path = None, None
    if model is not None:
        models = store.models(cid)
        if not models:
            raise NoModelError(f"campaign {name!r} has no model yet")
        latest = models[-1]
        model_path = store.model_file(latest.id)  # the file the store describes (ModelFileError otherwise)
    ase.io.write(out, atoms, format="extxyz")
    if model is not None and model_path is not None:
        from alforge.mlip.mace_model import export_mace_model

        export_mace_model(model_path, Path(model))
    return Export(len(atoms), latest.iteration_index if latest else None)
