"""Each selector counts informative picks in its own units; stop_reason uses that count."""

from __future__ import annotations

import numpy as np

from alforge.config import StoppingConfig
from alforge.flows.stopping import stop_reason
from alforge.selectors import make_selector


def test_informative_in_each_selectors_units():
    scores = np.array([3.0, 1.5, 0.5, 0.0])
    for name in ("mig", "mig_label", "mmig", "qopt", "pr_augment", "fps"):
        assert make_selector(name).informative(scores, 1.0) == 2
        assert make_selector(name).informative(np.array([np.inf, 0.0]), 1.0) == 1
    assert make_selector("random").informative(np.zeros(5), 1.0) == 5
    dopt = make_selector("dopt", threshold=2.0)
    assert dopt.informative(scores, 0.0) == 1  # γ > γ_lo when min_score is unset
    assert dopt.informative(scores, None) == 1
    assert dopt.informative(scores, 1.0) == 2  # γ ≥ min_score when set
    for name, param in (("ltau", "uncertain_above"), ("probe", "unreliable_above")):  # p in [0, 1]
        selector = make_selector(name, **{param: 0.5})
        assert selector.informative(np.array([0.9, 0.6, 0.5, 0.1]), 0.0) == 2  # > 0.5 when unset
        assert selector.informative(np.array([0.9, 0.6, 0.5, 0.1]), None) == 2
        assert selector.informative(np.array([0.9, 0.6, 0.5, 0.1]), 0.3) == 3  # ≥ min_score when set
    lpr = make_selector("lpr")
    assert lpr.informative(np.array([0.5, 2.0, 9.0]), 2.0) == 2  # LPR ≤ min_score: lower is less rigid
    committee = make_selector("committee", sigma_lo=0.1, sigma_hi=1.0)
    assert committee.informative(np.array([0.05, 0.2, 0.5, 2.0]), 0.0) == 2
    assert committee.informative(np.array([0.05, 0.2, 0.5, 2.0]), 0.3) == 1


def test_stop_reason_uses_the_selector():
    cfg = StoppingConfig(min_informative=2, min_score=0.0)
    grades = {"picked": [1, 2, 3], "scores": [3.0, 0.9, 0.8]}  # one γ above γ_lo = 1
    assert stop_reason(cfg, {}, 0, grades) is None  # plain "score >= 0" counts all three
    reason = stop_reason(cfg, {}, 0, grades, selector=make_selector("dopt"))
    assert reason is not None and "dopt" in reason and "only 1" in reason
    named = dict(grades, selector="dopt", params={"threshold": 0.5})
    assert stop_reason(cfg, {}, 0, named) is None  # rebuilt from the stored name and params
    assert stop_reason(cfg, {}, 0, {"scores": [0.0, 0.0]}, selector=make_selector("random")) is None
