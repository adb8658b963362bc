"""Issue 3: PR-guided augmentation (``pr_augment``) on real DFT data, Si (Zuo et al. 2020, mlearn).

Question (000 §IV.A, METHODS §4): do a few structures chosen to maximise the targets' mean prediction
rigidity cut the error on those targets, where randomly chosen ones do not?

Protocol
--------
* Data: ``shared/data/si_mlearn_zuo2020`` beside the repository (VASP PBE), read in place. ``Si_train.xyz`` frame i is
  ``training.json.xz`` entry i (``group`` ∈ AIMD-NVT, Vacancy, Elastic, Surface); the same for the
  test files. Energies from ``calc.results['energy']``, forces from the array ``force``.
* Initial training set: 15 Elastic + 15 AIMD-NVT structures of ``Si_train`` (random, seed 0), all 64 atoms.
* Targets T: the 14 Surface slabs (12 of ``Si_train`` + 2 of ``Si_test``, 12–96 atoms). Only their
  geometry (features) is used to select; their DFT energies only to measure the error.
* Candidates C: every other bulk structure of ``Si_train`` (40 Elastic + 75 AIMD-NVT) and all
  57 Vacancy structures: 172.
* Bulk validation / held-out: ``Si_test``'s 23 non-surface structures. 8 of them (3 AIMD-NVT,
  3 Vacancy, 2 Elastic) are the MACE early-stopping validation set (passed as ``valid=`` so no
  picked structure is ever held out by ``train_mace``'s random split); the other 15 are a held-out
  bulk check that augmentation does not hurt the bulk.
* Model: one small ScaleShiftMACE (16 channels, max_L 1, 2 interactions, r_max 5 Å) trained once on
  the initial set with ``train_mace`` (energy/forces weights 100/10: the default 10/100 left the
  energies at ~60 meV/atom after 40 epochs here), cached under ``/tmp``.
* Fast retrains: ridge regression on the frozen last-layer structure features
  ``f_s = Σ_j f_j`` (``compute_features``; d = 32), energies only: ``y_s = E_s − Σ_j e0_j ≈ w·f_s``,
  ``w = H⁻¹ Fᵀy`` with ``H = FᵀF + ς²I`` — the same ``H`` (same ``ς``, λ = 1) that the PR
  (``prediction_rigidity``) and the selectors use. ``ς`` = alforge's default, 1e-3, everywhere.
* Selectors: ``pr_augment`` (``targets=`` the target features), ``mig``, ``fps``, ``random`` (10 seeds),
  and, as the paper's second baseline, random from the chemically sensible subset (Vacancy
  candidates only, 10 seeds). Each greedy selector is run for every k ∈ {1, 2, 4, 8} and checked
  to be nested (the first k picks of the b = 8 run); a random k-subset is the first k of the seed's
  b = 8 draw (a prefix of a uniformly random ordering is a uniformly random k-subset).
* Full retrain: the initial MACE is finetuned (``train_mace(..., init_model=...)``, same epochs and
  seed for every arm) on initial + 8 ``pr_augment`` picks, initial + 8 random picks (seed 0, or
  seeds 0..N-1 with ``--random-finetunes N``), and, as a control for the extra epochs, on the
  initial set alone.

Run (measured on the shared 2-core box, 1 thread: about 11 min the first time, +140 s per extra
random finetune; about 15 s when the models are cached):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_si_pr_augment.py

``--retrain`` forces every MACE to be retrained; ``--no-finetune`` skips the full-retrain part;
``--random-finetunes N`` finetunes on N random seeds' picks (default 1);
``--sigma`` changes ς for the PR, the selectors and the ridge together (a sensitivity check).
"""

from __future__ import annotations

import os

# One thread for torch and BLAS: measured ~6× faster than 2 threads on this shared 2-core box.
# Must be set before numpy/torch are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import hashlib
import json
import logging
import lzma
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from alforge.mlip.features import compute_features, last_layer_weights
from alforge.mlip.mace_model import evaluate, load_model, train_mace
from alforge.mlip.params import MACEParams
from alforge.selectors import make_selector
from alforge.uncertainty.rigidity import (
    DEFAULT_REGULARIZER,
    Hessian,
    prediction_rigidity,
)

