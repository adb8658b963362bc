"""Shared helpers for the benchmark scripts: the machine line and a plain-text table."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import scipy

T = TypeVar("T")


def machine_report() -> str:
    """Platform, CPUs, BLAS threads, load and library versions, printed above every table."""
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    return (
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"CPUs {os.cpu_count()} (shared with other jobs; load avg {load}) | "
        f"OPENBLAS_NUM_THREADS={threads}\n"
        f"python {platform.python_version()} | numpy {np.__version__} | "
        f"scipy {scipy.__version__} | "
        f"torch {torch.__version__} (threads {torch.get_num_threads()})"
    )


def timed(fn: Callable[[], T], repeats: int = 1) -> tuple[T, float]:
    """Result of ``fn`` and its best wall time over ``repeats`` calls (the machine is shared)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best  # type: ignore[return-value]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)
