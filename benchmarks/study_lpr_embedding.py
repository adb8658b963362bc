"""Issue 10: which small structures raise the rigidity of a large cell's least rigid atoms?

Question (seed 000 §IV.B, METHODS §5): the atoms of a large MD cell with the lowest local
prediction rigidity (LPR, under the model's loss Hessian) are where the model is least constrained.
A DFT code cannot label the cell, so small structures are built around those atoms. How much does
each way of building them raise the target atom's LPR, and does labelling them with a real code
lower the model's force error on those environments more than labelling random small cells?

Protocol
--------
* Model: a ScaleShiftMACE with **one** interaction (r_max 4 Å, 16 channels, max_L 1), so an atom's
  features depend on its neighbours within r_max and nothing further: an environment carved with
  ``cutoff = r_max`` is then exactly the environment the model sees (with two interactions the
  receptive field doubles to 8 Å and every carved cell would hold hundreds of atoms). Trained with
  ``train_mace`` on Si (Zuo et al. 2020, VASP PBE, ``shared/data/si_mlearn_zuo2020``, read in
  place): 30 AIMD-NVT + 15 Elastic + 15 Vacancy structures of ``Si_train``, 8 more held out for
  early stopping and for choosing ς (``loss_hessian(..., regularizer=None, validation=...)``).
* Large cell: diamond Si 5×5×5 (1,000 atoms) heated with the model by Langevin MD (``--md-steps``
  at ``--md-temperature``; 1 fs), which melts it; the final frame is the large cell and earlier
  frames (every 20 steps) are what "the whole structure" adds for m > 1.
* Targets: the ``--targets`` lowest-LPR atoms of the large cell, at most one per environment
  (each at least 2 r_max from the others).
* Ways of adding data, each with m ∈ {1, 2, 5, 10} structures, scored by the LPR enhancement
  ``(R_after − R_before)/R_before`` of the target atom (``lpr_enhancement``) when the structures'
  label rows (energy + force rows under the model's loss weights: what a DFT label adds) join H:
  ``whole`` (m frames of the large cell), ``cluster``, ``periodic`` and ``high_symmetry``
  (``alforge.embedding.embed``, ``copies=m``, ``cutoff = r_max``, ``--buffer`` 1.5 Å — below
  embed's 2.5 Å default so a periodic Si cell stays near 60 atoms for QE; high-symmetry adds its
  pristine host crystal as well, as the paper does), and ``random``:
  periodic embeddings of m randomly chosen atoms of the same cell (an untargeted small cell of the
  same size, so the comparison isolates *where* the cell is carved, not how).
* Labelling with a real code: Quantum ESPRESSO (``pw.x``, PBE, ``Si.pbe-rrkj.UPF``, 20 Ry, Γ only,
  Marzari–Vanderbilt smearing 0.02 Ry since liquid Si is a metal) through alforge's ``espresso``
  labeller. The labels a model is fine-tuned on must come from the code and settings it was
  trained on, so this part has its own base model: trained from scratch (``--qe-base-epochs``) on
  QE labels of 14 cubic 64-atom cells (2×2×2 diamond, strained and rattled, and frames of a
  3,000 K run; 4 more held out), the size of the carved cells so that Γ-only sampling errs alike
  on both, with its own targets (its lowest-LPR atoms of the large
  cell, under its loss H). Per target (``--label-targets``): one periodic embedding
  (``targeted``), one periodic embedding of a random atom of the cell (``random``), and a
  second, differently rattled periodic embedding as the held-out evaluation cell (a target whose
  three cells did not all get a label is left out and named). The QE base is fine-tuned
  (``train_mace(init_model=...)``) on its training cells + targeted and + random,
  ``--finetune-seeds`` seeds each; the figure is the force RMSE on the held-out cells' atoms
  within r_max of the centre (the target environments).
  The carved cells are made with ``--contact`` 2.0 Å (about 0.85 of the Si–Si bond): with
  ``embed``'s default 1.0 Å, atoms sat 1.0 Å apart across the boundary and QE forces reached
  170 eV/Å (RMS 30–46 eV/Å per cell), and fine-tuning on such cells made the held-out error
  worse (QE base 332 → 467 ± 32 targeted, 447 ± 21 random; the first version of this part,
  fine-tuning the VASP-trained model, went 303 → 412 ± 18 and 370 ± 14 for the same reason).
* Output (``--out``, default ``benchmarks/results/lpr_embedding``): ``summary.md`` (tables),
  ``enhancement.png``, ``results.json`` (one entry per part, each with the machine and settings
  of the run that made it; ``--parts`` reruns some and keeps the others). Every stage is cached
  in ``--workdir``: a rerun resumes.

Findings (``results/lpr_embedding/summary.md``; the enhancement part's run took 1,959 s once the
model and MD were cached, labelling included):

* LPR enhancement for one structure, mean over 5 targets: cluster 2.1 % < periodic 7.9 % ≈ random
  periodic cells 9.1 % < whole 1,000-atom frame 14.6 % < high-symmetry 18.4 % (with its pristine
  host); ten periodic copies 44.7 %. The paper's order of cluster < periodic < high-symmetry holds;
  the whole cell ranks higher here (all 3,000 of its force rows join H)
  and every figure is far larger because this H holds only 60 small structures.
* Carving *around the target* buys nothing over carving around random atoms of the same melt: in
  a 1-interaction model's 16–32 last-layer features, any liquid cell's force rows cover the
  target's direction about as well.
* QE labels (``--parts labelling``, 1,127 s with the base cells' labels cached; 3 targets, 3
  fine-tune seeds): the QE-trained base's force RMSE on the held-out target environments is
  351 meV/Å; fine-tuned with the 3 targeted periodic cells 302.8 ± 6.0, with 3 random periodic
  cells of the same melt 330.0 ± 7.8. Targeted cells lower the error about twice as much as
  random ones (−48 against −21 meV/Å), though the LPR enhancement above did not tell them apart.
  Three targets are a small sample: the spread is over fine-tune seeds, not over targets.
* The enhancement part used ``embed``'s default contact (1.0 Å); rerun it with ``--parts
  enhancement`` to carve with ``--contact`` as the labelling part does.

Run (hours on 2 shared cores the first time; QE labels dominate):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_lpr_embedding.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_lpr_embedding.py --parts enhancement   # LPR only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_lpr_embedding.py --parts labelling     # QE part
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
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.io import read, write  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: E402

from alforge.embedding import embed  # noqa: E402
from alforge.labelling.base import LabelFailure  # noqa: E402
from alforge.labelling.registry import make_labeller  # noqa: E402
from alforge.mlip.features import compute_features  # noqa: E402
from alforge.mlip.jacobians import label_rows  # noqa: E402
from alforge.mlip.mace_model import load_calculator, train_mace  # noqa: E402
from alforge.mlip.params import MACEParams  # noqa: E402
from alforge.uncertainty import loss_hessian, lpr_enhancement  # noqa: E402
from alforge.uncertainty.rigidity import local_prediction_rigidity  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "si_mlearn_zuo2020"
STRATEGIES = ("whole", "cluster", "periodic", "high_symmetry", "random")
SIZES = (1, 2, 5, 10)
log = logging.getLogger("study_lpr_embedding")


# --------------------------------------------------------------------------- data and model


def si_frames(xyz: str, meta: str) -> tuple[list[Atoms], list[str]]:
    """Zuo 2020 frames with their labels on a SinglePointCalculator, and each frame's group."""
    with lzma.open(SHARED / meta, "rt") as fh:
        groups = [entry["group"] for entry in json.load(fh)]
    frames = []
    for atoms in read(SHARED / xyz, ":"):
        out = atoms.copy()
        out.calc = SinglePointCalculator(out, energy=atoms.get_potential_energy(), forces=atoms.arrays["force"])
        frames.append(out)
    return frames, groups


