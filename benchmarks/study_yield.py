"""Issue 7: how many DFT labels does each selector save? Pool learning curves on real data.

Question: starting from a few labelled structures and a fixed pool of labelled-on-demand ones,
does a selector reach random picking's final test force error with fewer labels, after a full
MACE retrain every round?

Protocol
--------
* Datasets, read in place from ``shared/data`` beside the checkout (labels are looked up in the
  files, like the campaign's ``lookup`` labeller):

  - ``ethanol``: rMD17 ethanol (PBE), pool = ``train.xyz``, test = ``test_MD.xyz``;
  - ``3bpa``: 3BPA (ωB97X), pool = ``train_300K.xyz``, test = ``train_mixedT.xyz`` (300–1200 K frames);
  - ``si``: Si (Zuo 2020, VASP PBE), pool = the bulk groups of ``Si_train`` (AIMD-NVT, Elastic,
    Vacancy), test = the 14 surface slabs of ``Si_train`` + ``Si_test``.

  For ethanol and 3BPA the pool is a fixed random subset of ``--pool`` frames; the test set is
  ``--n-test`` frames of the test file and the target set (what ``mmig``/``qopt``/``pr_augment``
  aim at, geometry only) is another ``--n-targets`` disjoint frames of the same file. For Si the
  surfaces are both the test and the target set, as the issue asks. A fixed validation set of
  ``--n-valid`` pool frames (removed from the pool) is MACE's early-stopping set and the held-out
  data that chooses ς for every Hessian (``loss_hessian(..., regularizer=None)``).
* Per seed: ``--n-initial`` random pool structures are labelled; one MACE is trained on them from
  scratch and shared by every arm of that seed. Each round an arm picks ``--batch`` structures
  with the current model, they join the training set, and the model is fine-tuned from the
  previous round's model (``train_mace(init_model=...)``, ``finetune_epochs``), then evaluated
  on the test set. ``--rounds`` rounds.
* Arms: ``random`` (a fresh seed per round), ``fps`` (on mean last-layer features), ``committee``
  (3 models, max force deviation, picks in deviation order), ``dopt`` (per-element MaxVol grade),
  ``mig`` (energy row per label), ``mig_label`` (energy + force rows per label), and the
  target-aware ``mmig``, ``qopt``, ``pr_augment`` toward the target set — each information arm
  under the loss Hessian (``@loss``) and, side by side, the energy-only Hessian (``@energy``).
* Output (``--out``, default ``benchmarks/results/yield``): ``rounds.jsonl`` (one line per
  finished round: resumable — a rerun skips what is there), ``curve_<dataset>.png`` (mean ± std
  over seeds of the test force and energy RMSE against labels), and ``summary.md``: RMSE at fixed
  budgets and, per arm, the labels needed to reach random's final force RMSE.

Findings (``results/yield/summary.md``; 468 rounds, 11.61 h of summed round wall time on 2
shared cores, load 2–7): **no selector is better than random beyond the seed spread.**

* ethanol, all 13 arms with 3 seeds, at 32 labels: random 90.8 ± 0.9 meV/Å; the best arm,
  pr_augment@energy (mean PR of the test-region targets), 84.9 ± 3.6, reaching random's final error
  with 29.0 labels (9 % fewer, not the ½ the issue asks); committee and dopt 88.1 ± 3.8 (30.4, 30.6);
  mig_label@loss 89.5 ± 5.9; mmig@loss 96.4 ± 3.1 and mig@loss 92.3 ± 3.9 never reach it.
  The energy-only H is no worse than the loss H for the target-aware arms (pr_augment 84.9 vs
  90.5, mmig 92.2 vs 96.4, qopt 89.2 vs 89.3).
* ablation, ``results/yield/ablation/channels32`` (32 channels instead of 16; 2 seeds, mig_label 1):
  random 87.1 ± 0.4 at 32 labels, dopt 83.7 ± 1.5 (29.5 labels to random's final), fps 79.8 ± 2.5
  (29.6), mig_label@loss 80.9 (28.5): a bigger model moves every arm down by a few meV/Å and the
  selectors' saving to 8–11 %, still far from ½.
* ablation, ``results/yield/ablation/batch2`` (``--batch 2 --rounds 12``, 3 seeds): at 32 labels
  random 85.7 ± 1.7, mig_label@loss 81.9 ± 5.7 (29.9 labels to random's final, 7 % fewer): smaller
  batches help both arms alike.
* 3bpa (200-frame pool, 5 rounds), 3 seeds of random/fps/committee/dopt/mig@energy/mig@loss/
  mig_label@loss/mmig@loss, at 28 labels: random 199.4 ± 9.7; the best arm, committee, 188.7 ± 3.1
  (26.3 labels to random's final error, 6 % fewer); dopt 194.0 ± 3.5 (26.9), mig_label@loss
  194.3 ± 6.5 (27.0), fps 194.9 ± 1.4, mig@energy 195.9 ± 3.0, mig@loss 197.3 ± 1.1 (the loss H
  again no better); mmig@loss toward the hotter frames 207.1 ± 2.6, worse than random from 12
  labels on. Every arm but committee is worse than random somewhere at 12–16 labels.
* si (100-frame bulk pool, surface test, 4 rounds), 3 seeds of random/fps/mmig@loss, 1 of
  mig_label@loss: at 24 labels random 260.2 ± 11.6, fps 263.0 ± 13.4, mmig@loss 246.8 ± 6.5
  (never worse than random, but within the spread); no arm moves the surface force error off its
  245–265 meV/Å plateau: a bulk pool does not teach a small MACE surfaces in 24 labels.

``--diagnose`` (``results/yield/diagnose.json``) says why: the single-pick scores rank the pool by
the round-0 model's actual force error only weakly (Spearman ρ: mig_label 0.33–0.44, mig 0.04–0.41,
FPS 0.01–0.24), and the top decile of a score holds 1.02–1.44× the pool's mean error — a few per
cent of a batch of 4, below the 4–14 meV/Å retraining noise between seeds.

Run (the full study takes hours on 2 cores; run it in the background, it resumes):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_yield.py            # full
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_yield.py --quick    # minutes, CI-sized
    .venv/bin/python benchmarks/study_yield.py --report-only                # tables and plots
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_yield.py --diagnose  # score vs error ranks

    # what ran for the figures above (each resumable; arms may also be run one process each):
    ... --datasets ethanol                                           # all arms
    ... --datasets 3bpa --arms random,fps,dopt,mig_label@loss,mig@energy,mmig@loss,committee,mig@loss --rounds 5 --pool 200
    ... --datasets si --arms random,fps,mig_label@loss,mmig@loss --rounds 4 --pool 100 --finetune-epochs 15

Model files from before the weights-only format (issue 8) in ``--workdir`` no longer load: delete
that folder and the study retrains them from the picks in ``rounds.jsonl``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import logging
import lzma
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.io import read  # noqa: E402

from alforge.mlip.committee import max_force_deviation  # noqa: E402
from alforge.mlip.features import compute_features  # noqa: E402
from alforge.mlip.mace_model import evaluate, train_mace  # noqa: E402
from alforge.mlip.params import MACEParams  # noqa: E402
from alforge.selectors import make_selector  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
log = logging.getLogger("study_yield")

# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """A pool (selectable, labels looked up on demand), initial candidates, test, targets, valid."""

    name: str
    pool: list[Atoms]
    test: list[Atoms]
    targets: list[Atoms]
    valid: list[Atoms]
    params: MACEParams


def _with_labels(atoms: Atoms, forces_key: str = "forces") -> Atoms:
    """Labels in ``atoms.calc.results`` (what ``train_mace``/``evaluate`` read)."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get(forces_key))
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, energy=float(energy), forces=np.asarray(forces, dtype=float))
    return out


