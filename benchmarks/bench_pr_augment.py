"""PR-guided augmentation (``pr_augment``) versus the brute-force loop of METHODS §4.

The brute force re-inverts ``H + f_c f_cᵀ`` (d × d) for every candidate at every pick and averages
the targets' rigidities; ``pr_augment`` scores all candidates from Sherman–Morrison on a T × N
cross-kernel updated by one rank-1 term per pick. The picks must be identical.

The brute force runs with one BLAS thread: on this shared 2-core machine a multi-threaded 300 × 300
inverse waits on the busy core and the loop took 630 s instead of about a minute, which would
flatter the comparison.

    .venv/bin/python benchmarks/bench_pr_augment.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table, timed  # noqa: E402

from alforge.selectors import make_selector  # noqa: E402
from alforge.uncertainty.blas_threads import single_threaded_blas  # noqa: E402


def brute_force(
    candidates: np.ndarray, targets: np.ndarray, train: np.ndarray, budget: int, sigma: float
) -> list[int]:
    h = train.T @ train + sigma**2 * np.eye(train.shape[1])
    picks: list[int] = []
    for _ in range(budget):
        scores = np.full(len(candidates), -np.inf)
        for c, f in enumerate(candidates):
            if c in picks:
                continue
            inverse = np.linalg.inv(h + np.outer(f, f))
            scores[c] = np.mean(1.0 / np.einsum("ij,jk,ik->i", targets, inverse, targets))
        best = int(np.argmax(scores))
        picks.append(best)
        h += np.outer(candidates[best], candidates[best])
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d", type=int, default=300)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-targets", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_report())
    rng = np.random.default_rng(args.seed)
    scales = 1.0 / np.sqrt(np.arange(1, args.d + 1))
    candidates = rng.normal(size=(args.n, args.d)) * scales
    targets = rng.normal(size=(args.n_targets, args.d)) * scales
    train = rng.normal(size=(args.n_train, args.d)) * scales
    selector = make_selector("pr_augment", regularizer=args.sigma)
    ours, t_ours = timed(
        lambda: selector.select(candidates, args.budget, train=train, targets=targets), args.repeats
    )
    with single_threaded_blas():
        theirs, t_theirs = timed(
            lambda: brute_force(candidates, targets, train, args.budget, args.sigma)
        )
    same = int(np.sum(ours.indices == np.asarray(theirs)))
    print(
        f"\npr_augment: d={args.d}, N={args.n}, T={args.n_targets}, b={args.budget}, "
        f"train={args.n_train}, σ={args.sigma} (alforge best of {args.repeats}, brute force 1 run)"
    )
    print(
        table(
            ["method", "time s", "speed-up", "picks equal to brute force", "mean target PR after"],
            [
                ["brute force (re-invert per candidate, 1 thread)", t_theirs, 1.0, "-", "-"],
                [
                    "alforge pr_augment",
                    t_ours,
                    t_theirs / t_ours,
                    f"{same}/{args.budget}",
                    float(ours.info["objective"][-1]),
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