def training_sets(seed: int = 0) -> tuple[list[Atoms], list[Atoms]]:
    frames, groups = si_frames("Si_train.xyz", "training.json.xz")
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for group, n_train, n_valid in (("AIMD-NVT", 30, 4), ("Elastic", 15, 2), ("Vacancy", 15, 2)):
        idx = rng.permutation([i for i, g in enumerate(groups) if g == group])
        train += [frames[i] for i in idx[:n_train]]
        valid += [frames[i] for i in idx[n_train : n_train + n_valid]]
    return train, valid


def params(epochs: int, seed: int = 0) -> MACEParams:
    return MACEParams(
        r_max=4.0, num_channels=16, max_L=1, num_interactions=1, correlation=3, mlp_irreps="16x0e",
        energy_weight=10.0, forces_weight=100.0, stress_weight=0.0, batch_size=4, lr=0.01,
        max_epochs=epochs, finetune_epochs=max(epochs // 2, 5), valid_fraction=0.0, seed=seed, device="auto",
    )


def base_model(work: Path, train: list[Atoms], valid: list[Atoms], epochs: int) -> Path:
    path = work / "base.model"
    if not path.exists():
        started = time.perf_counter()
        result = train_mace(train, params(epochs), path, valid=valid)
        log.warning("base model: %s in %.0f s", result.metrics, time.perf_counter() - started)
    return path


def large_cell(work: Path, model: Path, steps: int, temperature: float) -> list[Atoms]:
    """The melted 1,000-atom cell: frames every 20 steps, the last one first."""
    path = work / "large_cell.extxyz"
    if not path.exists():
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(5)
        atoms.calc = load_calculator(model)
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(0))
        dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=np.random.default_rng(1))
        frames: list[Atoms] = []

        def keep() -> None:
            frame = atoms.copy()
            frame.calc = None
            frames.append(frame)

        dyn.attach(keep, interval=20)
        started = time.perf_counter()
        dyn.run(steps)
        log.warning("MD: %d atoms, %d steps in %.0f s", len(atoms), steps, time.perf_counter() - started)
        write(path, frames[::-1])
    return read(path, ":")


