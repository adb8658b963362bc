"""``dopt``'s kept coefficients (low-rank updates of ``C = F A⁻¹``, bounds, exact re-grades)
against a full float64 re-grade of every candidate atom after each pick."""

from __future__ import annotations

import numpy as np
import pytest

import alforge.selectors.dopt as dopt
from alforge.selectors import make_selector
from alforge.selectors.dopt import build_active_set


def _full_regrade_dopt(cand, groups, elements, train, train_elements, budget, threshold, norm):
    """The selection loop with every candidate atom re-graded in float64 after each pick."""
    cand = cand.astype(np.float64)
    train = train.astype(np.float64)
    fallback = np.sqrt(np.mean(np.sum(train**2, axis=1)))
    active = {
        e: build_active_set(train[train_elements == e], 1.01, None, 1e-6, fallback)
        for e in np.unique(elements)
    }
    ids, owner = np.unique(groups, return_inverse=True)
    picked, picks, scores = np.zeros(len(ids), dtype=bool), [], []
    for _ in range(budget):
        grade = np.empty(len(cand))
        for e, aset in active.items():
            grade[elements == e] = aset.grade(cand[elements == e], norm)
        structure = np.full(len(ids), -np.inf)
        np.maximum.at(structure, owner, grade)
        structure[picked] = -np.inf
        s = int(np.argmax(structure))
        picked[s] = True
        picks.append(int(ids[s]))
        scores.append(structure[s])
        for e in np.unique(elements[owner == s]):
            pool = np.vstack([active[e].rows, cand[(owner == s) & (elements == e)]])
            start = np.arange(active[e].rank) if active[e].rank else None
            active[e] = build_active_set(pool, 1.01, start, 1e-6, fallback)
    return picks, scores


def _pool(seed, d, dtype):
    """Three elements: 1 well covered, 6 with 3 training atoms (rank-deficient until picks
    complete its span), 8 never seen; structures of 1-6 atoms with a spread of scales."""
    rng = np.random.default_rng(seed)
    train = np.vstack([rng.normal(size=(5 * d, d)), rng.normal(size=(3, d))])
    train_elements = np.array([1] * (5 * d) + [6] * 3)
    sizes = rng.integers(1, 7, size=120)
    groups = np.repeat(np.arange(1000, 1120), sizes)
    elements = rng.choice([1, 1, 1, 6, 8], size=len(groups))
    cand = rng.normal(size=(len(groups), d)) * rng.uniform(0.3, 2.5, size=(len(groups), 1))
    return cand.astype(dtype), groups, elements, train.astype(dtype), train_elements


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("norm", ["max", "2"])
@pytest.mark.parametrize("seed,d", [(0, 6), (1, 10)])
def test_dopt_equals_full_regrade_over_many_picks(seed, d, norm, dtype):
    cand, groups, elements, train, train_elements = _pool(seed, d, dtype)
    selection = make_selector("dopt", threshold=1.0, norm=norm).select(
        cand, 40, train=train, train_elements=train_elements, groups=groups, elements=elements
    )
    picks, scores = _full_regrade_dopt(
        cand, groups, elements, train, train_elements, 40, 1.0, norm
    )
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-9)


@pytest.mark.parametrize("refresh,fraction", [(1e-6, 0.25), (1.0, 0.25), (1.0, 1.0), (0.0, 0.25)])
def test_dopt_loose_float32_bounds_still_give_the_full_regrade_picks(monkeypatch, refresh, fraction):
    # float32 coefficients: slacks ~1e-5 relative, so near-ties are settled by exact re-grades;
    # refresh 1.0 never rebuilds (updates accumulate), 0.0 rebuilds after every update,
    # fraction 1.0 applies even large changes as updates.
    monkeypatch.setattr(dopt, "_COEF_DTYPE", np.float32)
    monkeypatch.setattr(dopt, "_REFRESH_RELATIVE", refresh)
    monkeypatch.setattr(dopt, "_UPDATE_MAX_FRACTION", fraction)
    cand, groups, elements, train, train_elements = _pool(2, 8, np.float32)
    selection = make_selector("dopt").select(
        cand, 35, train=train, train_elements=train_elements, groups=groups, elements=elements
    )
    picks, scores = _full_regrade_dopt(cand, groups, elements, train, train_elements, 35, 1.0, "max")
    assert selection.indices.tolist() == picks
    np.testing.assert_allclose(selection.scores, scores, rtol=1e-9)


@pytest.mark.parametrize("coef_dtype,tight", [(np.float64, 1e-10), (np.float32, 1e-2)])
def test_kept_coefficients_stay_within_their_bound_across_updates(monkeypatch, coef_dtype, tight):
    monkeypatch.setattr(dopt, "_COEF_DTYPE", coef_dtype)
    monkeypatch.setattr(dopt, "_REFRESH_RELATIVE", np.inf)  # never rebuild: updates accumulate
    rng = np.random.default_rng(7)
    d = 12
    train = rng.normal(size=(60, d))
    cand = rng.normal(size=(3000, d)) * rng.uniform(0.5, 3.0, size=(3000, 1))
    atoms = np.arange(0, 3000, 2)  # every other row: the gathered path
    active = build_active_set(train, 1.01)
    kept = dopt._Coefficients(active, cand, atoms, dopt._row_norms(cand[atoms]))
    for step in range(30):
        new = cand[rng.choice(atoms, size=1 + step % 4, replace=False)]
        previous = active
        active = build_active_set(np.vstack([previous.rows, new]), 1.01, np.arange(d))
        kept.update(previous, active, cand, atoms)
        exact = active.grade(cand[atoms])
        assert np.all(np.abs(kept.grades - exact) <= kept.slack)
    assert kept.rho.max() > 0  # the updates, not rebuilds, produced these coefficients
    assert np.median(kept.slack / exact) < tight  # and the bound is not vacuous
