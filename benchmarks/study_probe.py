"""Issue 11, study 1: does PROBE beat ensemble disagreement as a binary reliability signal?

Question (seed 004, Tables 1–2): a PROBE head trained post hoc on a frozen MACE's per-atom
invariant embeddings (METHODS §6) against the standard deviation of a committee of MACE models
(std/√n, thresholded at its median) and the majority class, on the same test structures. The
paper reports 71.6 % accuracy and MCC 0.402 for PROBE, ensemble std at or below the majority rate,
and mean errors of the high-confidence subsets that move monotonically with the cutoff; the
public review (seed 003) asked for AUC, calibration, rank correlation and significance tests.

Protocol
--------
* Datasets, read in place from ``shared/data`` beside the checkout:

  - ``solvent``: MACE tutorial EC/EMC clusters (GFN2-xTB labels, ``energy_xtb``/``forces_xtb``):
    train on ``solvent_xtb_train_200`` (the 200 clusters; isolated atoms dropped), test on the
    1000 structures of ``solvent_xtb_test``;
  - ``3bpa``: train on ``train_300K`` (500 frames at 300 K), test on ``train_mixedT`` (500 frames at
    300/600/1200 K: partly out of distribution).
* ``--members`` MACE models (seeds 0…M−1, same data and settings) are trained on the training
  set; member 0 is the backbone PROBE reads (as 004 uses one model of its 4-model ensemble).
* PROBE is trained on the backbone's training structures: labels from the 50th percentile of
  their energy errors, the reference sizes and optimiser of METHODS §6, seeded 90/10 split.
* Test labels use that same class boundary. Reported per dataset: accuracy, MCC, F1, ROC-AUC,
  ECE, Brier, Spearman (of 1 − p, resp. σ, with the error) for PROBE, ensemble std and the
  majority class; the coverage–accuracy table at cutoffs 0.5–0.95 with the mean true error of the
  kept reliable / unreliable subsets and whether those move monotonically; and a paired bootstrap
  (``--bootstrap`` resamples of the test set) of PROBE − ensemble in accuracy, MCC and AUC: 95 %
  interval and the fraction of resamples where PROBE is not better.
* Output (``--out``, default ``benchmarks/results/probe``): ``results.json``, ``summary.md`` (the
  tables, with the machine line) and ``probe_<dataset>.png`` (coverage and accuracy, and the mean
  error of the kept subsets, against the cutoff). Models and probes are cached in ``--workdir``
  (a rerun reuses them).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_probe.py           # full (hours on 2 CPU cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_probe.py --quick   # minutes: a check that it runs
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
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.io import read  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table  # noqa: E402

from alforge.mlip.features import compute_features  # noqa: E402
from alforge.mlip.mace_model import train_mace  # noqa: E402
from alforge.mlip.params import MACEParams  # noqa: E402
from alforge.storage.model_files import file_sha256  # noqa: E402
from alforge.uncertainty import reliability as rel  # noqa: E402
from alforge.uncertainty.probe import load_probe, train_probe  # noqa: E402

warnings.filterwarnings("ignore", message="The TorchScript type system")  # mace's, once per model load
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HERE = Path(__file__).resolve().parent


@dataclass
class Dataset:
    name: str
    train: list[Atoms]
    test: list[Atoms]


def _labelled(atoms: Atoms, energy_key: str | None, forces_key: str | None) -> Atoms:
    """A copy with its labels in ``calc.results`` (what ``train_mace`` reads)."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    energy = atoms.info[energy_key] if energy_key else results["energy"]
    forces = atoms.arrays[forces_key] if forces_key else results["forces"]
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.calc = SinglePointCalculator(out, energy=float(energy), forces=np.asarray(forces, dtype=float))
    return out


def _subset(frames: list[Atoms], n: int | None, seed: int) -> list[Atoms]:
    if n is None or n >= len(frames):
        return frames
    return [frames[i] for i in np.sort(np.random.default_rng(seed).choice(len(frames), n, replace=False))]


def load(name: str, n_train: int | None, n_test: int | None) -> Dataset:
    if name == "solvent":
        def frames(f: str) -> list[Atoms]:
            raw = read(SHARED / "mace_tutorial_solvent_xtb" / f, ":")
            kept = [a for a in raw if a.info.get("config_type") != "IsolatedAtom"]
            return [_labelled(a, "energy_xtb", "forces_xtb") for a in kept]

        train, test = frames("solvent_xtb_train_200.xyz"), frames("solvent_xtb_test.xyz")
    elif name == "3bpa":
        train = [_labelled(a, None, None) for a in read(SHARED / "3bpa" / "train_300K.xyz", ":")]
        test = [_labelled(a, None, None) for a in read(SHARED / "3bpa" / "train_mixedT.xyz", ":")]
    else:
        raise ValueError(f"unknown dataset {name!r}; use solvent or 3bpa")
    return Dataset(name, _subset(train, n_train, 1), _subset(test, n_test, 2))


