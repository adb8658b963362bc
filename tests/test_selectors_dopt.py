"""MaxVol, the extrapolation grade and the D-optimal selector (METHODS §3)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from alforge.selectors import make_selector
from alforge.selectors.dopt import extrapolation_grade, maxvol


def _naive_maxvol(features: np.ndarray, tol: float, rows: list[int]) -> list[int]:
    """Recompute all coefficients with an explicit inverse after every swap."""
    rows = list(rows)
    while True:
        coef = features @ np.linalg.inv(features[rows])
        j, i = np.unravel_index(np.argmax(np.abs(coef)), coef.shape)
        if abs(coef[j, i]) <= tol:
            return rows
        rows[i] = int(j)


def _lu_rows(features: np.ndarray) -> list[int]:
    """The rows partial pivoting picks: features = L[perm] U, pivot k is the row with perm == k."""
    perm = scipy.linalg.lu(features, p_indices=True)[0]
    return [int(np.flatnonzero(perm == k)[0]) for k in range(features.shape[1])]


@pytest.mark.parametrize("seed,n,d,tol", [(0, 400, 10, 1.01), (1, 60, 12, 1.05), (2, 300, 5, 1.3)])
def test_maxvol_bounds_every_row_and_matches_naive_swaps(seed, n, d, tol):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))
    result = maxvol(features, tol=tol)
    assert result.converged
    active_inverse = np.linalg.inv(features[result.rows])
    assert np.abs(features @ active_inverse).max() <= tol + 1e-12
    np.testing.assert_allclose(
        extrapolation_grade(active_inverse, features[result.rows]), 1.0, atol=1e-12
    )
    assert result.log_abs_det == pytest.approx(
        np.linalg.slogdet(features[result.rows])[1], abs=1e-9
    )
    assert result.rows.tolist() == _naive_maxvol(features, tol, _lu_rows(features))


def test_maxvol_from_given_start():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(200, 6))
    result = maxvol(features, start=np.arange(6))
    assert result.rows.tolist() == _naive_maxvol(features, 1.01, list(range(6)))
    assert np.abs(features @ np.linalg.inv(features[result.rows])).max() <= 1.01


def test_maxvol_errors_name_the_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="features"):
        maxvol(rng.normal(size=(3, 5)))
    rank_deficient = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 4))
    with pytest.raises(ValueError, match="rank-deficient"):
        maxvol(rank_deficient)
    with pytest.raises(ValueError, match="tol"):
        maxvol(rng.normal(size=(10, 3)), tol=1.0)
    with pytest.raises(ValueError, match="start"):
        maxvol(rng.normal(size=(10, 3)), start=[0, 0, 1])
    with pytest.raises(ValueError, match="active_set_inverse"):
        extrapolation_grade(np.ones((3, 2)), np.ones((4, 3)))


def test_extrapolation_grade_is_max_abs_coefficient():
    rng = np.random.default_rng(1)
    inverse, features = rng.normal(size=(4, 4)), rng.normal(size=(30, 4))
    np.testing.assert_allclose(
        extrapolation_grade(inverse, features), np.abs(features @ inverse).max(axis=1)
    )


SPAN_TOL = 1e-6


def _naive_active(pool, tol, start=None):
    """Span basis by SVD, naive MaxVol in its coordinates, explicit inverse (dopt module doc)."""
    d = pool.shape[1]
    _, sing, vt = np.linalg.svd(pool, full_matrices=False)
    r = int(np.sum(sing > SPAN_TOL * sing[0]))
    basis = np.eye(d) if r == d else vt[:r].T
    coords = pool @ basis
    start = list(start) if start is not None and len(start) == r else _lu_rows(coords)
    rows = _naive_maxvol(coords, tol, start)
    active = pool[rows]
    scale = SPAN_TOL * np.sqrt(np.mean(np.sum(active**2, axis=1)))
    return active, basis, np.linalg.inv(coords[rows]), scale


def _naive_grade(f, active_set):
    _, basis, inverse, scale = active_set
    y = f @ basis
    return max(np.abs(y @ inverse).max(), np.linalg.norm(f - y @ basis.T) / scale)


def _naive_dopt(cand, groups, elements, train, train_elements, budget, tol, threshold):
    active = {e: _naive_active(train[train_elements == e], tol) for e in np.unique(elements)}
    ids = np.unique(groups)
    picks, scores = [], []
    for _ in range(min(budget, len(ids))):
        grade = np.array([_naive_grade(f, active[e]) for f, e in zip(cand, elements, strict=True)])
        best, best_grade = None, -np.inf
        for s in ids:
            g = grade[groups == s].max()
            if s not in picks and g > best_grade:
                best, best_grade = s, g
        picks.append(int(best))  # below the threshold too: the batch is filled
        scores.append(best_grade)
        for e in np.unique(elements[groups == best]):
            pool = np.vstack([active[e][0], cand[(groups == best) & (elements == e)]])
            active[e] = _naive_active(pool, tol, start=range(len(active[e][0])))
    return picks, scores


@pytest.mark.parametrize("seed,n_train_b,threshold", [(0, 40, 1.0), (1, 3, 1.0), (2, 40, 2.0)])
def test_dopt_equals_naive_reference(seed, n_train_b, threshold):
    rng = np.random.default_rng(seed)
    d = 4
    train = rng.normal(size=(60 + n_train_b, d))
    train_elements = np.array([1] * 60 + [8] * n_train_b)  # element 8 may lack an active set
    sizes = rng.integers(1, 5, size=15)
    groups = np.repeat(np.arange(200, 215), sizes)
    elements = rng.choice([1, 8], size=len(groups))
    cand = rng.normal(size=(len(groups), d)) * rng.uniform(0.5, 2.5, size=(len(groups), 1))
    selection = make_selector("dopt", threshold=threshold).select(
        cand, 8, train=train, train_elements=train_elements, groups=groups, elements=elements
    )
    picks, scores = _naive_dopt(cand, groups, elements, train, train_elements, 8, 1.01, threshold)
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-9)
    assert np.all(np.isfinite(selection.scores)) and len(picks) == 8
    assert selection.info["filled_below_threshold"] == int(np.sum(np.array(scores) <= threshold))


def test_dopt_does_not_pick_a_copy_of_a_picked_structure():
    rng = np.random.default_rng(3)
    d = 5
    train = rng.normal(size=(50, d))
    outlier = 4.0 * rng.normal(size=(3, d))
    cand = np.vstack([outlier, outlier, rng.normal(size=(10, d))])
    groups = np.array([0, 0, 0, 1, 1, 1] + list(range(2, 12)))
    kw = dict(train=train, train_elements=np.zeros(50), groups=groups, elements=np.zeros(len(cand)))
    selection = make_selector("dopt", threshold=1.01, fill=False).select(cand, 12, **kw)
    assert selection.indices[0] in (0, 1)
    assert not {0, 1} <= set(selection.indices.tolist())
    # filling the batch may take the copy, but only below the threshold (not informative)
    filled = make_selector("dopt", threshold=1.01).select(cand, 12, **kw)
    copy = filled.indices.tolist().index(1 - int(filled.indices[0]))
    assert filled.scores[copy] <= 1.01 and len(filled.indices) == 12


def test_dopt_errors_name_the_context_key():
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="groups"):
        make_selector("dopt").select(
            x, 1, train=x, train_elements=np.zeros(4), elements=np.zeros(4)
        )
    with pytest.raises(ValueError, match="train_elements"):
        make_selector("dopt").select(
            x, 1, train=x, train_elements=np.zeros(3), elements=np.zeros(4), groups=np.arange(4)
        )


def test_maxvol_in_place_updates_across_chunks(monkeypatch):
    import alforge.selectors.dopt as dopt_module

    rng = np.random.default_rng(6)
    features = rng.normal(size=(300, 7))
    monkeypatch.setattr(dopt_module, "_SWAP_CHUNK_BYTES", 8 * 7 * 11)  # 11 rows per chunk
    result = maxvol(features)
    assert result.rows.tolist() == _naive_maxvol(features, 1.01, _lu_rows(features))
    assert np.abs(features @ np.linalg.inv(features[result.rows])).max() <= 1.01


def test_active_sets_bound_training_grades():
    from alforge.selectors.dopt import active_sets

    rng = np.random.default_rng(8)
    train = rng.normal(size=(90, 4))
    elements = np.array([1] * 60 + [6] * 27 + [8] * 3)  # element 8 is too rare for a full active set
    sets = active_sets(train, elements)
    assert set(sets) == {1, 6, 8} and sets[8].basis is not None and sets[1].basis is None
    for element, aset in sets.items():
        assert aset.grade(train[elements == element]).max() <= 1.01


def test_dopt_rank_deficient_block_gives_finite_grades_and_a_full_batch():
    rng = np.random.default_rng(12)
    d = 6
    # element 1: plenty of atoms; element 8: two atoms (rank 2); element 9: dependent rows (rank 3)
    train = np.vstack(
        [rng.normal(size=(40, d)), rng.normal(size=(2, d)), rng.normal(size=(20, 3)) @ rng.normal(size=(3, d))]
    )
    train_elements = np.array([1] * 40 + [8] * 2 + [9] * 20)
    groups = np.repeat(np.arange(12), 3)
    elements = rng.choice([1, 8, 9, 10], size=len(groups))  # element 10 was never seen
    cand = rng.normal(size=(len(groups), d))
    sel = make_selector("dopt", threshold=2.0).select(
        cand, 12, train=train, train_elements=train_elements, groups=groups, elements=elements
    )
    assert len(sel.indices) == 12 and sorted(sel.indices.tolist()) == list(range(12))
    assert np.all(np.isfinite(sel.scores))
    assert sel.info["filled_below_threshold"] == int(np.sum(sel.scores <= 2.0))
    assert make_selector("dopt", threshold=2.0).informative(sel.scores, 0.0) == 12 - sel.info[
        "filled_below_threshold"
    ]
    short = make_selector("dopt", threshold=1e12, fill=False).select(
        cand, 12, train=train, train_elements=train_elements, groups=groups, elements=elements
    )
    assert short.info["stopped_at_threshold"] and len(short.indices) < 12


@pytest.mark.parametrize("norm", ["max", "2"])
def test_grades_match_direct_formulas(norm):
    from alforge.selectors.dopt import active_sets

    rng = np.random.default_rng(2)
    d = 5
    train = np.vstack([rng.normal(size=(30, d)), rng.normal(size=(3, d))])
    elements = np.array([1] * 30 + [8] * 3)
    sets = active_sets(train, elements)
    f = rng.normal(size=(20, d)) * 3
    # full rank: eq. 46 (norm "2") or max |f A⁻¹| with A the active rows
    a = sets[1].rows
    direct = (
        np.abs(f @ np.linalg.inv(a)).max(axis=1)
        if norm == "max"
        else np.sqrt(np.einsum("ij,jk,ik->i", f, np.linalg.inv(a.T @ a), f))
    )
    np.testing.assert_allclose(sets[1].grade(f, norm), direct, rtol=1e-10)
    np.testing.assert_allclose(extrapolation_grade(np.linalg.inv(a), f, norm), direct, rtol=1e-10)
    # rank 3 < d: coefficients f A⁺ in the span, residual f − f A⁺A outside it, in units of s
    a = sets[8].rows
    assert a.shape == (3, d)
    coef = f @ np.linalg.pinv(a)
    outside = np.linalg.norm(f - coef @ a, axis=1) / (1e-6 * np.sqrt(np.mean(np.sum(a**2, axis=1))))
    inside = np.abs(coef).max(axis=1) if norm == "max" else np.linalg.norm(coef, axis=1)
    direct = np.maximum(inside, outside) if norm == "max" else np.hypot(inside, outside)
    np.testing.assert_allclose(sets[8].grade(f, norm), direct, rtol=1e-6)
    # training rows of the deficient element stay inside (γ ≤ tol, no spurious out-of-span part)
    assert sets[8].grade(train[elements == 8], "max").max() <= 1.01


def test_dopt_norm_2_selects_and_rejects_unknown_norm():
    rng = np.random.default_rng(5)
    train = rng.normal(size=(30, 4))
    cand = 2 * rng.normal(size=(20, 4))
    kw = dict(train=train, train_elements=np.zeros(30), groups=np.arange(20), elements=np.zeros(20))
    sel = make_selector("dopt", norm="2").select(cand, 5, **kw)
    assert len(sel.indices) == 5 and np.all(np.isfinite(sel.scores))
    with pytest.raises(ValueError, match="norm"):
        make_selector("dopt", norm="fro")
