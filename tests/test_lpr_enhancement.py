"""lpr_enhancement against an explicit re-inversion of H + Σ RᵀR (METHODS §5)."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.uncertainty import lpr_enhancement
from alforge.uncertainty.rigidity import Hessian


def _lpr(matrix: np.ndarray, f: np.ndarray) -> float:
    return 1.0 / float(f @ np.linalg.inv(matrix) @ f)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    d = 6
    train = rng.normal(size=(10, d))
    H = Hessian.from_features(train, regularizer=0.3)
    blocks = [rng.normal(size=(r, d)) for r in (1, 4, 7)]  # an energy row; energy + force rows
    atoms = rng.normal(size=(5, d))
    return H, blocks, atoms


def test_matches_brute_force_reinversion(setup):
    H, blocks, atoms = setup
    after = H.matrix + sum(b.T @ b for b in blocks)
    for f in atoms:
        expected = (_lpr(after, f) - _lpr(H.matrix, f)) / _lpr(H.matrix, f)
        got = lpr_enhancement(H, blocks, f)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-10)
    many = lpr_enhancement(H, blocks, atoms)
    assert many.shape == (5,)
    assert np.allclose(many, [lpr_enhancement(H, blocks, f) for f in atoms], rtol=1e-12)
    assert np.all(many > 0)


def test_blocks_sum_and_one_array_is_rows(setup):
    H, blocks, atoms = setup
    stacked = np.vstack(blocks)
    assert np.allclose(lpr_enhancement(H, stacked, atoms), lpr_enhancement(H, blocks, atoms), rtol=1e-12)
    # a 1-D entry is one row; nothing added is no enhancement
    assert lpr_enhancement(H, [blocks[0][0]], atoms[0]) == pytest.approx(lpr_enhancement(H, [blocks[0]], atoms[0]))
    assert np.allclose(lpr_enhancement(H, [], atoms), 0.0)


def test_the_atom_itself_gains_one_effective_point(setup):
    """Adding f_j itself raises R_j by exactly 1 (000, Appendix B): the enhancement is 1/R_j."""
    H, _, atoms = setup
    f = atoms[0]
    assert lpr_enhancement(H, [f], f) == pytest.approx(1.0 / _lpr(H.matrix, f), rel=1e-10)


def test_bad_shapes_are_named(setup):
    H, blocks, atoms = setup
    with pytest.raises(ValueError, match=r"structures_features\[1\]"):
        lpr_enhancement(H, [blocks[0], np.ones((2, 3))], atoms[0])
    with pytest.raises(ValueError, match="atom_feature"):
        lpr_enhancement(H, blocks, np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        lpr_enhancement(H, [np.full((1, H.dim), np.nan)], atoms[0])