def _subsets(n: int, sizes: list[int], seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for size in sizes:
        out.append(np.sort(order[start : start + size]))
        start += size
    return out


def _molecule_params(args: argparse.Namespace) -> MACEParams:
    return MACEParams(
        r_max=4.5, num_channels=args.channels, max_L=1, num_interactions=2, mlp_irreps=f"{args.channels}x0e",
        energy_weight=10.0, forces_weight=100.0, stress_weight=0.0, batch_size=4, lr=0.01,
        max_epochs=args.epochs, finetune_epochs=args.finetune_epochs, valid_fraction=0.0, seed=0, device="cpu",
    )


def load_molecules(name: str, pool_file: str, test_file: str, args: argparse.Namespace) -> Dataset:
    pool_all = [_with_labels(a) for a in read(SHARED / pool_file, ":")]
    test_all = [_with_labels(a) for a in read(SHARED / test_file, ":")]
    pool_idx, valid_idx = _subsets(len(pool_all), [args.pool, args.n_valid], seed=1234)
    test_idx, target_idx = _subsets(len(test_all), [args.n_test, args.n_targets], seed=4321)
    return Dataset(
        name,
        [pool_all[i] for i in pool_idx],
        [test_all[i] for i in test_idx],
        [test_all[i] for i in target_idx],
        [pool_all[i] for i in valid_idx],
        _molecule_params(args),
    )


def _si_frames(xyz: str, meta: str) -> tuple[list[Atoms], list[str]]:
    frames = read(SHARED / "si_mlearn_zuo2020" / xyz, ":")
    with lzma.open(SHARED / "si_mlearn_zuo2020" / meta, "rt") as fh:
        groups = [entry["group"] for entry in json.load(fh)]
    return [_with_labels(a, forces_key="force") for a in frames], groups


def load_si(args: argparse.Namespace) -> Dataset:
    train, train_groups = _si_frames("Si_train.xyz", "training.json.xz")
    test, test_groups = _si_frames("Si_test.xyz", "test.json.xz")
    bulk = [a for a, g in zip(train, train_groups) if g != "Surface"]
    surfaces = [a for a, g in zip(train + test, train_groups + test_groups) if g == "Surface"]
    valid = [a for a, g in zip(test, test_groups) if g != "Surface"][: args.n_valid]
    if args.pool < len(bulk):
        bulk = [bulk[i] for i in _subsets(len(bulk), [args.pool], seed=1234)[0]]
    params = _molecule_params(args).model_copy(update={"r_max": 5.0, "energy_weight": 100.0, "forces_weight": 10.0})
    return Dataset("si", bulk, surfaces, surfaces, valid, params)


LOADERS: dict[str, Callable[[argparse.Namespace], Dataset]] = {
    "ethanol": lambda a: load_molecules("ethanol", "ethanol_rmd17_botnet/train.xyz", "ethanol_rmd17_botnet/test_MD.xyz", a),
    "3bpa": lambda a: load_molecules("3bpa", "3bpa/train_300K.xyz", "3bpa/train_mixedT.xyz", a),
    "si": load_si,
}

# --------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One selection method: a registered selector, its parameters and the Hessian it reads."""

    name: str
    selector: str
    params: dict = field(default_factory=dict)
    form: str | None = None  # "loss" | "energy" | None (no Hessian)

    @property
    def label(self) -> str:
        return self.name if self.form is None else f"{self.name}@{self.form}"


ARMS = [
    Arm("random", "random"),
    Arm("fps", "fps"),
    Arm("committee", "committee", {"committee_size": 3, "sigma_lo": 0.0, "sigma_hi": 1e9, "order": "deviation"}),
    Arm("dopt", "dopt"),
    Arm("mig", "mig", form="loss"),
    Arm("mig_label", "mig_label", form="loss"),
    Arm("mmig", "mmig", form="loss"),
    Arm("qopt", "qopt", form="loss"),
    Arm("pr_augment", "pr_augment", {"average": "log"}, form="loss"),
    Arm("mig", "mig", form="energy"),
    Arm("mmig", "mmig", form="energy"),
    Arm("qopt", "qopt", form="energy"),
    Arm("pr_augment", "pr_augment", {"average": "log"}, form="energy"),
]
QUICK_ARMS = ["random", "mig_label@loss", "mig@energy"]


@dataclass
class ModelFeatures:
    """What selection needs from one model over some structures."""

    per_atom: list[np.ndarray]  # last-layer rows per structure
    mean_invariant: np.ndarray  # (n, c) FPS rows

    @property
    def per_atom_energy_rows(self) -> np.ndarray:
        """``f_s / n_s``: the per-atom-normalised energy row of each structure (METHODS §2)."""
        return np.stack([f.sum(axis=0) / len(f) for f in self.per_atom])


def features(model: Path, atoms: list[Atoms]) -> ModelFeatures:
    feats = compute_features(model, atoms, device="cpu")
    return ModelFeatures([f.last_layer for f in feats], np.stack([f.invariant.mean(axis=0) for f in feats]))


def select(
    arm: Arm, data: Dataset, model: Path, committee: list[Path], train_idx: list[int], pool_idx: list[int],
    batch: int, seed: int,
) -> np.ndarray:
    """Positions (into ``pool_idx``) of this round's picks."""
    pool = [data.pool[i] for i in pool_idx]
    train = [data.pool[i] for i in train_idx]
    params = dict(arm.params)
    if arm.selector in ("random", "committee"):
        params.setdefault("seed", seed)
    selector = make_selector(arm.selector, **params)
    if arm.selector == "random":
        return selector.select(np.zeros((len(pool), 1)), batch).indices
    if arm.selector == "committee":
        deviation = max_force_deviation([model, *committee], pool, device="cpu")
        return selector.select(np.zeros((len(pool), 1)), batch, force_deviation=deviation).indices
    cand = features(model, pool)
    if arm.selector == "fps":
        return selector.select(cand.mean_invariant, batch, train=features(model, train).mean_invariant).indices
    if arm.selector == "dopt":
        tr = features(model, train)
        groups = np.concatenate([np.full(len(f), k) for k, f in enumerate(cand.per_atom)])
        picks = selector.select(
            np.concatenate(cand.per_atom), batch, train=np.concatenate(tr.per_atom),
            groups=groups, elements=np.concatenate([a.numbers for a in pool]),
            train_elements=np.concatenate([a.numbers for a in train]),
        ).indices
        return np.asarray(picks, dtype=np.int64)
    from alforge.mlip.jacobians import label_rows
    from alforge.uncertainty import loss_hessian

    hessian = loss_hessian(model, train, form=arm.form, validation=data.valid)
    context: dict = {"hessian": hessian}
    weights = hessian.weights
    if arm.form == "loss" and selector.label_rows != "none":
        context["label_rows"] = label_rows(model, pool, weights, device="cpu")
    if selector.needs_targets:
        context["targets"] = features(model, data.targets).per_atom_energy_rows
    rows = cand.per_atom_energy_rows
    if arm.selector == "mig":
        selector = make_selector("mig", weight=weights.energy, **params)
    elif selector.needs_targets:
        selector = make_selector(arm.selector, weight=weights.energy, **params)
    return selector.select(rows, batch, **context).indices


# --------------------------------------------------------------------------- one campaign


def _params(data: Dataset, seed: int) -> MACEParams:
    return data.params.model_copy(update={"seed": seed})


def initial_model(data: Dataset, seed: int, n_initial: int, work: Path) -> tuple[Path, list[int]]:
    """The shared round-0 model of one seed: trained from scratch on ``n_initial`` random picks."""
    initial = sorted(np.random.default_rng(seed).choice(len(data.pool), n_initial, replace=False).tolist())
    path = work / data.name / f"seed{seed}" / "round0.model"
    if not path.is_file():
        train_mace([data.pool[i] for i in initial], _params(data, seed), path, valid=data.valid)
    return path, initial


def committee_models(data: Dataset, seed: int, train_idx: list[int], previous: list[Path], out: list[Path]) -> list[Path]:
    """The committee's other members, each fine-tuned from its own previous model with its own seed."""
    for member, (prev, path) in enumerate(zip(previous, out), start=1):
        if not path.is_file():
            params = _params(data, seed + 1000 * member)
            if prev.is_file():
                train_mace([data.pool[i] for i in train_idx], params, path, init_model=prev, valid=data.valid)
            else:
                train_mace([data.pool[i] for i in train_idx], params.model_copy(update={"max_epochs": params.max_epochs}), path, valid=data.valid)
    return out


def run_arm(data: Dataset, arm: Arm, seed: int, args: argparse.Namespace, done: dict, sink: Callable[[dict], None]) -> None:
    """One pool campaign; rounds already in ``done`` are replayed from their recorded picks."""
    work = Path(args.workdir)
    model, train_idx = initial_model(data, seed, args.n_initial, work)
    base = {"dataset": data.name, "arm": arm.label, "seed": seed}
    if (0,) not in done:
        m = evaluate(model, data.test, device="cpu")
        sink(base | {"round": 0, "n_labels": len(train_idx), "test_forces_rmse": m["forces_rmse"],
                     "test_energy_rmse_per_atom": m["energy_rmse_per_atom"], "picks": []})
    arm_dir = work / data.name / f"seed{seed}" / arm.label.replace("@", "-")
    committee = [work / data.name / f"seed{seed}" / f"round0-member{m}.model" for m in (1, 2)]
    if arm.selector == "committee":
        committee_models(data, seed, train_idx, [Path("/nonexistent")] * 2, committee)
    for r in range(1, args.rounds + 1):
        taken = set(train_idx)
        pool_idx = [i for i in range(len(data.pool)) if i not in taken]
        record = done.get((r,))
        started = time.perf_counter()
        if record is None:
            picks = [pool_idx[int(p)] for p in select(arm, data, model, committee, train_idx, pool_idx, args.batch, seed * 1000 + r)]
        else:
            picks = record["picks"]
        select_s = time.perf_counter() - started
        train_idx = sorted(train_idx + picks)
        next_model = arm_dir / f"round{r}.model"
        if not next_model.is_file():
            train_mace([data.pool[i] for i in train_idx], _params(data, seed), next_model, init_model=model, valid=data.valid)
        if arm.selector == "committee":
            committee = committee_models(
                data, seed, train_idx, committee, [arm_dir / f"round{r}-member{m}.model" for m in (1, 2)]
            )
        model = next_model
        if record is None:
            m = evaluate(model, data.test, device="cpu")
            sink(base | {"round": r, "n_labels": len(train_idx), "test_forces_rmse": m["forces_rmse"],
                         "test_energy_rmse_per_atom": m["energy_rmse_per_atom"], "picks": picks,
                         "select_s": select_s, "wall_s": time.perf_counter() - started})


# --------------------------------------------------------------------------- why (or why not)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def diagnose(data: Dataset, seed: int, args: argparse.Namespace) -> dict:
    """Does each score rank the pool by the round-0 model's actual error on it?

    Per pool structure: its force RMSE and |energy error| per atom under the shared round-0 model,
    against the single-pick scores of the information selectors (``mig`` gain under each Hessian,
    ``mig_label`` gain) and the FPS distance. A selector can only beat random if its score
    correlates with the error a label would remove; the Spearman ρ says whether it does.
    """
    from alforge.mlip.jacobians import label_rows
    from alforge.mlip.mace_model import load_calculator
    from alforge.selectors.fps import nearest_squared_distance
    from alforge.uncertainty import loss_hessian

    model, train_idx = initial_model(data, seed, args.n_initial, Path(args.workdir))
    taken = set(train_idx)
    pool = [data.pool[i] for i in range(len(data.pool)) if i not in taken]
    train = [data.pool[i] for i in train_idx]
    calc = load_calculator(model, device="cpu")
    force_err, energy_err = [], []
    for atoms in pool:
        work = atoms.copy()
        work.calc = calc
        ref = atoms.calc.results
        force_err.append(float(np.sqrt(np.mean((work.get_forces() - ref["forces"]) ** 2))))
        energy_err.append(abs(work.get_potential_energy() - ref["energy"]) / len(atoms))
    force_err, energy_err = np.array(force_err), np.array(energy_err)
    cand, tr = features(model, pool), features(model, train)
    scores: dict[str, np.ndarray] = {}
    for form in ("energy", "loss"):
        hessian = loss_hessian(model, train, form=form, validation=data.valid)
        rows = cand.per_atom_energy_rows
        scores[f"mig@{form}"] = 0.5 * np.log1p(hessian.weights.energy * hessian.variance(rows))
        if form == "loss":
            blocks = [hessian.whiten(b) for b in label_rows(model, pool, hessian.weights, device="cpu")]
            scores["mig_label@loss"] = np.array([0.5 * np.linalg.slogdet(np.eye(len(z)) + z @ z.T)[1] for z in blocks])
            regularizer = hessian.regularizer_method  # the loss form's ς, the one the campaign uses
    scores["fps distance"] = np.sqrt(nearest_squared_distance(cand.mean_invariant, tr.mean_invariant))
    return {
        "dataset": data.name, "seed": seed, "n_pool": len(pool),
        "pool_force_rmse": float(np.sqrt(np.mean(force_err**2))), "regularizer": regularizer,
        "rho_force": {k: _spearman(v, force_err) for k, v in scores.items()},
        "rho_energy": {k: _spearman(v, energy_err) for k, v in scores.items()},
        "top_decile_force_error_ratio": {
            k: float(force_err[np.argsort(-v)[: max(1, len(v) // 10)]].mean() / force_err.mean()) for k, v in scores.items()
        },
    }


# --------------------------------------------------------------------------- report


def load_rounds(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(rows: list[dict], dataset: str, key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per arm: labels, mean and std over the seeds that have every round, and the seed count."""
    out = {}
    arms = sorted({r["arm"] for r in rows if r["dataset"] == dataset})
    for arm in arms:
        by_seed: dict[int, dict[int, dict]] = {}
        for r in rows:
            if r["dataset"] == dataset and r["arm"] == arm:
                by_seed.setdefault(r["seed"], {})[r["round"]] = r
        # the longest curve that at least one seed has finished; seeds still running are left out
        n_rounds = max((max(s) for s in by_seed.values()), default=0)
        complete = [s for s in by_seed.values() if all(k in s for k in range(n_rounds + 1))]
        if not complete:
            continue
        values = np.array([[s[k][key] for k in range(n_rounds + 1)] for s in complete])
        labels = np.array([complete[0][k]["n_labels"] for k in range(n_rounds + 1)])
        out[arm] = (labels, values.mean(axis=0), values.std(axis=0), len(complete))
    return out


def labels_to_reach(labels: np.ndarray, mean: np.ndarray, target: float) -> float | None:
    """First label count (linearly interpolated) where the mean curve is at or below ``target``."""
    for k in range(len(mean)):
        if mean[k] <= target:
            if k == 0:
                return float(labels[0])
            frac = (mean[k - 1] - target) / (mean[k - 1] - mean[k])
            return float(labels[k - 1] + frac * (labels[k] - labels[k - 1]))
    return None


def report(rows: list[dict], out: Path, header: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# Yield study\n\n```\n{header}\n```\n"]
    for dataset in sorted({r["dataset"] for r in rows}):
        force = curves(rows, dataset, "test_forces_rmse")
        energy = curves(rows, dataset, "test_energy_rmse_per_atom")
        if not force:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax in axes:  # up to 13 arms: 20 distinct colours
            ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for arm, (labels, mean, std, n) in sorted(force.items()):
            style = "--" if arm.endswith("@energy") else "-"
            for ax, data in ((axes[0], force), (axes[1], energy)):
                lab, mu, sd, _ = data[arm]
                line = ax.plot(lab, mu * 1000, style, marker="o", ms=3, label=f"{arm} (n={n})")[0]
                ax.fill_between(lab, (mu - sd) * 1000, (mu + sd) * 1000, color=line.get_color(), alpha=0.12)
        axes[0].set_ylabel("test force RMSE (meV/Å)")
        axes[1].set_ylabel("test energy RMSE (meV/atom)")
        for ax in axes:
            ax.set_xlabel("DFT labels")
            ax.set_yscale("log")
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{dataset}: mean ± std over seeds")
        fig.tight_layout()
        fig.savefig(out / f"curve_{dataset}.png", dpi=110)
        plt.close(fig)

        lines.append(f"## {dataset}\n")
        budgets = sorted({int(b) for labels, *_ in force.values() for b in labels})
        random_curve = force.get("random")
        random_final = random_curve[1][-1] if random_curve is not None else None
        random_at = {int(b): m for b, m in zip(random_curve[0], random_curve[1])} if random_curve else {}

        def cells(curve: tuple, scale: float, digits: int) -> list[str]:
            at = {int(b): (m, s) for b, m, s in zip(curve[0], curve[1], curve[2])}
            return [f"{at[b][0] * scale:.{digits}f}±{at[b][1] * scale:.{digits}f}" if b in at else "—" for b in budgets]

        table_rows = []
        for arm, curve in sorted(force.items()):
            labels, mean, _, n = curve
            reach = labels_to_reach(labels, mean, random_final) if random_final is not None else None
            worse = [int(b) for b, m in zip(labels[1:], mean[1:]) if int(b) in random_at and m > random_at[int(b)]]
            table_rows.append(
                [arm, n] + cells(curve, 1000, 1)
                + ["—" if reach is None else f"{reach:.1f}", ",".join(map(str, worse)) or "none"]
            )
        headers = ["arm", "seeds"] + [f"F@{b}" for b in budgets] + ["labels to random's final F", "worse than random at"]
        lines.append("Test force RMSE (meV/Å), mean ± std over seeds, by number of labels:\n")
        lines.append("```\n" + table(headers, table_rows) + "\n```\n")
        e_rows = [[arm, curve[3]] + cells(curve, 1000, 2) for arm, curve in sorted(energy.items())]
        lines.append("Test energy RMSE (meV/atom):\n")
        lines.append("```\n" + table(["arm", "seeds"] + [f"E@{b}" for b in budgets], e_rows) + "\n```\n")
    walls = [r.get("wall_s", 0.0) for r in rows]
    lines.append(f"Rounds recorded: {len(rows)}; summed round wall time {sum(walls) / 3600:.2f} h.\n")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="ethanol,3bpa,si")
    parser.add_argument("--arms", default=None, help="comma-separated arm labels (e.g. random,mig_label@loss)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-initial", type=int, default=8)
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-targets", type=int, default=50)
    parser.add_argument("--n-valid", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="ethanol, 3 arms, 1 seed, 2 rounds, tiny model")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "yield"))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alforge_yield"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--diagnose", action="store_true", help="score-vs-error ranks of the round-0 models")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.seeds, args.rounds, args.batch = "ethanol", 1, 2, 4
        args.pool, args.n_test, args.n_targets, args.n_valid = 60, 40, 10, 4
        args.channels, args.epochs, args.finetune_epochs = 8, 15, 5
        args.arms = args.arms or ",".join(QUICK_ARMS)
        args.workdir = str(Path(args.workdir) / "quick")
        if args.out == parser.get_default("out"):
            args.out = str(Path(args.workdir) / "results")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "rounds.jsonl"
    # the report records the settings, not where this machine keeps its files
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "report_only", "diagnose")}
    header = machine_report() + (
        "\nreport of every round in rounds.jsonl (each run's settings: the study's docstring)"
        if args.report_only
        else f"\nsettings: {settings}"
    )
    print(header, flush=True)
    if args.diagnose:
        found = [diagnose(LOADERS[name](args), seed, args) for name in args.datasets.split(",") for seed in range(args.seeds)]
        (out / "diagnose.json").write_text(json.dumps(found, indent=1))
        for row in found:
            print(json.dumps(row))
        return
    if not args.report_only:
        wanted = set(args.arms.split(",")) if args.arms else None
        arms = [a for a in ARMS if wanted is None or a.label in wanted or a.name in wanted]
        rows = load_rounds(jsonl)
        started = time.perf_counter()

        def sink(row: dict) -> None:
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['dataset']:8s} {row['arm']:20s} seed {row['seed']} round {row['round']}: "
                  f"{row['n_labels']} labels, F {row['test_forces_rmse'] * 1000:.1f} meV/Å, "
                  f"E {row['test_energy_rmse_per_atom'] * 1000:.2f} meV/atom "
                  f"(elapsed {time.perf_counter() - started:.0f} s)", flush=True)

        for name in args.datasets.split(","):
            data = LOADERS[name](args)
            for seed in range(args.seeds):
                for arm in arms:
                    done = {(r["round"],): r for r in rows
                            if r["dataset"] == name and r["arm"] == arm.label and r["seed"] == seed}
                    if len(done) == args.rounds + 1:
                        continue
                    run_arm(data, arm, seed, args, done, sink)
        print(f"study wall time {time.perf_counter() - started:.0f} s", flush=True)
    print(report(load_rounds(jsonl), out, header))


if __name__ == "__main__":
    main()
