"""What an iteration publishes to Prefect: a metrics table, a markdown summary and the figures.

Keys are the campaign's :func:`~alforge.monitoring.slug` plus a suffix, so each campaign has one
history per artifact in the UI (every iteration adds a version):

* ``<slug>-metrics``: a table, one row per finished iteration (labels, train/valid/test errors,
  selection size and score range, failures by class);
* ``<slug>-summary``: markdown, the latest iteration in words;
* ``<slug>-learning-curve``: markdown embedding three PNGs as ``data:image/png;base64`` URIs — the
  learning curve, the force parity plot on the test set and the calibration plot σ vs |error|.
  Prefect's UI renders markdown images from data URIs (checked on Prefect 3.8.8's UI in headless
  chromium: the artifact page shows the PNG); an image artifact would need a URL the browser can
  reach, and a worker's files are not one. The PNGs are also written to
  ``<workdir>/reports/``.

Everything comes from the store (model metrics, selections, the iteration summaries with their
calibration points); only the parity plot runs the model, on at most :data:`PARITY_MAX_STRUCTURES`
test structures. Publishing is advisory: :func:`publish_iteration` turns any failure into a logged
warning, so a campaign never fails for its report.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from alforge.monitoring import slug
from alforge.monitoring import plots
from alforge.storage import Store

logger = logging.getLogger(__name__)

#: test structures the parity plot predicts (the test set may be large; a plot needs a few hundred forces)
PARITY_MAX_STRUCTURES = 64


def _mev(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(1000 * float(x), 2)


def metrics_rows(store: Store, campaign_id: int) -> list[dict[str, Any]]:
    """One row per finished iteration: what the ``<slug>-metrics`` table shows (errors in meV)."""
    models = {m.iteration_index: m for m in store.models(campaign_id)}
    rows = []
    for it in store.iterations(campaign_id):
        if it.finished_at is None or it.index not in models:
            continue
        summary = json.loads(it.summary_json or "{}")
        mt = models[it.index].metrics
        sel = store.selection_for_iteration(it.id)
        scores = [float(s) for s in sel["scores"]] if sel else []
        failures = summary.get("failures") or {}
        rows.append({
            "iteration": it.index,
            "labels done": summary.get("labels_done"),
            "labels failed": summary.get("labels_failed"),
            "training structures": len(models[it.index].train_ids),
            **{
                f"{split} {what}": _mev(mt.get(f"{split}_{key}"))
                for split in ("train", "valid", "test")
                for what, key in (("E RMSE (meV/atom)", "energy_rmse_per_atom"), ("F RMSE (meV/Å)", "forces_rmse"))
            },
            "selected": len(sel["picked_ids"]) if sel else 0,
            "score min": min(scores) if scores else None,
            "score max": max(scores) if scores else None,
            "failures by class": ", ".join(f"{k} {n}" for k, n in sorted(failures.items())) or "none",
            "stop reason": it.stop_reason or "",
        })
    return rows


def summary_markdown(name: str, row: dict[str, Any], diagnostics: dict[str, Any]) -> str:
    """The latest iteration of campaign ``name`` in a few lines of markdown."""
    cal = diagnostics.get("calibration") or {}
    hessian = diagnostics.get("hessian") or {}
    lines = [
        f"# {name}: iteration {row['iteration']}",
        "",
        f"- **labels**: {row['labels done']} done, {row['labels failed']} failed "
        f"(failures by class: {row['failures by class']})",
        f"- **model**: trained on {row['training structures']} structures; force RMSE train "
        f"{row['train F RMSE (meV/Å)']} / valid {row['valid F RMSE (meV/Å)']} / test "
        f"{row['test F RMSE (meV/Å)']} meV/Å; test energy RMSE {row['test E RMSE (meV/atom)']} meV/atom",
        f"- **selection**: {row['selected']} picked"
        + (f", scores {row['score min']:.4g} … {row['score max']:.4g}" if row["score min"] is not None else ""),
    ]
    if hessian:
        lines.append(
            f"- **uncertainty**: H {hessian.get('form')}, ς = {hessian.get('regularizer')} "
            f"({hessian.get('regularizer_method')})"
        )
    if cal:
        lines.append(
            f"- **calibration** on {cal['n']} test structures{' (in-sample)' if cal.get('in_sample') else ''}: "
            f"α² = {cal['alpha2']:.3g}, Spearman {cal['spearman']:.2f}, ENCE {cal['ence']:.3g}, "
            f"miscalibration area {cal['miscalibration_area']:.3g}"
        )
    lines += _signal_lines(diagnostics)
    if row["stop reason"]:
        lines.append(f"- **stopping**: {row['stop reason']}")
    return "\n".join(lines) + "\n"


def _signal_lines(diagnostics: dict[str, Any]) -> list[str]:
    """PROBE (with its baselines) and LTAU on the test set, when the campaign uses them."""
    lines = []
    probe = diagnostics.get("probe") or {}
    if "probe" in probe:
        def scores(m: dict[str, Any]) -> str:
            return f"accuracy {m['accuracy']:.2f}, MCC {m['mcc']:.2f}, F1 {m['f1']:.2f}"

        p = probe["probe"]
        text = (f"- **PROBE** ({probe['target']}) on {p['n']} test {'atoms' if probe['target'] == 'forces' else 'structures'}: "
                f"{scores(p)}, ROC-AUC {p['roc_auc']:.2f}, ECE {p['ece']:.3g}, Brier {p['brier']:.3g}; "
                f"majority class {probe['majority']['accuracy']:.2f}")
        if "ensemble_std" in probe:
            text += f"; ensemble std {scores(probe['ensemble_std'])}"
        lines.append(text)
    ltau = diagnostics.get("ltau") or {}
    if ltau.get("n_atoms"):
        spearman = "—" if ltau.get("spearman") is None else f"{ltau['spearman']:.2f}"
        lines.append(f"- **LTAU** (k = {ltau['k']}, atol {ltau['atol'] * 1000:.1f} meV/Å) on {ltau['n_atoms']} test "
                     f"atoms: mean p {ltau['mean_p']:.2f}, ECE {ltau['ece']:.3g}, Spearman with |ΔF| {spearman}")
    return lines


def parity_forces(store: Store, campaign_id: int, model_id: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference and model force components of up to :data:`PARITY_MAX_STRUCTURES` test structures
    with reference forces (empty arrays when there are none)."""
    from alforge.mlip.mace_model import load_calculator

    atoms_list = [
        a for a in store.get_labelled_atoms(sorted(set(store.labelled_ids(campaign_id, role="test"))))
        if a.calc is not None and a.calc.results.get("forces") is not None
    ][:PARITY_MAX_STRUCTURES]
    if not atoms_list:
        return np.empty(0), np.empty(0)
    calc = load_calculator(store.model_file(model_id), device=device)
    ref, pred = [], []
    for atoms in atoms_list:
        ref.append(np.asarray(atoms.calc.results["forces"]).ravel())
        atoms = atoms.copy()
        atoms.calc = calc
        pred.append(np.asarray(atoms.get_forces()).ravel())
    return np.concatenate(ref), np.concatenate(pred)