def lowest_lpr_atoms(cell: Atoms, lpr: np.ndarray, count: int, separation: float) -> list[int]:
    """The ``count`` lowest-LPR atoms, each ≥ ``separation`` Å (minimum image) from those kept."""
    kept: list[int] = []
    for j in np.argsort(lpr):
        if all(cell.get_distance(int(j), k, mic=True) >= separation for k in kept):
            kept.append(int(j))
        if len(kept) == count:
            break
    return kept


# --------------------------------------------------------------------------- LPR enhancement


def generated(strategy: str, frames: list[Atoms], center: int, m: int, cutoff: float, buffer: float, seed: int,
              contact: float) -> list[Atoms]:
    """The m structures a strategy adds for the target atom ``center`` of ``frames[0]``."""
    if strategy == "whole":
        return frames[:m]
    if strategy == "random":
        rng = np.random.default_rng(seed)
        centers = rng.choice(len(frames[0]), size=m, replace=False)
        return [embed(frames[0], int(c), strategy="periodic", cutoff=cutoff, buffer=buffer, contact=contact, seed=seed + k)[0]
                for k, c in enumerate(centers)]
    return embed(frames[0], center, strategy=strategy, cutoff=cutoff, buffer=buffer, copies=m, contact=contact, seed=seed)


def enhancement_table(model: Path, hessian, frames: list[Atoms], targets: list[int], cutoff: float, buffer: float,
                      contact: float) -> dict:
    """``{strategy: {m: [enhancement per target]}}`` and the structures' sizes."""
    lpr_features = compute_features(model, [frames[0]])[0].last_layer
    whole_rows = label_rows(model, frames[: max(SIZES)], hessian.weights)
    out: dict = {s: {str(m): [] for m in SIZES} for s in STRATEGIES}  # str: JSON's keys
    sizes: dict = {s: [] for s in STRATEGIES}
    for t, center in enumerate(targets):
        for strategy in STRATEGIES:
            for m in SIZES:
                if strategy == "whole":
                    rows = whole_rows[:m]
                    structures = frames[:m]
                else:
                    structures = generated(strategy, frames, center, m, cutoff, buffer, seed=1000 * t + m, contact=contact)
                    rows = label_rows(model, structures, hessian.weights)
                out[strategy][str(m)].append(float(lpr_enhancement(hessian, rows, lpr_features[center])))
                if m == 1:
                    sizes[strategy] += [len(a) for a in structures]
    return {"enhancement": out, "atoms_per_structure": sizes}


# --------------------------------------------------------------------------- labelling with QE


def qe_labeller():
    """PBE, 20 Ry, Γ only (every cell here has edges ≥ 10.7 Å); Marzari–Vanderbilt smearing because
    liquid Si is a metal (fixed occupations left pw.x's SCF unconverged after 100 iterations on one
    of these cells)."""
    return make_labeller(
        "espresso",
        input_data={"system": {"ecutwfc": 20, "occupations": "smearing", "smearing": "mv", "degauss": 0.02},
                    "electrons": {"mixing_beta": 0.3}},
        timeout=3600,
    )


