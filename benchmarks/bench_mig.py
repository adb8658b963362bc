"""MIG (``alforge`` ``mig``) versus bmdal_reg 3.0.2 greedy MaxDet, then a size sweep (METHODS §3).

bmdal's ``select_batch`` with a linear base kernel, the ``('train', [σ])`` posterior transform and
``maxdet`` with ``maxdet_sigma=σ`` is greedy MIG with ``H = σ² I + FᵀF``, so on the same float64
data both must pick the same rows. The sweep runs ``mig`` alone: N=1e6 candidates live in a float32
memory-mapped file and are streamed in chunks; ``peak extra MB`` is the largest allocation beyond
the candidate array (tracemalloc), so the working set stays far below 4 GB.

The comparison alternates the two methods ``--repeats`` times (default 5) and prints the median and
range of each, their ratio, and the hardware bound beside them: one whitening GEMM ``F L⁻ᵀ``
(2·N·d² flops, float64 and float32) timed in the same loop. ``mig`` streams one float32 GEMM for
upper bounds and re-scores the top candidates in float64, so its picks are the float64 ones.

    .venv/bin/python benchmarks/bench_mig.py                  # comparison + quick sweep
    .venv/bin/python benchmarks/bench_mig.py --sweep full     # N ∈ {2e4, 1e5, 1e6}, d ∈ {128, 512}
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table, timed  # noqa: E402

from alforge.selectors import make_selector  # noqa: E402


def features(rng: np.random.Generator, n: int, d: int, out: np.ndarray | None = None) -> np.ndarray:
    """Correlated Gaussian rows with a decaying spectrum (like real last-layer features)."""
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    if out is None:
        return rng.normal(size=(n, d)) * scales
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        out[start:stop] = rng.normal(size=(stop - start, d)) * scales
    return out


def bmdal_picks(candidates: np.ndarray, train: np.ndarray, budget: int, sigma: float) -> np.ndarray:
    import torch
    from bmdal_reg.bmdal.algorithms import select_batch
    from bmdal_reg.bmdal.feature_data import TensorFeatureData

    data = {
        "train": TensorFeatureData(torch.as_tensor(train, dtype=torch.float64)),
        "pool": TensorFeatureData(torch.as_tensor(candidates, dtype=torch.float64)),
    }
    idxs, _ = select_batch(
        batch_size=budget,
        models=[torch.nn.Identity()],
        data=data,
        y_train=None,
        base_kernel="linear",
        kernel_transforms=[("train", [sigma])],
        selection_method="maxdet",
        maxdet_sigma=sigma,
        allow_float64=True,
    )
    return idxs.cpu().numpy()


def spread(times: list[float]) -> str:
    """``median [min–max]`` of a list of run times."""
    return f"{np.median(times):.4g} [{min(times):.4g}–{max(times):.4g}]"


def gemm_seconds(candidates: np.ndarray, dtype: type) -> float:
    """One whitening GEMM ``F L⁻ᵀ`` (2·N·d² flops) in ``dtype``, input already in that dtype."""
    d = candidates.shape[1]
    f = np.asarray(candidates, dtype=dtype)
    m = np.tril(np.ones((d, d), dtype=dtype))
    start = time.perf_counter()
    f @ m.T
    return time.perf_counter() - start


def compare(args: argparse.Namespace) -> None:
    np.Inf = np.inf  # bmdal_reg 3.0.2 still uses the alias NumPy 2 removed
    rng = np.random.default_rng(args.seed)
    n, d = args.n, args.d
    candidates, train = features(rng, n, d), features(rng, args.n_train, d)
    mig = make_selector("mig", regularizer=args.sigma)
    # Interleaved runs (ours, theirs, GEMM, ours, ...): the machine is shared and its load drifts,
    # so each method sees the same conditions on average; medians and ranges are reported.
    t_ours, t_theirs, t_gemm, t_gemm32 = [], [], [], []
    for _ in range(args.repeats):
        ours, seconds = timed(lambda: mig.select(candidates, args.budget, train=train))
        t_ours.append(seconds)
        theirs, seconds = timed(lambda: bmdal_picks(candidates, train, args.budget, args.sigma))
        t_theirs.append(seconds)
        t_gemm.append(gemm_seconds(candidates, np.float64))
        t_gemm32.append(gemm_seconds(candidates, np.float32))
    same = int(np.sum(ours.indices == theirs))
    med_ours, med_theirs, med_gemm = (float(np.median(t)) for t in (t_ours, t_theirs, t_gemm))
    print(
        f"\nMIG vs bmdal_reg maxdet: N={n}, d={d}, b={args.budget}, train={args.n_train}, "
        f"σ={args.sigma}, float64 input, {args.repeats} interleaved runs each "
        f"(median [min–max] s; load avg after: {', '.join(f'{x:.2f}' for x in os.getloadavg())})"
    )
    print(
        table(
            ["method", "time s", "speed-up (medians)", "picks equal to bmdal", "re-scored"],
            [
                ["bmdal_reg 3.0.2", spread(t_theirs), 1.0, f"{args.budget}/{args.budget}", "-"],
                [
                    "alforge mig",
                    spread(t_ours),
                    med_theirs / med_ours,
                    f"{same}/{args.budget}",
                    ours.info["n_rescored"],
                ],
            ],
        )
    )
    print(
        f"GEMM bound: one float64 whitening GEMM (2·N·d² = {2 * n * d * d / 1e9:.2f} GFLOP) "
        f"{spread(t_gemm)} s; mig / GEMM (medians) = {med_ours / med_gemm:.2f}× "
        f"(float32 GEMM {spread(t_gemm32)} s)"
    )
    if same != args.budget:
        first = int(np.argmax(ours.indices != theirs))
        print(f"picks first differ at position {first}")


def sweep(args: argparse.Namespace) -> None:
    sizes = [20_000, 100_000, 1_000_000] if args.sweep == "full" else [20_000, 100_000]
    dims = [128, 512] if args.sweep == "full" else [128]
    rows = []
    rng = np.random.default_rng(args.seed + 1)
    for d in dims:
        train = features(rng, args.n_train, d)
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                if n >= 1_000_000:
                    path = os.path.join(tmp, "candidates.f32")
                    candidates = np.lib.format.open_memmap(
                        path, mode="w+", dtype=np.float32, shape=(n, d)
                    )
                    features(rng, n, d, out=candidates)
                    candidates.flush()
                    storage = "float32 memmap"
                else:
                    candidates = features(rng, n, d)
                    storage = "float64 RAM"
                mig = make_selector("mig", regularizer=args.sigma)
                tracemalloc.start()
                start = time.perf_counter()
                selection = mig.select(candidates, args.budget, train=train)
                seconds = time.perf_counter() - start
                peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                rows.append(
                    [
                        n,
                        d,
                        storage,
                        candidates.nbytes / 2**20,
                        seconds,
                        peak,
                        selection.info["n_rescored"],
                    ]
                )
    print(f"\nmig sweep: b={args.budget}, train={args.n_train}, σ={args.sigma} (one run each)")
    print(table(["N", "d", "candidates", "input MB", "time s", "peak extra MB", "re-scored"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", choices=["none", "quick", "full"], default="quick")
    parser.add_argument("--skip-reference", action="store_true", help="no bmdal comparison")
    args = parser.parse_args()
    print(machine_report())
    if not args.skip_reference:
        compare(args)
    if args.sweep != "none":
        sweep(args)


if __name__ == "__main__":
    main()
