"""Label-level MIG equals a brute-force greedy re-factorisation loop (METHODS §3)."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors import make_selector
from alforge.uncertainty.rigidity import Hessian


def _logdet(matrix: np.ndarray) -> float:
    sign, value = np.linalg.slogdet(matrix)
    assert sign > 0
    return value


def _brute(blocks, h, budget):
    """slogdet(H + R_cᵀR_c) for every unpicked candidate at every step."""
    h = h.copy()
    picks, gains = [], []
    for _ in range(min(budget, len(blocks))):
        base = _logdet(h)
        gain = np.full(len(blocks), -np.inf)
        for c, r in enumerate(blocks):
            if c not in picks:
                gain[c] = 0.5 * (_logdet(h + r.T @ r) - base)
        best = int(np.argmax(gain))
        picks.append(best)
        gains.append(gain[best])
        h += blocks[best].T @ blocks[best]
    return picks, gains


def _blocks(rng, n, d, duplicates):
    sizes = rng.integers(1, d + 1, size=n)
    sizes[0], sizes[1] = 1, d  # r_c = 1 and r_c = d always present
    blocks = [rng.normal(size=(r, d)) * rng.uniform(0.2, 2.0) for r in sizes]
    classes = list(range(n))
    for k in range(duplicates):  # exact copies of earlier blocks
        src = int(rng.integers(0, n))
        blocks.append(blocks[src].copy())
        classes.append(classes[src])
    return blocks, np.array(classes)


@pytest.mark.parametrize(
    "seed,n,d,n_train,budget,sigma,duplicates",
    [
        (0, 30, 5, 20, 8, 1e-3, 0),
        (1, 40, 8, 3, 12, 1e-2, 5),  # rank-deficient training set, duplicates
        (2, 25, 4, 0, 25, 0.3, 3),  # no training rows, budget = everything
        (3, 200, 6, 50, 30, 1e-3, 10),  # enough candidates for the lazy loop to skip work
        (4, 20, 1, 5, 10, 0.1, 4),  # d = 1: every block has r_c = 1 = d
    ],
)
def test_mig_label_equals_brute_force(seed, n, d, n_train, budget, sigma, duplicates):
    rng = np.random.default_rng(seed)
    blocks, classes = _blocks(rng, n, d, duplicates)
    train = rng.normal(size=(n_train, d)) if n_train else None
    h = sigma**2 * np.eye(d) + (train.T @ train if train is not None else 0.0)
    sel = make_selector("mig_label", regularizer=sigma).select(
        np.zeros((len(blocks), d)), budget, train=train, label_rows=blocks
    )
    picks, gains = _brute(blocks, h, budget)
    # Exact duplicates tie; compare which *class* of identical blocks was picked at each step.
    assert classes[sel.indices].tolist() == classes[picks].tolist()
    assert len(set(sel.indices.tolist())) == len(sel.indices)
    np.testing.assert_allclose(sel.scores, gains, rtol=1e-8, atol=1e-11)


def test_mig_label_with_given_hessian_and_no_candidate_array():
    rng = np.random.default_rng(9)
    d = 7
    blocks, _ = _blocks(rng, 30, d, 0)
    g = rng.normal(size=(40, d))
    hessian = Hessian(g.T @ g + 0.01 * np.eye(d), regularizer=0.1)
    before = hessian.matrix.copy()
    sel = make_selector("mig_label").select(None, 6, label_rows=blocks, hessian=hessian)
    picks, gains = _brute(blocks, hessian.matrix, 6)
    assert sel.indices.tolist() == picks
    np.testing.assert_allclose(sel.scores, gains, rtol=1e-8)
    np.testing.assert_array_equal(hessian.matrix, before)  # the caller's H is untouched


def test_mig_label_one_row_blocks_equal_mig():
    rng = np.random.default_rng(4)
    rows, train = rng.normal(size=(60, 5)), rng.normal(size=(10, 5))
    label = make_selector("mig_label").select(rows, 9, train=train, label_rows=[r[None] for r in rows])
    plain = make_selector("mig").select(rows, 9, train=train)
    assert label.indices.tolist() == plain.indices.tolist()
    np.testing.assert_allclose(label.scores, plain.scores, rtol=1e-9)


def test_mig_label_errors_name_the_input():
    sel = make_selector("mig_label")
    with pytest.raises(ValueError, match="label_rows"):
        sel.select(np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match="label_rows"):
        sel.select(np.zeros((3, 2)), 1, label_rows=[np.ones((1, 2))] * 2)
    with pytest.raises(ValueError, match=r"label_rows\[1\]"):
        sel.select(np.zeros((2, 2)), 1, label_rows=[np.ones((1, 2)), np.ones((1, 3))])
    with pytest.raises(ValueError, match=r"label_rows\[0\]"):
        sel.select(np.zeros((1, 2)), 1, label_rows=[np.full((1, 2), np.nan)])


def test_wide_block_gains_equal_the_whitened_ones_past_the_cache(monkeypatch):
    """Wide blocks (r_c > d/2) are scored from ``chol(H + R_cᵀR_c)`` with ``K_c`` kept: as ``H``
    grows, and with a cache too small for every ``K_c``, they equal the whitened determinants."""
    from alforge.selectors import label_mig

    rng = np.random.default_rng(7)
    d = 16
    monkeypatch.setattr(label_mig, "GRAM_CACHE_BYTES", 3 * 8 * d * d)  # room for 3 of 100
    blocks = [rng.normal(size=(int(r), d)) * rng.uniform(0.1, 3.0) for r in rng.integers(1, 3 * d, 100)]
    train = rng.normal(size=(40, d))
    h = 1e-2 * np.eye(d) + train.T @ train
    idx = np.arange(len(blocks))
    scorer = label_mig.GainScorer(blocks, d)
    for step in range(3):  # H grows as picks are committed; the kept K_c stay valid
        scorer.set_hessian(h)
        got = scorer.gains(idx)
        want = label_mig.exact_gains(blocks, idx, np.linalg.cholesky(h))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        h = h + blocks[step].T @ blocks[step]
    assert len(scorer.grams) == 3
    assert np.count_nonzero(scorer.sizes > d // 2) > 50  # most blocks took the wide path


def test_wide_gains_split_across_threads_equal_one_thread(monkeypatch):
    """The wide-block Cholesky runs in threads (GIL released): same gains, and a failure in a worker
    names its candidate."""
    from alforge.selectors import label_mig

    rng = np.random.default_rng(11)
    d = 12
    blocks = [rng.normal(size=(2 * d, d)) for _ in range(50)]
    h = 1e-2 * np.eye(d)
    idx = rng.permutation(len(blocks))
    scorer = label_mig.GainScorer(blocks, d)
    scorer.set_hessian(h)
    monkeypatch.setattr(label_mig, "worker_count", lambda: 1)
    one = scorer.gains(idx)
    monkeypatch.setattr(label_mig, "worker_count", lambda: 3)
    monkeypatch.setattr(label_mig, "MIN_PER_THREAD", 1)
    np.testing.assert_array_equal(scorer.gains(idx), one)
    np.testing.assert_allclose(one, label_mig.exact_gains(blocks, idx, np.linalg.cholesky(h)), rtol=1e-9)

    scorer.grams[int(idx[-1])] = -np.eye(d)  # a K_c that makes H + K_c indefinite, in the last thread
    with pytest.raises(np.linalg.LinAlgError, match=f"candidate {idx[-1]}"):
        scorer.gains(idx)