def figures(store: Store, campaign_id: int, index: int, device: str) -> dict[str, bytes]:
    """The iteration's PNGs by name: ``learning-curve`` always, ``parity`` with a forces test set,
    ``calibration`` when the diagnostics calibrated σ on the test set."""
    curve = store.learning_curve(campaign_id)
    out = {
        "learning-curve": plots.learning_curve_png(
            [r["n_labels"] for r in curve], [r["test_forces_rmse"] for r in curve],
            [r["test_energy_rmse_per_atom"] for r in curve],
        )
    }
    model = next(m for m in store.models(campaign_id) if m.iteration_index == index)
    ref, pred = parity_forces(store, campaign_id, model.id, device)
    if ref.size:
        out["parity"] = plots.parity_png(ref, pred, title=f"test forces, model {index}")
    (it,) = [i for i in store.iterations(campaign_id) if i.index == index]
    points = json.loads(it.summary_json or "{}").get("diagnostics", {}).get("calibration_points")
    if points:
        out["calibration"] = plots.calibration_png(np.array(points["sigma"]), np.array(points["abs_error"]))
    return out


def figures_markdown(name: str, index: int, pngs: dict[str, bytes]) -> str:
    """Markdown with each PNG inline as a data URI (the Prefect UI shows them in the artifact)."""
    parts = [f"# {name}: figures after iteration {index}", ""]
    for title, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        parts += [f"## {title}", "", f"![{title}](data:image/png;base64,{data})", ""]
    return "\n".join(parts)


def write_reports(workdir: str | Path, index: int, pngs: dict[str, bytes]) -> list[Path]:
    """``<workdir>/reports/iteration-<kkk>-<figure>.png``, one file per figure (rewritten on resume)."""
    folder = Path(workdir) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for title, png in pngs.items():
        path = folder / f"iteration-{index:03d}-{title}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


def _publish(store: Store, campaign_id: int, name: str, index: int, workdir: str, device: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = slug(name)
    rows = metrics_rows(store, campaign_id)
    (row,) = [r for r in rows if r["iteration"] == index]
    (it,) = [i for i in store.iterations(campaign_id) if i.index == index]
    diagnostics = json.loads(it.summary_json or "{}").get("diagnostics") or {}
    create_table_artifact(rows, key=f"{key}-metrics", description=f"{name}: metrics per iteration")
    create_markdown_artifact(
        summary_markdown(name, row, diagnostics), key=f"{key}-summary", description=f"{name}: iteration {index}"
    )
    pngs = figures(store, campaign_id, index, device)
    write_reports(workdir, index, pngs)
    create_markdown_artifact(
        figures_markdown(name, index, pngs), key=f"{key}-learning-curve",
        description=f"{name}: learning curve, force parity and calibration after iteration {index}",
    )


def publish_iteration(
    store: Store, campaign_id: int, name: str, index: int, workdir: str, device: str = "auto"
) -> bool:
    """Publish iteration ``index``'s artifacts and write its figures; False (and a warning in the
    run log) if anything failed, which never fails the campaign."""
    try:
        _publish(store, campaign_id, name, index, workdir, device)
        return True
    except Exception as exc:  # noqa: BLE001 - a report must not fail the campaign it reports on
        warn = logger
        try:
            from prefect import get_run_logger

            warn = get_run_logger()
        except Exception:  # noqa: BLE001 - outside a run: the module logger
            pass
        warn.warning("campaign %s: iteration %d: could not publish its artifacts: %s: %s",
                     name, index, type(exc).__name__, exc)
        return False
