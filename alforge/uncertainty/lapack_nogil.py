"""LAPACK's Cholesky (``dpotrf``) called with the GIL released, so Python threads run it in parallel.

scipy's ``scipy.linalg.lapack`` wrappers hold the GIL for the whole call, and numpy's batched
``np.linalg.cholesky`` copies every matrix to Fortran order around it (0.2–1.1 ms per 128 × 128
matrix here, against 0.06–0.08 ms for ``dpotrf`` itself). Label-level MIG scores thousands of
d × d factorisations per pick, so it calls the very routine scipy exports for Cython
(``scipy.linalg.cython_lapack``, the same OpenBLAS scipy uses) through :mod:`ctypes`, which drops
the GIL for the duration of a foreign call, as numba does for its own ``np.linalg`` support.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import numpy as np
import scipy.linalg.cython_lapack

_INT_P = ctypes.POINTER(ctypes.c_int)
_DPOTRF_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, _INT_P, ctypes.c_void_p, _INT_P, _INT_P)


@cache
def _dpotrf() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    capsule = scipy.linalg.cython_lapack.__pyx_capi__["dpotrf"]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return _DPOTRF_TYPE(get_pointer(capsule, get_name(capsule)))


class CholeskyInPlace:
    """``factor(a)`` overwrites one triangle of the symmetric, C-contiguous float64 ``a`` (n × n) with
    its Cholesky factor and returns LAPACK's ``info`` (0, or k > 0 when the leading k × k minor is
    not positive definite). The diagonal of ``a`` is then the factor's diagonal.

    One instance per thread: it holds the integer arguments LAPACK writes through.
    """

    def __init__(self, n: int) -> None:
        self._n = ctypes.c_int(n)
        self._info = ctypes.c_int(0)
        self._call = _dpotrf()

    def factor(self, a: np.ndarray) -> int:
        if a.dtype != np.float64 or not a.flags.c_contiguous or a.shape != (self._n.value,) * 2:
            raise ValueError(f"expected a C-contiguous float64 {self._n.value}² array, got {a.shape}")
        # Symmetric: the C-order array read in Fortran order is the same matrix.
        n = ctypes.byref(self._n)
        self._call(b"L", n, a.ctypes.data, n, ctypes.byref(self._info))
        return self._info.value


def worker_count() -> int:
    """The cores this process may run on (threads for parallel factorisations)."""
    if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset / cgroup CPU pinning
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
