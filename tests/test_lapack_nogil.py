"""``dpotrf`` called through ctypes (GIL released) factors like numpy and reports failures."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.uncertainty.lapack_nogil import CholeskyInPlace


def test_factor_in_place_gives_the_cholesky_diagonal():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(30, 9))
    a = g.T @ g + 0.1 * np.eye(9)
    want = np.diag(np.linalg.cholesky(a))
    work = a.copy()
    assert CholeskyInPlace(9).factor(work) == 0
    np.testing.assert_allclose(work.diagonal(), want, rtol=1e-12)


def test_factor_reports_the_failing_minor_and_rejects_bad_layouts():
    a = np.eye(4)
    a[2, 2] = -1.0
    assert CholeskyInPlace(4).factor(a) == 3  # LAPACK's 1-based order of the failing minor
    with pytest.raises(ValueError, match="C-contiguous float64"):
        CholeskyInPlace(4).factor(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous float64"):
        CholeskyInPlace(4).factor(np.asfortranarray(np.eye(5))[:4, :4])
    with pytest.raises(ValueError, match="C-contiguous float64"):
        CholeskyInPlace(4).factor(np.eye(3))