def qe_label(work: Path, name: str, atoms: Atoms) -> Atoms | None:
    """``atoms`` with QE's energy and forces, or None when pw.x failed on it (logged; the other
    labels stand); cached by name."""
    path = work / "qe" / f"{name}.extxyz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            label = qe_labeller().label(atoms)
        except LabelFailure as exc:
            log.warning("QE %s failed (%s): left out", name, exc)
            return None
        done = atoms.copy()
        done.calc = SinglePointCalculator(done, energy=label.energy, forces=label.forces)
        write(path, done)
        log.warning("QE %s: %d atoms in %.0f s", name, len(atoms), time.perf_counter() - started)
    labelled = read(path)
    labelled.info.update(atoms.info)
    return labelled


def base_cells(vasp_model: Path) -> tuple[list[Atoms], list[Atoms]]:
    """(train, valid) geometries for the QE-trained base: 64-atom cubic cells (2×2×2 diamond, edges
    10.7–11 Å like the carved cells, so Γ-only QE treats them alike), crystal ones strained and
    rattled, and hot ones (frames of a 3,000 K Langevin run with ``vasp_model``, which only makes
    geometries; QE labels them). Smaller cells would be cheaper, but at Γ only their k-point error
    differs from the carved cells' (8-atom cells at 2×2×2 k-points and 16-atom cells at 1×2×2 came
    out 0.7 eV/atom apart, the wrong way round)."""
    rng = np.random.default_rng(11)
    crystal = []
    for a in (5.35, 5.43, 5.52):
        for sigma in (0.05, 0.15):
            cell = bulk("Si", "diamond", a=a, cubic=True).repeat(2)
            cell.rattle(sigma, seed=int(rng.integers(2**31)))
            crystal.append(cell)
    for _ in range(2):
        cell = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
        strain = np.eye(3) + np.triu(rng.uniform(-0.03, 0.03, (3, 3)))
        cell.set_cell(cell.cell @ strain, scale_atoms=True)
        cell.rattle(0.1, seed=int(rng.integers(2**31)))
        crystal.append(cell)
    hot_cell = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    hot_cell.calc = load_calculator(vasp_model)
    MaxwellBoltzmannDistribution(hot_cell, temperature_K=3000, rng=np.random.default_rng(2))
    dyn = Langevin(hot_cell, 1.0 * units.fs, temperature_K=3000, friction=0.02, rng=np.random.default_rng(3))
    dyn.run(300)  # lose the crystal first
    hot = []
    for _ in range(10):
        dyn.run(50)
        frame = hot_cell.copy()
        frame.calc = None
        hot.append(frame)
    order = rng.permutation(len(crystal))
    crystal = [crystal[i] for i in order]
    return crystal[:-2] + hot[:-2], crystal[-2:] + hot[-2:]


def qe_base(work: Path, vasp_model: Path, epochs: int) -> tuple[Path, list[Atoms], list[Atoms]]:
    """The labelling study's base model, trained from scratch on QE labels of :func:`base_cells`
    (a cell pw.x failed on is left out)."""
    cells = base_cells(vasp_model)
    labelled = [[qe_label(work, f"base-{kind}-{k}", c) for k, c in enumerate(group)]
                for kind, group in zip(("train", "valid"), cells)]
    train, valid = ([a for a in group if a is not None] for group in labelled)
    path = work / "base-qe.model"
    if not path.exists():
        result = train_mace(train, params(epochs), path, valid=valid)
        log.warning("QE base model: %s", result.metrics)
    return path, train, valid


