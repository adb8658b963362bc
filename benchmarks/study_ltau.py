"""Issue 11, study 2: is LTAU calibrated, does it rank force errors, and is its lookup cheap?

Question (seed 001): LTAU turns the training-error trajectory of one model into a per-atom
uncertainty (METHODS §7): ``p_i = 1 − mean_t 1[ε_i^t ≤ atol]`` per training atom, and a query
atom's ``p`` is the mean over its ``k`` nearest training atoms in the model's invariant embedding
space. The paper reports calibrated confidence and a lookup costing 0.9–5 % of a forward pass; the
goal here is < 5 % at 1e5 training atoms.

Protocol
--------
* Datasets, read in place from ``shared/data`` beside the checkout:

  - ``ethanol``: rMD17 ethanol (BOTNet split): train on ``train.xyz``, test on ``test_MD.xyz``;
  - ``3bpa``: train on ``train_300K``, test on ``train_mixedT`` (300/600/1200 K: partly shifted).
* One MACE per dataset (``--epochs`` from scratch, the engine's training loop); its per-sample
  training-error log (``TrainResult.errors``) is the LTAU input, both raw and as the store keeps it
  (:func:`~alforge.uncertainty.ltau.summarize_error_log`): the table reports how far ``p`` moves.
* Per-element FAISS indices on the training atoms' invariant embeddings; ``atol`` = the final-epoch
  training MAE of the force-error norms. For ``k`` ∈ {1, 2, 10}: the calibration curve (confidence
  ``1 − p`` in 10 bins against the fraction of test atoms with ``‖ΔF‖ ≤ atol·s``) and its ECE for
  ``s`` ∈ {1, 2}, and Spearman of ``p`` with the true per-atom force-error norm.
* Cost: the LTAU lookup of each test frame (all its atoms) against one forward pass of the model
  on that frame (energy and forces through the ASE calculator, as an MD step pays it), both as the
  median over frames; and the batched lookup of all test atoms against ``evaluate`` on all test
  frames. The lookup is timed again with the training index grown to ``--scale-atoms`` (the
  training embeddings repeated with 1 % jitter), where ``index="auto"`` switches to HNSW.
* Output (``--out``, default ``benchmarks/results/ltau``): ``results.json``, ``summary.md`` (the
  tables and the machine line) and ``ltau_<dataset>.png`` (the calibration curves). Timings on a
  shared machine are indicative only.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_ltau.py           # full (hours on 2 CPU cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_ltau.py --quick   # minutes: a check that it runs
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.io import read  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table  # noqa: E402

from alforge.mlip.features import compute_features  # noqa: E402
from alforge.mlip.mace_model import evaluate, load_calculator, load_model, train_mace  # noqa: E402
from alforge.mlip.params import MACEParams  # noqa: E402
from alforge.uncertainty.ltau import LTAU, calibration_curve, summarize_error_log  # noqa: E402

warnings.filterwarnings("ignore", message="The TorchScript type system")  # mace's, once per model load
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HERE = Path(__file__).resolve().parent
KS = (1, 2, 10)
SCALES = (1.0, 2.0)
FILES = {"ethanol": ("ethanol_rmd17_botnet", "train.xyz", "test_MD.xyz"),
         "3bpa": ("3bpa", "train_300K.xyz", "train_mixedT.xyz")}  # fmt: skip


def _subset(frames: list[Atoms], n: int | None, seed: int) -> list[Atoms]:
    if n is None or n >= len(frames):
        return frames
    keep = np.sort(np.random.default_rng(seed).choice(len(frames), size=n, replace=False))
    return [frames[i] for i in keep]


def load(name: str, n_train: int | None, n_test: int | None) -> tuple[list[Atoms], list[Atoms]]:
    folder, train_file, test_file = FILES[name]
    train = read(SHARED / folder / train_file, ":")
    test = read(SHARED / folder / test_file, ":")
    return _subset(train, n_train, 0), _subset(test, n_test, 1)


def _params(args: argparse.Namespace) -> MACEParams:
    small = dict(num_channels=8, max_L=0, max_ell=2, mlp_irreps="8x0e") if args.quick else {}
    return MACEParams(**small, max_epochs=args.epochs, batch_size=args.batch_size, device=args.device)


def _median_time(fn, items) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _force_errors(model_path: Path, frames: list[Atoms], device: str) -> tuple[list[np.ndarray], float]:
    """Per frame, ``‖F_ref − F̂‖`` per atom, and the median time of one forward (energy + forces)."""
    calc = load_calculator(model_path, device)
    errors, times = [], []
    for atoms in frames:
        work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        work.calc = calc
        start = time.perf_counter()
        forces = work.get_forces()
        times.append(time.perf_counter() - start)
        errors.append(np.linalg.norm(atoms.get_forces() - forces, axis=1))
    return errors, float(np.median(times))


def _scaled_index_cost(atol: float, train_emb: np.ndarray, train_z: np.ndarray, log: np.ndarray,
                       frames_emb: list[np.ndarray], frames_z: list[np.ndarray], n_atoms: int) -> list[dict]:
    """Median per-frame lookup (k = 10) with the training set grown to ``n_atoms`` rows (jittered
    copies), with ``index="auto"`` (per element: flat up to 1e5 atoms) and with HNSW forced."""
    reps = int(np.ceil(n_atoms / len(train_emb)))
    rng = np.random.default_rng(0)
    spread = 0.01 * train_emb.std(axis=0, keepdims=True)
    emb = np.concatenate([train_emb + (rng.normal(size=train_emb.shape) * spread if r else 0) for r in range(reps)])
    out = []
    for index in ("auto", "hnsw"):
        ltau = LTAU(atol=atol, k=10, index=index).fit(
            emb[:n_atoms], np.tile(log, (reps, 1))[:n_atoms], elements=np.tile(train_z, reps)[:n_atoms])
        lookup = _median_time(lambda j: ltau.predict(frames_emb[j], elements=frames_z[j]), range(len(frames_emb)))
        kinds = "/".join(sorted(set(ltau.index_kinds.values())))
        out.append({"n_train_atoms": int(n_atoms), "index": f"{index}: {kinds}", "lookup_s": lookup})
    return out


def run_dataset(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    train, test = load(name, args.n_train, args.n_test)
    model_path = workdir / f"{name}.model"
    started = time.perf_counter()
    result = train_mace(train, _params(args), model_path)
    train_s = time.perf_counter() - started
    fitted = [train[i] for i in result.training["train_indices"]]
    log = result.errors.forces.astype(np.float64)
    summary, form = summarize_error_log(result.errors.forces)
    device = args.device
    model = load_model(model_path, device)
    train_emb = np.concatenate([f.invariant for f in compute_features(model, fitted, device=device)])
    train_z = np.concatenate([a.numbers for a in fitted])
    test_feats = compute_features(model, test, device=device)
    frames_emb = [f.invariant for f in test_feats]
    frames_z = [a.numbers for a in test]
    test_emb, test_z = np.concatenate(frames_emb), np.concatenate(frames_z)
    frame_errors, forward_s = _force_errors(model_path, test, device)
    errors = np.concatenate(frame_errors)
    atol = float(np.mean(log[:, -1]))

    rows, curves = [], {}
    for k in KS:
        ltau = LTAU(atol=atol, k=k).fit(train_emb, log, elements=train_z)
        p = ltau.predict(test_emb, elements=test_z)
        p_stored = LTAU(atol=atol, k=k).fit(train_emb, summary.astype(np.float64), elements=train_z).predict(
            test_emb, elements=test_z)
        row = {"k": k, "spearman": float(spearmanr(p, errors).statistic), "mean_p": float(p.mean()),
               "max_abs_p_stored_minus_raw": float(np.max(np.abs(p_stored - p)))}
        for s in SCALES:
            curve = calibration_curve(p, errors, atol, s=s)
            row[f"ece_s{s:g}"] = curve.ece
            if s == 1.0:
                curves[k] = curve
        rows.append(row)

    ltau = LTAU(atol=atol, k=10).fit(train_emb, log, elements=train_z)
    lookup_s = _median_time(lambda j: ltau.predict(frames_emb[j], elements=frames_z[j]), range(len(test)))
    start = time.perf_counter()
    ltau.predict(test_emb, elements=test_z)
    batched_lookup_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(model_path, test, device=device)
    batched_forward_s = time.perf_counter() - start
    scaled = _scaled_index_cost(atol, train_emb, train_z, log, frames_emb, frames_z, args.scale_atoms)
    cost = {
        "per_frame_forward_s": forward_s, "per_frame_lookup_s": lookup_s,
        "per_frame_fraction": lookup_s / forward_s,
        "batched_forward_s": batched_forward_s, "batched_lookup_s": batched_lookup_s,
        "batched_fraction": batched_lookup_s / batched_forward_s,
        "scaled": [row | {"per_frame_fraction": row["lookup_s"] / forward_s} for row in scaled],
    }
    _plot(name, curves, args.out / f"ltau_{name}.png")
    return {
        "dataset": name, "n_train": len(fitted), "n_train_atoms": len(train_emb), "n_test": len(test),
        "n_test_atoms": len(test_emb), "epochs": args.epochs, "train_s": train_s, "atol": atol,
        "stored_form": form, "test_force_mae_norm": float(errors.mean()), "rows": rows, "cost": cost,
        "curves": {str(k): {"confidence": c.confidence.tolist(), "observed": c.observed.tolist(),
                            "counts": c.counts.tolist()} for k, c in curves.items()},
    }


def _plot(name: str, curves: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    for k, curve in curves.items():
        ok = curve.counts > 0
        ax.plot(curve.confidence[ok], curve.observed[ok], "o-", label=f"k = {k} (ECE {curve.ece:.3f})")
    ax.set_xlabel("predicted confidence 1 − p")
    ax.set_ylabel("observed fraction with ‖ΔF‖ ≤ atol")
    ax.set_title(f"LTAU calibration, {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: list[dict]) -> str:
    lines = ["# LTAU study (issue 11, study 2)", "", "```", machine_report(), "```", ""]
    for r in results:
        lines += [f"## {r['dataset']}: {r['n_train']} training frames ({r['n_train_atoms']} atoms), "
                  f"{r['n_test']} test frames, {r['epochs']} epochs; atol = {r['atol']:.4g} eV/Å "
                  f"(test mean ‖ΔF‖ {r['test_force_mae_norm']:.4g}); stored log: {r['stored_form']}", "", "```"]
        keys = ["k", "spearman", *[f"ece_s{s:g}" for s in SCALES], "mean_p", "max_abs_p_stored_minus_raw"]
        lines.append(table(keys, [[row[k] for k in keys] for row in r["rows"]]))
        c = r["cost"]
        lines.append(table(
            ["cost", "forward s", "lookup s", "lookup / forward"],
            [["per frame (median)", c["per_frame_forward_s"], c["per_frame_lookup_s"], c["per_frame_fraction"]],
             ["all test frames", c["batched_forward_s"], c["batched_lookup_s"], c["batched_fraction"]],
             *[[f"per frame, {s['n_train_atoms']} training atoms ({s['index']})", c["per_frame_forward_s"],
                s["lookup_s"], s["per_frame_fraction"]] for s in c["scaled"]]],
        ))
        lines += ["```", "", f"![calibration](ltau_{r['dataset']}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=None, help="training frames (default: all)")
    parser.add_argument("--n-test", type=int, default=None, help="test frames (default: all)")
    parser.add_argument("--scale-atoms", type=int, default=100_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a check that it runs")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ltau")
    parser.add_argument("--workdir", type=Path, default=None, help="models (default: <out>/models)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train, args.n_test, args.scale_atoms = 3, 20, 10, 20_000
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or args.out / "models"
    workdir.mkdir(parents=True, exist_ok=True)
    results = [run_dataset(name, args, workdir) for name in args.datasets]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