def _params(args: argparse.Namespace, seed: int) -> MACEParams:
    return MACEParams(
        r_max=5.0, num_channels=args.channels, max_L=1, num_interactions=2, mlp_irreps=f"{args.channels}x0e",
        energy_weight=10.0, forces_weight=100.0, stress_weight=0.0, batch_size=5, lr=0.01,
        max_epochs=args.mace_epochs, valid_fraction=0.1, seed=seed, device=args.device,
    )


def committee(data: Dataset, args: argparse.Namespace, workdir: Path) -> list[Path]:
    """The ``--members`` MACE models of a dataset (trained once, reused from ``workdir``)."""
    paths = []
    for m in range(args.members):
        path = workdir / f"{data.name}-member{m}.model"
        if not path.exists():
            start = time.perf_counter()
            train_mace(data.train, _params(args, seed=m), path)
            print(f"  {data.name}: member {m} trained in {time.perf_counter() - start:.0f} s", flush=True)
        paths.append(path)
    return paths


def _monotonic(values: list[float | None], decreasing: bool) -> bool | None:
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) < 2:
        return None
    d = np.diff(v)
    return bool(np.all(d <= 1e-12) if decreasing else np.all(d >= -1e-12))


def _bootstrap(labels: np.ndarray, p: np.ndarray, sigma: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """Paired bootstrap of PROBE − ensemble (accuracy, MCC, AUC) over test structures."""
    rng = np.random.default_rng(seed)
    ens_pred = (sigma <= np.median(sigma)).astype(np.int64)
    probe_pred = (p >= 0.5).astype(np.int64)
    deltas: dict[str, list[float]] = {"accuracy": [], "mcc": [], "roc_auc": []}
    for _ in range(resamples):
        i = rng.integers(0, len(labels), len(labels))
        a, b = rel.binary_metrics(labels[i], probe_pred[i]), rel.binary_metrics(labels[i], ens_pred[i])
        deltas["accuracy"].append(a["accuracy"] - b["accuracy"])
        deltas["mcc"].append(a["mcc"] - b["mcc"])
        deltas["roc_auc"].append(rel.roc_auc(labels[i], p[i]) - rel.roc_auc(labels[i], -sigma[i]))
    out = {}
    for k, v in deltas.items():
        v = np.array([x for x in v if np.isfinite(x)])
        out[k] = {"ci95": [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))],
                  "p_not_better": float(np.mean(v <= 0))} if v.size else None
    return out