def environment_rmse(model: Path, cells: list[Atoms], cutoff: float) -> float:
    """Force RMSE over the atoms within ``cutoff`` of each cell's centre (its carved environment)."""
    calc = load_calculator(model)
    errors = []
    for cell in cells:
        center = int(cell.info["embedding"]["center"])
        near = [j for j in range(len(cell)) if cell.get_distance(center, j, mic=True) <= cutoff]
        predicted = cell.copy()
        predicted.calc = calc
        errors.append((predicted.get_forces()[near] - cell.get_forces()[near]).ravel())
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def labelling_study(work: Path, vasp_model: Path, frames: list[Atoms], cutoff: float, args: argparse.Namespace) -> dict:
    """Targeted versus random periodic cells, labelled by QE, for a base model trained on QE labels
    with the same settings, its targets being the lowest-LPR atoms under *its* loss H."""
    model, train, valid = qe_base(work, vasp_model, args.qe_base_epochs)
    hessian = loss_hessian(model, train, validation=valid)
    lpr = local_prediction_rigidity(hessian, compute_features(model, [frames[0]])[0].last_layer)
    targets = lowest_lpr_atoms(frames[0], lpr, args.label_targets, separation=2 * cutoff)
    rng = np.random.default_rng(7)
    random_centers = rng.choice([j for j in range(len(frames[0])) if j not in targets], size=len(targets), replace=False)
    targeted, random_cells, held_out, left_out = [], [], [], []
    for t, center in enumerate(targets):
        # one target's triple is used only if all three cells got a label (equal counts per arm)
        carve = dict(strategy="periodic", cutoff=cutoff, buffer=args.buffer, contact=args.contact)
        cells = [
            embed(frames[0], center, **carve, seed=t)[0],
            embed(frames[0], int(random_centers[t]), **carve, seed=t)[0],
            embed(frames[0], center, **carve, seed=100 + t)[0],
        ]
        labelled = [qe_label(work, f"{kind}-{center}-{t}-contact{args.contact:g}", cell)
                    for kind, cell in zip(("targeted", "random", "eval"), cells)]
        if any(a is None for a in labelled):
            left_out.append(center)
            continue
        targeted.append(labelled[0])
        random_cells.append(labelled[1])
        held_out.append(labelled[2])
    if not held_out:
        raise RuntimeError("QE labelled no complete (targeted, random, held-out) triple")
    result: dict = {
        "base_training": {"train": [len(a) for a in train], "valid": [len(a) for a in valid]},
        "targets": targets, "target_lpr": [float(lpr[j]) for j in targets], "median_lpr": float(np.median(lpr)),
        "atoms": [len(a) for a in targeted + random_cells + held_out], "targets_left_out": left_out,
        "base": environment_rmse(model, held_out, cutoff), "targeted": [], "random": [],
    }
    for arm, extra in (("targeted", targeted), ("random", random_cells)):
        for seed in range(args.finetune_seeds):
            path = work / f"finetuned-qe-{arm}-{seed}-contact{args.contact:g}.model"
            if not path.exists():
                train_mace(train + extra, params(args.epochs, seed), path, init_model=model, valid=valid)
            result[arm].append(environment_rmse(path, held_out, cutoff))
    return result


# --------------------------------------------------------------------------- report


