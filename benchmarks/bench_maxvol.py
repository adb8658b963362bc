"""MaxVol (``alforge.selectors.dopt.maxvol``) versus maxvolpy's ``py_maxvol`` (METHODS §3).

Same float64 matrix, same ``tol``: both start from LU partial pivoting and swap the largest
coefficient, so both should reach the same active set; the table checks ``log|det A|`` and the
largest ``|F A⁻¹|`` recomputed from scratch.

maxvolpy 0.3.8 does not build on NumPy 2 (its setup.py reads ``numpy.__config__.lapack_opt_info``
and compiles a Cython extension), so this script uses its pure-Python ``py_maxvol``, which is what
``pip install maxvolpy`` falls back to when the extension is missing. Point ``--maxvolpy-src`` at an
unpacked sdist (``pip download --no-deps --no-build-isolation maxvolpy``) when it is not installed.

    .venv/bin/python benchmarks/bench_maxvol.py --maxvolpy-src PATH/maxvolpy-0.3.8   # the unpacked sdist

The two alternate ``--repeats`` times (default 5); the table gives the median and range of each
and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table, timed  # noqa: E402

from alforge.selectors.dopt import maxvol  # noqa: E402


def load_py_maxvol(source: str | None):  # noqa: ANN201 - a third-party function
    if source:
        sys.path.insert(0, source)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning about the C version
        from maxvolpy.maxvol import py_maxvol
    return py_maxvol


def check(features: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    active = features[rows]
    return float(np.linalg.slogdet(active)[1]), float(
        np.abs(features @ np.linalg.inv(active)).max()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--r", type=int, default=128)
    parser.add_argument("--tol", type=float, default=1.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--maxvolpy-src", default=None)
    args = parser.parse_args()
    print(machine_report())
    rng = np.random.default_rng(args.seed)
    features = rng.normal(size=(args.n, args.r)) / np.sqrt(np.arange(1, args.r + 1))
    py_maxvol = load_py_maxvol(args.maxvolpy_src)

    # Interleaved runs (ours, theirs, ours, ...): the machine is shared and its load drifts, so
    # both see the same conditions on average; medians and ranges are reported.
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):
        ours, seconds = timed(lambda: maxvol(features, tol=args.tol))
        t_ours.append(seconds)
        (theirs, _), seconds = timed(lambda: py_maxvol(features, args.tol, 100 * args.r))
        t_theirs.append(seconds)
    logdet_ours, coef_ours = check(features, ours.rows)
    logdet_theirs, coef_theirs = check(features, np.asarray(theirs))
    same = sorted(ours.rows.tolist()) == sorted(np.asarray(theirs).tolist())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nMaxVol: N={args.n}, r={args.r}, tol={args.tol}, float64 input, {args.repeats} "
        f"interleaved runs each (median [min–max] s; load avg after: {load})"
    )
    print(
        table(
            ["method", "time s", "speed-up (medians)", "swaps", "log|det A|", "max |F A^-1|",
             "same rows"],
            [
                ["maxvolpy py_maxvol", spread(t_theirs), 1.0, "-", logdet_theirs, coef_theirs, "-"],
                [
                    "alforge maxvol",
                    spread(t_ours),
                    float(np.median(t_theirs) / np.median(t_ours)),
                    ours.n_swaps,
                    logdet_ours,
                    coef_ours,
                    same,
                ],
            ],
        )
    )


def spread(times: list[float]) -> str:
    """``median [min–max]`` of a list of run times."""
    return f"{np.median(times):.4g} [{min(times):.4g}–{max(times):.4g}]"


if __name__ == "__main__":
    main()