# the shared/ folder sits beside the repository checkout
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "si_mlearn_zuo2020"
CACHE = Path("/tmp/alforge_si_pr_augment")
KS = (0, 1, 2, 4, 8)
BUDGET = max(KS)
N_SEEDS = 10
SIGMA = DEFAULT_REGULARIZER  # ς, shared by the PR, the selectors and the ridge
N_INITIAL = {"Elastic": 15, "AIMD-NVT": 15}
VALID_PER_GROUP = {"AIMD-NVT": 3, "Vacancy": 3, "Elastic": 2}
GROUP_LETTER = {"Elastic": "E", "AIMD-NVT": "A", "Vacancy": "V", "Surface": "S"}

PARAMS = MACEParams(
    r_max=5.0,
    num_channels=16,
    max_L=1,
    num_interactions=2,
    energy_weight=100.0,
    forces_weight=10.0,
    stress_weight=0.0,
    max_epochs=40,
    finetune_epochs=20,
    batch_size=5,
    seed=0,
    device="cpu",
)


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    atoms: list[Atoms]
    group: np.ndarray  # (n,) str
    source: np.ndarray  # (n,) "train" | "test"
    description: list[str]


def _load(xyz: str, meta: str, source: str) -> Dataset:
    frames = read(DATA / xyz, ":")
    with lzma.open(DATA / meta, "rt") as fh:
        entries = json.load(fh)
    if len(frames) != len(entries):
        raise RuntimeError(
            f"{xyz}: {len(frames)} frames but {meta} has {len(entries)} entries"
        )
    for atoms, entry in zip(frames, entries, strict=True):
        energy = float(atoms.calc.results["energy"])
        if (
            abs(energy - float(entry["outputs"]["energy"])) > 1e-6
            or len(atoms) != entry["num_atoms"]
        ):
            raise RuntimeError(
                f"{xyz}: frame does not match its JSON entry ({entry['description']})"
            )
        forces = np.array(atoms.arrays["force"], dtype=float)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return Dataset(
        frames,
        np.array([e["group"] for e in entries]),
        np.array([source] * len(frames)),
        [e["description"] for e in entries],
    )


def load_all() -> Dataset:
    a, b = (
        _load("Si_train.xyz", "training.json.xz", "train"),
        _load("Si_test.xyz", "test.json.xz", "test"),
    )
    return Dataset(
        a.atoms + b.atoms,
        np.concatenate([a.group, b.group]),
        np.concatenate([a.source, b.source]),
        a.description + b.description,
    )


@dataclass
class Split:
    initial: np.ndarray
    targets: np.ndarray
    candidates: np.ndarray
    valid: np.ndarray
    held_out: np.ndarray


def make_split(data: Dataset, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    in_train = data.source == "train"
    initial = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(in_train & (data.group == g)))[:n]
                for g, n in N_INITIAL.items()
            ]
        )
    )
    targets = np.flatnonzero(data.group == "Surface")
    candidates = np.setdiff1d(
        np.flatnonzero(in_train & (data.group != "Surface")), initial
    )
    valid = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(~in_train & (data.group == g)))[:n]
                for g, n in VALID_PER_GROUP.items()
            ]
        )
    )
    held_out = np.setdiff1d(
        np.flatnonzero(~in_train & (data.group != "Surface")), valid
    )
    return Split(initial, targets, candidates, valid, held_out)


# --------------------------------------------------------------------------- models (cached)