def plot(enhancement: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in STRATEGIES:
        values = np.array([enhancement[strategy][str(m)] for m in SIZES]) * 100  # (sizes, targets)
        ax.errorbar(SIZES, values.mean(axis=1), yerr=values.std(axis=1), marker="o", capsize=3, label=strategy)
    ax.set_xscale("log")
    ax.set_xticks(SIZES, [str(m) for m in SIZES])
    ax.set_xlabel("structures added")
    ax.set_ylabel("LPR enhancement of the target atom (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: dict) -> str:
    text = ["# LPR enhancement by embedding strategy (issue 10)", ""]
    if "enhancement" in results:
        part = results["enhancement"]
        enh = part["table"]["enhancement"]
        rows = []
        for strategy in STRATEGIES:
            cells = [f"{np.mean(enh[strategy][str(m)]) * 100:.2f} ± {np.std(enh[strategy][str(m)]) * 100:.2f}"
                     for m in SIZES]
            sizes = part["table"]["atoms_per_structure"][strategy]
            rows.append([strategy, f"{np.mean(sizes):.0f}", *cells])
        text += [
            "## LPR enhancement", "", "```", part["run"], f"wall time {part['wall_s']:.0f} s", "```", "",
            f"Large cell: {part['cell_atoms']} atoms; targets: atoms {part['targets']} "
            f"(LPR {', '.join(f'{x:.3g}' for x in part['target_lpr'])}; cell median {part['median_lpr']:.3g}); "
            f"H: {part['hessian']}.", "",
            "LPR enhancement (R_after − R_before)/R_before in %, mean ± std over targets:", "", "```",
            table(["strategy", "atoms", *[f"m={m}" for m in SIZES]], rows), "```", "",
        ]
    if "labelling" in results:
        lab = results["labelling"]
        n_train, n_valid = len(lab["base_training"]["train"]), len(lab["base_training"]["valid"])
        text += [
            "## QE labels: targeted versus random cells", "", "```", lab["run"], f"wall time {lab['wall_s']:.0f} s",
            "```", "",
            f"Base model trained from scratch on QE labels of {n_train} 64-atom cells ({n_valid} held out for early "
            f"stopping and ς); targets: its lowest-LPR atoms {lab['targets']} of the large cell (LPR "
            f"{', '.join(f'{x:.3g}' for x in lab['target_lpr'])}; cell median {lab['median_lpr']:.3g}); "
            f"left out: {lab['targets_left_out'] or 'none'}.", "",
            "Force RMSE (meV/Å) on the held-out embeddings' atoms within r_max of the target, "
            f"{len(lab['targeted'])} fine-tune seeds (mean ± std):", "", "```",
            table(["model", "force RMSE"], [
                ["base (QE 64-atom cells)", f"{lab['base'] * 1000:.1f}"],
                ["+ targeted periodic", f"{np.mean(lab['targeted']) * 1000:.1f} ± {np.std(lab['targeted']) * 1000:.1f}"],
                ["+ random periodic", f"{np.mean(lab['random']) * 1000:.1f} ± {np.std(lab['random']) * 1000:.1f}"],
            ]), "```",
        ]
    return "\n".join(text) + "\n"


def enhancement_part(model: Path, train: list[Atoms], valid: list[Atoms], frames: list[Atoms],
                     cutoff: float, args: argparse.Namespace) -> dict:
    hessian = loss_hessian(model, train, validation=valid)
    lpr = local_prediction_rigidity(hessian, compute_features(model, [frames[0]])[0].last_layer)
    targets = lowest_lpr_atoms(frames[0], lpr, args.targets, separation=2 * cutoff)
    return {
        "cell_atoms": len(frames[0]), "targets": targets, "target_lpr": [float(lpr[j]) for j in targets],
        "median_lpr": float(np.median(lpr)),
        "hessian": f"{hessian.form}, ς = {hessian.regularizer:.3g} ({hessian.regularizer_method})",
        "table": enhancement_table(model, hessian, frames, targets, cutoff, args.buffer, args.contact),
    }


PARTS = ("enhancement", "labelling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--md-steps", type=int, default=400)
    parser.add_argument("--md-temperature", type=float, default=2500.0)
    parser.add_argument("--buffer", type=float, default=1.5, help="Å beyond r_max kept around a target (embed's buffer)")
    parser.add_argument("--targets", type=int, default=5)
    parser.add_argument("--label-targets", type=int, default=3)
    parser.add_argument("--finetune-seeds", type=int, default=3)
    parser.add_argument("--contact", type=float, default=2.0,
                        help="Å: closest approach across the carved cells' images (embed's contact; its default "
                             "1.0 put Si atoms 1.0 Å apart, QE forces up to 170 eV/Å)")
    parser.add_argument("--qe-base-epochs", type=int, default=150, help="epochs of the QE-trained base (14 cells)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="parts to run (enhancement, labelling); the others are kept from --out's results.json")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lpr_embedding"))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "alforge_lpr_embedding"))
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {', '.join(PARTS)}, got {args.parts!r}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    header = machine_report() + f"\nsettings: {settings}"
    print(header, flush=True)
    stored = out / "results.json"
    results: dict = json.loads(stored.read_text()) if stored.exists() else {}

    train, valid = training_sets()
    model = base_model(work, train, valid, args.epochs)
    frames = large_cell(work, model, args.md_steps, args.md_temperature)
    cutoff = float(params(args.epochs).r_max)
    for part in parts:
        started = time.perf_counter()
        if part == "enhancement":
            found = enhancement_part(model, train, valid, frames, cutoff, args)
        else:
            found = labelling_study(work, model, frames, cutoff, args)
        results[part] = {"run": header, "wall_s": time.perf_counter() - started, **found}
        stored.write_text(json.dumps(results, indent=1))  # each part kept as soon as it is done
    if "enhancement" in results:
        plot(results["enhancement"]["table"]["enhancement"], out / "enhancement.png")
    text = report(results)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
