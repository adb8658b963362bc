"""``dopt`` selection: kept coefficients with low-rank updates versus a full re-grade per pick.

The same synthetic pool (``--atoms`` float32 candidate atoms of two elements in cells of
``--atoms-per-structure``, d = ``--dim``, correlated rows with a decaying spectrum like real
last-layer features; ``--train`` training cells) goes through

* ``DOptimal.select`` (``alforge.selectors.dopt``): after each pick the changed active rows
  update every candidate's coefficients ``C = F A⁻¹`` in O(n d m) (Woodbury), the float64
  bounds name the few structures to re-grade exactly, and the argmax is theirs;
* the former loop, kept here only as the reference: after each pick, every candidate atom of the
  picked structure's elements is re-graded from its features (an O(n d²) GEMM per pick).

Both must give the same picks and scores; the table gives seconds and the ratio.

Measured on the shared 2-core machine (2026-12-02, load 5-6), d = 128, budget 100: 2e5 atoms,
former 109 s, kept coefficients 26.6 s (4.1x; a first run 144 s vs 29.7 s, 4.9x), same picks,
scores equal; 1e6 atoms (``--skip-reference``), 70 s, peak RSS 2.2 GB (the float32 candidates
0.5 GB and C 1 GB). Per pick and element (profiled at 1e5 atoms): the update pass over C,
a memory-bound read and write (~44 ms per 5e4 atoms), and the small MaxVol over active set ∪
picked atoms with its span SVD (~60 ms, independent of n); at 1e6 atoms the update pass dominates.

    .venv/bin/python benchmarks/bench_dopt.py                     # 2e5 atoms, d = 128, budget 100
    .venv/bin/python benchmarks/bench_dopt.py --atoms 1e6 --skip-reference
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table  # noqa: E402

from alforge.selectors import make_selector  # noqa: E402
from alforge.selectors.dopt import _grade_into, _rms_norm, build_active_set  # noqa: E402

ELEMENTS = (29, 47)


def _features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Correlated Gaussian rows with a decaying spectrum (as in ``bench_select_path.py``)."""
    return (rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1))).astype(np.float32)


def full_regrade_select(
    candidates: np.ndarray,
    budget: int,
    train: np.ndarray,
    train_elements: np.ndarray,
    groups: np.ndarray,
    elements: np.ndarray,
    tol: float = 1.01,
    span_tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """The former ``DOptimal.select`` loop (``norm="max"``, batch filled): every candidate atom of
    the picked structure's elements re-graded from its features after each pick."""
    structure_ids, owner = np.unique(groups, return_inverse=True)
    fallback = _rms_norm(train)
    states, grade = {}, np.empty(len(candidates))
    for element in np.unique(elements):
        atoms = np.flatnonzero(elements == element)
        active = build_active_set(train[train_elements == element], tol, None, span_tol, fallback)
        states[element] = [active, atoms]
        _grade_into(grade, active, candidates, atoms, "max")
    by_structure = np.argsort(owner, kind="stable")
    first_atom = np.searchsorted(owner[by_structure], np.arange(len(structure_ids)))
    picked = np.zeros(len(structure_ids), dtype=bool)
    picks, scores = [], []
    for _ in range(budget):
        structure_grade = np.maximum.reduceat(grade[by_structure], first_atom)
        structure_grade[picked] = -np.inf
        s = int(np.argmax(structure_grade))
        picked[s] = True
        picks.append(s)
        scores.append(float(structure_grade[s]))
        rows = np.flatnonzero(owner == s)
        for element in np.unique(elements[rows]):
            active, atoms = states[element]
            new = np.asarray(candidates[rows[elements[rows] == element]], dtype=np.float64)
            start = np.arange(active.rank) if active.rank else None
            active = build_active_set(
                np.vstack([active.rows, new]), tol, start, span_tol, fallback
            )
            states[element][0] = active
            _grade_into(grade, active, candidates, atoms, "max")
    return structure_ids[np.asarray(picks)], np.asarray(scores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--atoms", type=float, default=2e5, help="candidate atoms")
    parser.add_argument("--atoms-per-structure", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--train", type=int, default=40, help="training cells")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true", help="time only the new path")
    args = parser.parse_args()
    print(machine_report())
    rng = np.random.default_rng(args.seed)
    n_cells = int(args.atoms) // args.atoms_per_structure
    n = n_cells * args.atoms_per_structure
    n_train = args.train * args.atoms_per_structure
    candidates = _features(rng, n, args.dim)
    train = _features(rng, n_train, args.dim)
    context = dict(
        groups=np.repeat(np.arange(n_cells), args.atoms_per_structure),
        elements=rng.choice(ELEMENTS, n),
        train_elements=rng.choice(ELEMENTS, n_train),
    )

    start = time.perf_counter()
    selection = make_selector("dopt").select(candidates, args.budget, train=train, **context)
    t_new = time.perf_counter() - start
    rows = [["kept coefficients (alforge dopt)", t_new, "-", "-", "-"]]
    if not args.skip_reference:
        start = time.perf_counter()
        picks, scores = full_regrade_select(candidates, args.budget, train, **context)
        t_old = time.perf_counter() - start
        same = selection.indices.tolist() == picks.tolist()
        worst = float(np.max(np.abs(selection.scores - scores) / np.abs(scores)))
        rows.insert(0, ["full re-grade per pick (former)", t_old, 1.0, "-", "-"])
        rows[1][2:] = [t_old / t_new, same, worst]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\ndopt: {n} candidate atoms ({n_cells} cells of {args.atoms_per_structure}, 2 elements), "
        f"float32, d={args.dim}, {n_train} training atoms, budget {args.budget} "
        f"(load avg after: {load})"
    )
    print(
        table(
            ["method", "select s", "speed-up", "same picks", "max rel. score diff"], rows
        )
    )


if __name__ == "__main__":
    main()