def run_dataset(data: Dataset, args: argparse.Namespace, workdir: Path) -> dict:
    t0 = time.perf_counter()
    paths = committee(data, args, workdir)
    t_train = time.perf_counter() - t0
    backbone = paths[0]
    feats_train = compute_features(backbone, data.train, device=args.device)
    feats_test = compute_features(backbone, data.test, device=args.device)
    e_train = np.array([f.energy for f in feats_train])
    e_test = np.array([f.energy for f in feats_test])
    ref_train = np.array([a.get_potential_energy() for a in data.train])
    ref_test = np.array([a.get_potential_energy() for a in data.test])
    probe_path = workdir / f"{data.name}-probe{'-per-atom' if args.per_atom else ''}.pt"
    t1 = time.perf_counter()
    if probe_path.exists():
        probe = load_probe(probe_path, backbone_sha256=file_sha256(backbone))
    else:
        probe = train_probe(
            [f.invariant for f in feats_train], e_train, ref_train, per_atom=args.per_atom,
            max_epochs=args.probe_epochs, seed=0, device=args.device, backbone_sha256=file_sha256(backbone),
        )
        probe.save(probe_path)
    t_probe = time.perf_counter() - t1
    out = probe.predict([f.invariant for f in feats_test], e_test, device=args.device)
    sizes = np.array([len(a) for a in data.test])
    errors = np.abs(e_test - ref_test) / (sizes if args.per_atom else 1)
    labels = (errors <= probe.threshold).astype(np.int64)
    member_energies = [e_test] + [
        np.array([f.energy for f in compute_features(p, data.test, device=args.device)]) for p in paths[1:]
    ]
    report = rel.reliability_report(labels, out.p_reliable, errors)
    rows = report["coverage_accuracy"]
    sigma = np.stack(member_energies).std(axis=0, ddof=1) / np.sqrt(sizes) if len(paths) > 1 else None
    result = {
        "dataset": data.name, "n_train": len(data.train), "n_test": len(data.test),
        "threshold_eV": probe.threshold, "per_atom": args.per_atom, "probe_training": probe.info,
        "probe": report,
        "majority": rel.majority_baseline(labels),
        "monotonic": {
            "reliable_error_decreases": _monotonic([r["mean_error_reliable"] for r in rows], decreasing=True),
            "unreliable_error_increases": _monotonic([r["mean_error_unreliable"] for r in rows], decreasing=False),
        },
        "seconds": {"mace_committee": t_train, "probe_training": t_probe},
    }
    if sigma is not None:
        result["ensemble_std"] = rel.ensemble_std_baseline(labels, np.stack(member_energies), sizes, errors)
        result["bootstrap_probe_minus_ensemble"] = _bootstrap(labels, out.p_reliable, sigma, args.bootstrap)
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["probe"]["coverage_accuracy"]
    c = [r["cutoff"] for r in rows]
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    a.plot(c, [r["coverage"] for r in rows], "o-", label="coverage")
    a.plot(c, [r["accuracy"] for r in rows], "s-", label="accuracy (kept)")
    a.axhline(result["majority"]["accuracy"], ls=":", color="grey", label="majority class")
    if "ensemble_std" in result:
        a.axhline(result["ensemble_std"]["accuracy"], ls="--", color="C3", label="ensemble std")
    a.set_xlabel("probability cutoff")
    a.set_title(f"{result['dataset']}: selective prediction")
    a.legend(fontsize=8)
    unit = "eV/atom" if result["per_atom"] else "eV"
    b.plot(c, [r["mean_error_reliable"] for r in rows], "o-", label="kept reliable (p ≥ c)")
    b.plot(c, [r["mean_error_unreliable"] for r in rows], "s-", label="kept unreliable (p ≤ 1 − c)")
    b.axhline(result["threshold_eV"], ls=":", color="grey", label="class boundary")
    b.set_yscale("log")
    b.set_xlabel("probability cutoff")
    b.set_ylabel(f"mean |energy error| ({unit})")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(results: list[dict], machine: str) -> str:
    lines = ["# PROBE vs ensemble std vs majority class (issue 11, study 1)", "", "```", machine, "```", ""]
    for r in results:
        lines += [f"## {r['dataset']}: {r['n_train']} train, {r['n_test']} test structures, boundary "
                  f"{r['threshold_eV']:.4g} {'eV/atom' if r['per_atom'] else 'eV'}", "", "```"]
        heads = ["signal", "accuracy", "MCC", "F1", "ROC-AUC", "ECE", "Brier", "Spearman"]
        p = r["probe"]
        body = [["PROBE", p["accuracy"], p["mcc"], p["f1"], p["roc_auc"], p["ece"], p["brier"], p["spearman"]]]
        if "ensemble_std" in r:
            e = r["ensemble_std"]
            body.append([f"ensemble std ({e['members']})", e["accuracy"], e["mcc"], e["f1"], e["roc_auc"], "-", "-",
                         e["spearman"]])
        m = r["majority"]
        body.append(["majority class", m["accuracy"], m["mcc"], m["f1"], "-", "-", "-", "-"])
        lines += [table(heads, body), "", table(
            ["cutoff", "coverage", "accuracy", "MCC", "F1", "err reliable", "err unreliable"],
            [[x["cutoff"], x["coverage"], x["accuracy"], x["mcc"], x["f1"],
              x["mean_error_reliable"] if x["mean_error_reliable"] is not None else "-",
              x["mean_error_unreliable"] if x["mean_error_unreliable"] is not None else "-"]
             for x in p["coverage_accuracy"]]), "```", ""]
        lines.append(f"monotonic: {r['monotonic']}")
        if "bootstrap_probe_minus_ensemble" in r:
            lines.append(f"paired bootstrap, PROBE − ensemble: {json.dumps(r['bootstrap_probe_minus_ensemble'])}")
        lines += [f"seconds: {r['seconds']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="solvent,3bpa")
    ap.add_argument("--members", type=int, default=4, help="MACE committee size (member 0 is PROBE's backbone)")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--mace-epochs", type=int, default=60)
    ap.add_argument("--probe-epochs", type=int, default=300)
    ap.add_argument("--per-atom", action="store_true", help="per-atom normalised energy errors for the labels")
    ap.add_argument("--n-train", type=int, default=None, help="subset of the training set (default: all)")
    ap.add_argument("--n-test", type=int, default=None, help="subset of the test set (default: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "probe")
    ap.add_argument("--workdir", type=Path, default=None, help="models and probes (default: <out>/work)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the study runs")
    args = ap.parse_args()
    if args.quick:
        args.members, args.channels, args.mace_epochs, args.probe_epochs = 2, 8, 2, 3
        args.n_train, args.n_test, args.bootstrap = args.n_train or 12, args.n_test or 16, 50
    workdir = args.workdir or args.out / ("work-quick" if args.quick else "work")
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "workdir")}
    machine = f"{machine_report()}\nsettings: {json.dumps(settings)}"
    print(machine, flush=True)
    results = []
    for name in args.datasets.split(","):
        result = run_dataset(load(name, args.n_train, args.n_test), args, workdir)
        results.append(result)
        plot(result, args.out / f"probe_{name}{'_quick' if args.quick else ''}.png")
        print(summary([result], machine), flush=True)
    tag = "_quick" if args.quick else ""
    (args.out / f"results{tag}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    (args.out / f"summary{tag}.md").write_text(summary(results, machine))


if __name__ == "__main__":
    main()
