"""Per-atom features: ``compute_features`` against a ``MACECalculator.get_descriptors`` loop (issue 12).

Goal: ≥ 3× the loop's atoms/s on the CPU. Both run on the same float64 ScaleShiftMACE (the
STACK.md Cu settings: 16 channels, max_L 1, 2 interactions, r_max 4.5 Å), built here from scratch
(one epoch on 10 EMT-labelled cells: the cost does not depend on the weights), over rattled
32-atom fcc Cu cells (2×2×2 cubic, 200 by default). Rows, timed interleaved (one run of each per
round, so load changes hit all alike), median and best of ``--runs`` rounds:

- ``compute_features`` with its defaults (batches of ``FEATURE_ATOMS_PER_BATCH`` atoms);
- the former ``compute_features`` (before issue 12: mace's ``AtomicData`` graphs and DataLoader,
  16 structures per batch, the model's plain forward pass), for reference;
- the reference: ``calc.get_descriptors(atoms, invariants_only=True)`` per structure, with the
  calculator from ``load_calculator`` (mace's ``MACECalculator`` on the same model object).

Before timing it checks that the two agree: the invariant features are the last layer's columns
of the descriptors (max relative difference printed). ``--sweep`` adds one row per atom budget.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_features.py [--device auto|cpu|cuda] [--sweep]

Measured here (2 shared x86_64 cores, torch 2.13.0+cpu, 1 thread, float64; load average 8.05
before, 8.28 after: two other helpers and the lead's studies running, so every rate is about a
third of a quiet machine's; invariants equal the descriptors to 1.6e-18 relative):

    method                                         atoms/s median   best   × reference (median)
    compute_features (default: 128 atoms/batch)         414.6       592.1        3.66
    former compute_features (16 structures/batch)       285.6       367.3        2.52
    MACECalculator.get_descriptors loop                 113.3       141.7        1

A second run (load 4.9 before, 7.5 after): 420.6 / 305.9 / 108.7 atoms/s, so 3.87× and 2.81×.
That first run took 11.6 min at load 8 (the reference loop is most of it); on a quiet machine the
issue's rates (706 atoms/s for the loop) make it about 2 min. Where the time went (cProfile,
16 structures per batch): ~90 % in the forward pass, of it ~40 % each in the interactions' radial
MLPs and tensor products; graph building ~8 %. Hence the three changes: graphs built without
``AtomicData``/collation, batches of ~128 atoms whose edge tensors stay in cache, and the radial
MLP evaluated once per edge/reverse-edge pair. ``--sweep`` (40 cells, 3 rounds, load ≈ 9),
atoms per batch → atoms/s (median): 32 → 415, 64 → 627, 128 → 527, 256 → 550, 512 → 422,
2048 → 269, 8192 → 302; the reference loop 130.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _machine import machine_report, table  # noqa: E402
from cu_cells import label_emt  # noqa: E402

from alforge.mlip.device import default_dtype, resolve_device  # noqa: E402
from alforge.mlip.features import FEATURE_ATOMS_PER_BATCH, _hooked, compute_features  # noqa: E402
from alforge.mlip.mace_model import (  # noqa: E402
    iterate_batches,
    load_calculator,
    load_model,
    model_dtype,
    model_z_table,
    train_mace,
    unlabelled_config,
)
from alforge.mlip.params import MACEParams  # noqa: E402

PARAMS = dict(num_channels=16, max_L=1, num_interactions=2, r_max=4.5, max_epochs=1, valid_fraction=0.0,
              dtype="float64")  # fmt: skip
SWEEP = (32, 64, 128, 256, 512, 2048, 8192)


def cu_cells(n: int, seed: int) -> list[Atoms]:
    """``n`` rattled 32-atom fcc Cu cells (2×2×2 cubic, a = 3.61 Å, rattle 0.05 Å)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", 3.61, cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.05, seed=int(rng.integers(2**31)))
        out.append(atoms)
    return out


def former_features(model: torch.nn.Module, structures: list[Atoms], device: str) -> list[np.ndarray]:
    """The former ``compute_features`` loop: per-atom (last-layer, invariant) features via mace's batching."""
    out = []
    configs = [unlabelled_config(a) for a in structures]
    with _hooked(model) as read, default_dtype(model_dtype(model)), torch.no_grad():
        for batch in iterate_batches(configs, model_z_table(model), float(model.r_max), 16):
            batch = batch.to(device)
            model(batch.to_dict(), training=False, compute_force=False)
            last_layer, invariant = (t.double().cpu().numpy() for t in read())
            ptr = batch.ptr.cpu().numpy()
            out += [np.hstack([last_layer[a:b], invariant[a:b]]) for a, b in zip(ptr[:-1], ptr[1:])]
    return out


def descriptors_loop(calc, structures: list[Atoms]) -> list[np.ndarray]:
    """The reference: mace's per-structure descriptor call (it computes forces as well)."""
    return [calc.get_descriptors(atoms, invariants_only=True) for atoms in structures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    parser.add_argument("--structures", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--sweep", action="store_true", help=f"also time atoms_per_batch in {SWEEP}")
    args = parser.parse_args()
    if args.structures < 1 or args.runs < 1:
        parser.error("--structures and --runs must be positive")
    device = resolve_device(args.device)
    machine = machine_report()  # before the runs, so its load average is the one they started under
    structures = cu_cells(args.structures, seed=1)
    n_atoms = sum(len(a) for a in structures)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cu.model"
        train_mace([label_emt(a) for a in cu_cells(10, seed=0)], MACEParams(**PARAMS, device=device), path)
        model = load_model(path, device)
        calc = load_calculator(path, device)

    # agreement (and warm-up): invariant features == the last layer's columns of the descriptors
    feats = compute_features(model, structures[:8], device=device)
    desc = descriptors_loop(calc, structures[:8])
    width = feats[0].invariant.shape[1]
    rel = max(
        float(np.abs(f.invariant - d[:, -width:]).max() / np.abs(d[:, -width:]).max()) for f, d in zip(feats, desc)
    )

    budget = FEATURE_ATOMS_PER_BATCH.get(torch.device(device).type, FEATURE_ATOMS_PER_BATCH["cpu"])
    methods: dict[str, Callable[[], object]] = {
        f"compute_features (default: {budget} atoms per batch)": lambda: compute_features(model, structures, device),
        "former compute_features (mace DataLoader, 16 structures per batch)": lambda: former_features(
            model, structures, device
        ),
    }
    if args.sweep:
        for atoms in SWEEP:
            methods[f"compute_features, atoms_per_batch={atoms}"] = (
                lambda atoms=atoms: compute_features(model, structures, device, atoms_per_batch=atoms)
            )
    reference = "MACECalculator.get_descriptors loop (reference)"
    methods[reference] = lambda: descriptors_loop(calc, structures)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.runs):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    ref_rate = n_atoms / statistics.median(times[reference])
    rows = []
    for name, ts in times.items():
        rate = n_atoms / statistics.median(ts)
        rows.append([name, rate, n_atoms / min(ts), rate / ref_rate])
    print(machine.replace("load avg", "load avg before"))
    print(f"device {device} | {args.structures} Cu cells of 32 atoms ({n_atoms} atoms), float64, "
          f"{args.runs} interleaved rounds | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')} | "
          f"load avg after {', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"max relative |invariant - get_descriptors last layer| = {rel:.1e}")
    print(table(["method", "atoms/s (median)", "atoms/s (best)", "× reference (median)"], rows))


if __name__ == "__main__":
    main()