def _key(*parts: object) -> str:
    return hashlib.sha256(
        json.dumps(parts, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]


def cached_train(
    name: str,
    data: Dataset,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    retrain: bool,
    init_model: Path | None = None,
) -> tuple[Path, float, bool]:
    """Train (or reuse) a model; returns its path, the training wall time and whether it was cached."""
    init_key = init_model.name if init_model is not None else None
    key = _key(
        name,
        PARAMS.model_dump(),
        sorted(map(int, train_idx)),
        sorted(map(int, valid_idx)),
        init_key,
    )
    path = CACHE / f"{name}-{key}.model"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and not retrain:
        return path, float(json.loads(meta.read_text())["wall_time_s"]), True
    CACHE.mkdir(parents=True, exist_ok=True)
    result = train_mace(
        [data.atoms[i] for i in train_idx],
        PARAMS,
        path,
        init_model=init_model,
        valid=[data.atoms[i] for i in valid_idx],
    )
    if init_model is not None and not result.finetuned:
        raise RuntimeError(f"{name}: expected a finetune from {init_model}")
    meta.write_text(json.dumps(result.metrics))
    return path, float(result.metrics["wall_time_s"]), False


# --------------------------------------------------------------------------- ridge + PR


@dataclass
class Features:
    f: np.ndarray  # (n, d) structure features f_s
    y: np.ndarray  # (n,) E − Σ e0 (eV)
    n_atoms: np.ndarray  # (n,)


def structure_features(model: Path, data: Dataset) -> tuple[Features, float]:
    feats = compute_features(model, data.atoms, device="cpu")
    f = np.array([x.last_layer.sum(axis=0) for x in feats])
    e0 = np.array([x.e0.sum() for x in feats])
    energy = np.array([a.calc.results["energy"] for a in data.atoms])
    model_energy = np.array([x.energy for x in feats])
    w0, _ = last_layer_weights(load_model(model, "cpu"))
    # E_model = w0·f_s + Σ e0 exactly (METHODS §1): the decomposition the ridge relies on.
    decomposition_error = float(np.abs(f @ w0 + e0 - model_energy).max())
    return Features(
        f, energy - e0, np.array([len(a) for a in data.atoms])
    ), decomposition_error


def ridge_rmse(feats: Features, train_idx: np.ndarray, eval_idx: np.ndarray) -> float:
    """Per-atom energy RMSE (meV/atom) on ``eval_idx`` of the ridge ``w = H⁻¹Fᵀy`` fitted on ``train_idx``."""
    f = feats.f[train_idx]
    hessian = Hessian.from_features(f, regularizer=SIGMA)
    w = hessian.solve(f.T @ feats.y[train_idx])
    err = (feats.f[eval_idx] @ w - feats.y[eval_idx]) / feats.n_atoms[eval_idx]
    return 1000.0 * float(np.sqrt(np.mean(err**2)))


def mean_target_pr(
    feats: Features, train_idx: np.ndarray, targets: np.ndarray
) -> float:
    hessian = Hessian.from_features(feats.f[train_idx], regularizer=SIGMA)
    return float(prediction_rigidity(hessian, feats.f[targets]).mean())


# --------------------------------------------------------------------------- selection


def greedy_picks(
    name: str, feats: Features, split: Split
) -> tuple[dict[int, np.ndarray], bool, np.ndarray, float]:
    """Picks (candidate positions) of a b=k run for each k, whether they nest, b=8 scores and time."""
    selector = (
        make_selector(name) if name == "fps" else make_selector(name, regularizer=SIGMA)
    )
    context = {"targets": feats.f[split.targets]} if name == "pr_augment" else {}
    cand, train = feats.f[split.candidates], feats.f[split.initial]
    picks: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    full = selector.select(cand, BUDGET, train=train, **context)
    elapsed = time.perf_counter() - start
    nested = True
    for k in KS:
        if k == 0:
            picks[k] = np.empty(0, dtype=np.int64)
            continue
        run = selector.select(cand, k, train=train, **context).indices
        nested &= bool(np.array_equal(run, full.indices[:k]))
        picks[k] = np.asarray(run)
    # pr_augment scores are PR gains; its objective (mean target PR after each pick) is in info.
    scores = full.info["objective"] if name == "pr_augment" else full.scores
    return picks, nested, np.asarray(scores), elapsed


def random_picks(seed: int, pool: np.ndarray) -> dict[int, np.ndarray]:
    """Prefixes of one b=8 random draw from candidate positions ``pool``."""
    draw = (
        make_selector("random", seed=seed)
        .select(np.zeros((len(pool), 1)), BUDGET)
        .indices
    )
    order = pool[draw]
    return {k: order[:k] for k in KS}


def evaluate_picks(
    feats: Features, split: Split, picks: dict[int, np.ndarray]
) -> tuple[dict[int, float], dict[int, float], float]:
    """Mean target PR and target ridge RMSE for every k, and the held-out bulk RMSE at k=8."""
    pr, rmse = {}, {}
    for k in KS:
        train_idx = np.concatenate([split.initial, split.candidates[picks[k]]])
        pr[k] = mean_target_pr(feats, train_idx, split.targets)
        rmse[k] = ridge_rmse(feats, train_idx, split.targets)
    bulk = ridge_rmse(
        feats,
        np.concatenate([split.initial, split.candidates[picks[BUDGET]]]),
        split.held_out,
    )
    return pr, rmse, bulk


def composition(data: Dataset, split: Split, picks: np.ndarray) -> str:
    return "".join(GROUP_LETTER[data.group[split.candidates[p]]] for p in picks)


def _mean_std(values: list[float]) -> str:
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    return f"{mean:.4g} ± {std if std > 1e-9 * abs(mean) else 0:.2g}"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="retrain every MACE instead of using the /tmp cache",
    )
    parser.add_argument(
        "--no-finetune", action="store_true", help="skip the full MACE retrains"
    )
    parser.add_argument(
        "--random-finetunes",
        type=int,
        default=1,
        help="random seeds (0, 1, ...) to finetune MACE on, ~140 s each (default %(default)s)",
    )
    parser.add_argument(
        "--sigma",
        type=float,
        default=DEFAULT_REGULARIZER,
        help="ς for PR, selectors and ridge (default %(default)g)",
    )
    args = parser.parse_args()
    global SIGMA
    SIGMA = args.sigma
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    print(machine_report())
    print(f"cache: {CACHE} (--retrain to ignore)\n")

    t0 = time.perf_counter()
    data = load_all()
    split = make_split(data)
    t_load = time.perf_counter() - t0

    def describe(idx: np.ndarray) -> str:
        groups, counts = np.unique(data.group[idx], return_counts=True)
        atoms = sum(len(data.atoms[i]) for i in idx)
        return (
            ", ".join(f"{g} {c}" for g, c in zip(groups, counts, strict=True))
            + f" ({atoms} atoms)"
        )

    print("split (Si, Zuo et al. 2020; VASP PBE):")
    print(
        f"  initial training  {len(split.initial):3d}: {describe(split.initial)}  [Si_train, seed 0]"
    )
    print(
        f"  targets T         {len(split.targets):3d}: {describe(split.targets)}  [12 Si_train + 2 Si_test]"
    )
    print(
        f"  candidates C      {len(split.candidates):3d}: {describe(split.candidates)}  [rest of Si_train]"
    )
    print(
        f"  MACE validation   {len(split.valid):3d}: {describe(split.valid)}  [Si_test]"
    )
    print(
        f"  held-out bulk     {len(split.held_out):3d}: {describe(split.held_out)}  [rest of Si_test non-surface]"
    )
    print(
        f"  ς = {SIGMA:g} (PR, selectors and ridge), λ = 1; MACE {PARAMS.model_dump()}\n"
    )

    # ---- the initial MACE
    model, t_train, cached = cached_train(
        "initial", data, split.initial, split.valid, args.retrain
    )
    t0 = time.perf_counter()
    feats, decomposition_error = structure_features(model, data)
    t_feat = time.perf_counter() - t0
    mace_t = evaluate(model, [data.atoms[i] for i in split.targets], device="cpu")
    mace_bulk = evaluate(model, [data.atoms[i] for i in split.held_out], device="cpu")
    eig = np.linalg.eigvalsh(feats.f[split.initial].T @ feats.f[split.initial])[::-1]
    print(
        f"initial MACE: {PARAMS.max_epochs} epochs, {t_train:.0f} s{' (cached)' if cached else ''}; "
        f"features of {len(data.atoms)} structures {t_feat:.1f} s (d = {feats.f.shape[1]}); "
        f"max |w0·f_s + Σe0 − E_MACE| = {decomposition_error:.1e} eV"
    )
    print(
        f"  MACE energy RMSE: targets {1000 * mace_t['energy_rmse_per_atom']:.1f} meV/atom, held-out bulk "
        f"{1000 * mace_bulk['energy_rmse_per_atom']:.1f} meV/atom; forces RMSE targets "
        f"{mace_t['forces_rmse']:.3f}, bulk {mace_bulk['forces_rmse']:.3f} eV/Å"
    )
    print(
        f"  eigenvalues of FᵀF (initial): {', '.join(f'{v:.2g}' for v in eig[:8])}, ... "
        f"({int(np.sum(eig > SIGMA**2))} of {len(eig)} above ς² = {SIGMA**2:g})"
    )
    all_pool = np.concatenate([split.initial, split.candidates])
    print(
        f"  reference points (ridge, not selectors): initial + all {len(split.candidates)} candidates → target RMSE "
        f"{ridge_rmse(feats, all_pool, split.targets):.1f} meV/atom, mean target PR "
        f"{mean_target_pr(feats, all_pool, split.targets):.3g}\n"
    )

    # ---- selection
    t_study = time.perf_counter()
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    nesting: dict[str, bool] = {}
    pr_scores = None
    for name in ("pr_augment", "mig", "fps"):
        picks, nested, scores, elapsed = greedy_picks(name, feats, split)
        pr, rmse, bulk = evaluate_picks(feats, split, picks)
        results[name] = {"pr": pr, "rmse": rmse, "bulk": bulk, "picks": picks[BUDGET]}
        timings[name], nesting[name] = elapsed, nested
        if name == "pr_augment":
            pr_scores = scores
    vacancy_pool = np.flatnonzero(data.group[split.candidates] == "Vacancy")
    for label, pool in (
        ("random", np.arange(len(split.candidates))),
        ("random (Vacancy only)", vacancy_pool),
    ):
        runs = []
        t0 = time.perf_counter()
        for seed in range(N_SEEDS):
            picks = random_picks(seed, pool)
            pr, rmse, bulk = evaluate_picks(feats, split, picks)
            runs.append({"pr": pr, "rmse": rmse, "bulk": bulk, "picks": picks[BUDGET]})
        timings[label] = time.perf_counter() - t0
        results[label] = {"runs": runs}

    t_study = time.perf_counter() - t_study
    # pr_augment's own score at step k is the targets' mean PR after its k-th pick.
    score_check = max(
        abs(pr_scores[k - 1] - results["pr_augment"]["pr"][k])
        / results["pr_augment"]["pr"][k]
        for k in KS
        if k
    )
    print(
        "selection (b = 8, every k run separately): nested = "
        + ", ".join(f"{n} {'yes' if v else 'NO'}" for n, v in nesting.items())
        + f"; pr_augment score vs recomputed mean target PR: max rel. diff {score_check:.1e}"
    )
    print(
        "  selector time (b = 8, one run): "
        + ", ".join(
            f"{n} {1000 * timings[n]:.1f} ms" for n in ("pr_augment", "mig", "fps")
        )
    )
    print(
        f"  picks (E Elastic, A AIMD-NVT, V Vacancy; candidates: E {np.sum(data.group[split.candidates] == 'Elastic')}, "
        f"A {np.sum(data.group[split.candidates] == 'AIMD-NVT')}, V {len(vacancy_pool)}):"
    )
    for name in ("pr_augment", "mig", "fps"):
        print(f"    {name:11s} {composition(data, split, results[name]['picks'])}")
    for label in ("random", "random (Vacancy only)"):
        comps = [composition(data, split, r["picks"]) for r in results[label]["runs"]]
        print(f"    {label:11s} " + " ".join(comps))
    print()

    # ---- the table
    def row(label: str, key: str) -> list:
        res = results[label]
        if "runs" in res:
            values = [_mean_std([r[key][k] for r in res["runs"]]) for k in KS]
        else:
            values = [res[key][k] for k in KS]
        return [label, *values]

    labels = ("pr_augment", "mig", "fps", "random", "random (Vacancy only)")
    seeds = f"random: mean ± std over {N_SEEDS} seeds"
    print(
        f"Mean PR of the {len(split.targets)} targets after adding k structures ({seeds}):"
    )
    print(
        table(["selector"] + [f"k={k}" for k in KS], [row(lab, "pr") for lab in labels])
    )
    print(
        f"\nTarget energy RMSE (meV/atom), ridge on frozen MACE features refitted per k ({seeds}):"
    )
    print(
        table(
            ["selector"] + [f"k={k}" for k in KS], [row(lab, "rmse") for lab in labels]
        )
    )
    bulk_rows = []
    for lab in labels:
        res = results[lab]
        value = (
            _mean_std([r["bulk"] for r in res["runs"]])
            if "runs" in res
            else res["bulk"]
        )
        bulk_rows.append([lab, value])
    print(
        f"\nHeld-out bulk energy RMSE (meV/atom, {len(split.held_out)} Si_test structures) of the k=8 ridge "
        f"(k=0: {ridge_rmse(feats, split.initial, split.held_out):.4g}):"
    )
    print(table(["selector", "k=8"], bulk_rows))

    # ---- verdict on the ridge results
    pr_rmse = results["pr_augment"]["rmse"]
    rand = np.array([[r["rmse"][k] for k in KS] for r in results["random"]["runs"]])
    print(
        "\npr_augment vs random (ridge): target RMSE, and how many random seeds do at least as well:"
    )
    for j, k in enumerate(KS):
        if k == 0:
            continue
        beaten = int(np.sum(rand[:, j] <= pr_rmse[k]))
        print(
            f"  k={k}: pr_augment {pr_rmse[k]:.1f} (Δ vs k=0 {pr_rmse[k] - pr_rmse[0]:+.1f}); random "
            f"{rand[:, j].mean():.1f} ± {rand[:, j].std(ddof=1):.1f} (Δ {rand[:, j].mean() - pr_rmse[0]:+.1f}); "
            f"{beaten}/{N_SEEDS} random seeds ≤ pr_augment"
        )

    wins = [
        k
        for j, k in enumerate(KS)
        if k and pr_rmse[k] < rand[:, j].mean() - rand[:, j].std(ddof=1)
    ]
    vac = np.array(
        [[r["rmse"][k] for k in KS] for r in results["random (Vacancy only)"]["runs"]]
    )
    vac_wins = [
        k
        for j, k in enumerate(KS)
        if k and pr_rmse[k] < vac[:, j].mean() - vac[:, j].std(ddof=1)
    ]
    print(
        f"  → ridge: pr_augment is more than one std below random-from-the-pool at k = {wins or 'none'}; "
        f"below random-from-Vacancy by more than one std at k = {vac_wins or 'none'}"
    )

    # ---- full MACE retrains
    if not args.no_finetune:
        print(
            f"\nFull MACE retrain: finetune of the initial MACE, {PARAMS.finetune_epochs} epochs, same seed and "
            f"validation set for every arm (T = targets, bulk = held-out bulk; 'ridge T' = the ridge's "
            f"target RMSE for the same training set, from the tables above):"
        )
        arms = [
            (
                "initial only (control)",
                "ft-control",
                np.empty(0, dtype=np.int64),
                pr_rmse[0],
            ),
            (
                "initial + 8 pr_augment",
                "ft-pr_augment",
                results["pr_augment"]["picks"],
                pr_rmse[BUDGET],
            ),
        ]
        for seed in range(args.random_finetunes):
            run = results["random"]["runs"][seed]
            arms.append(
                (
                    f"initial + 8 random (seed {seed})",
                    f"ft-random{seed}",
                    run["picks"],
                    run["rmse"][BUDGET],
                )
            )
        rows = [
            [
                "initial MACE (no finetune)",
                len(split.initial),
                "",
                1000 * mace_t["energy_rmse_per_atom"],
                mace_t["forces_rmse"],
                1000 * mace_bulk["energy_rmse_per_atom"],
                mace_bulk["forces_rmse"],
                "",
                f"{t_train:.0f}{' (cached)' if cached else ''}",
            ]
        ]
        random_t = []
        for label, name, picks, ridge_t in arms:
            train_idx = np.concatenate([split.initial, split.candidates[picks]])
            path, wall, was_cached = cached_train(
                name, data, train_idx, split.valid, args.retrain, init_model=model
            )
            et = evaluate(path, [data.atoms[i] for i in split.targets], device="cpu")
            eb = evaluate(path, [data.atoms[i] for i in split.held_out], device="cpu")
            if name.startswith("ft-random"):
                random_t.append(1000 * et["energy_rmse_per_atom"])
            rows.append(
                [
                    label,
                    len(train_idx),
                    composition(data, split, picks),
                    1000 * et["energy_rmse_per_atom"],
                    et["forces_rmse"],
                    1000 * eb["energy_rmse_per_atom"],
                    eb["forces_rmse"],
                    ridge_t,
                    f"{wall:.0f}{' (cached)' if was_cached else ''}",
                ]
            )
        headers = [
            "model",
            "n_train",
            "picks",
            "T E meV/at",
            "T F eV/Å",
            "bulk E meV/at",
            "bulk F eV/Å",
        ]
        print(table(headers + ["ridge T meV/at", "train s"], rows))
        if len(random_t) > 1:
            print(
                f"  random finetunes, target E RMSE: {_mean_std(random_t)} meV/atom over {len(random_t)} seeds"
            )

    print(
        f"\ntimings: data {t_load:.1f} s, initial MACE {t_train:.0f} s{' (cached)' if cached else ''}, "
        f"features {t_feat:.1f} s, selection + ridge study (all selectors, seeds and k) "
        f"{t_study:.2f} s; total wall {time.perf_counter() - t_start:.0f} s"
    )


if __name__ == "__main__":
    main()
