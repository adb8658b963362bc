"""Query by committee: the trust window and the ordering, on plain arrays."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.selectors import make_selector


def test_trust_window_and_order():
    dev = np.array([0.01, 0.2, 0.9, 0.3, 0.1, 0.6])
    cand = np.zeros((6, 3))
    sel = make_selector("committee", sigma_lo=0.05, sigma_hi=0.5, order="deviation").select(cand, 2, force_deviation=dev)
    assert list(sel.indices) == [3, 1] and list(sel.scores) == [0.3, 0.2]
    assert sel.info == {"in_window": 3, "below": 1, "above": 2}
    rand = make_selector("committee", sigma_lo=0.05, sigma_hi=0.5, seed=3).select(cand, 10, force_deviation=dev)
    assert sorted(rand.indices) == [1, 3, 4], "random order, but only inside the window, budget clamped"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="force_deviation"):
        make_selector("committee").select(np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match="shape"):
        make_selector("committee").select(np.zeros((3, 2)), 1, force_deviation=np.zeros(2))
    with pytest.raises(ValueError, match="committee_size"):
        make_selector("committee", committee_size=1)
