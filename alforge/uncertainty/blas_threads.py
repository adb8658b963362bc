"""Run small BLAS/LAPACK calls on one thread.

d × d factorisations and the many tiny per-pick products of greedy loops take microseconds to
milliseconds on one core, but OpenBLAS starts its thread pool for them anyway. When the other
cores are busy (a shared machine, or a campaign running MD next to selection) each such call then
waits for a scheduler slice: measured here on 2 shared cores, a 512 × 512 Cholesky took 0.5 s
with 2 threads and 5 ms with 1, and the MIG benchmark (N=1e5, d=128, b=100) 2.3 s versus 0.26 s.
Large streamed passes over candidates keep the default thread count.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np  # noqa: F401  (imported before the controller so their BLAS libraries are found)
import scipy.linalg  # noqa: F401
from threadpoolctl import ThreadpoolController

_CONTROLLER = ThreadpoolController()


def single_threaded_blas() -> AbstractContextManager[object]:
    """Context manager limiting BLAS (numpy's and scipy's OpenBLAS) to one thread."""
    return _CONTROLLER.limit(limits=1, user_api="blas")


#: Below this many floating-point operations a BLAS call runs on one thread.
SMALL_FLOPS = 2e8


def threads_for(flops: float) -> AbstractContextManager[object]:
    """One BLAS thread for a call of fewer than :data:`SMALL_FLOPS` operations, else the default."""
    return single_threaded_blas() if flops < SMALL_FLOPS else nullcontext()
