"""Every registered selector drives a (tiny) campaign end to end, and diagnostics are stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alforge.config import load_config
from alforge.selectors import available
from alforge.storage import Store
from conftest import tiny_campaign

pytestmark = pytest.mark.slow

TARGETS = [{"generate": {"element": "Cu", "a": 3.61, "supercells": [[2, 1, 1]], "count": 2,
                         "rattle": 0.12, "vacancies": 1, "seed": 7}}]
SELECTORS = ["mig", "mig_label", "mmig", "qopt", "pr_augment", "dopt", "fps", "random", "committee"]
PARAMS = {
    "dopt": {"threshold": 0.0},
    "committee": {"committee_size": 2, "sigma_lo": 0.0, "sigma_hi": 1e9, "order": "deviation"},
}


# Selectors whose campaigns need more than this tiny one (large cells to carve, a stored training-error
# log, a trained classifier) have an end-to-end campaign test of their own.
OWN_CAMPAIGN_TEST = {"lpr": "test_lpr_campaign.py", "ltau": "test_ltau.py", "probe": "test_probe.py"}


def test_every_registered_selector_is_exercised():
    assert set(available()) <= set(SELECTORS) | set(OWN_CAMPAIGN_TEST)
    for name, filename in OWN_CAMPAIGN_TEST.items():
        text = (Path(__file__).parent / filename).read_text()
        assert f'"name": "{name}"' in text, f"{filename} runs no campaign with selector {name}"


@pytest.mark.parametrize("name", SELECTORS)
def test_campaign_with_selector(name, tmp_path, prefect_harness):
    from alforge.flows.campaign import campaign

    path = tiny_campaign(
        tmp_path,
        name=f"sel-{name.replace('_', '-')}",
        selector={"name": name, "batch_size": 2, "params": PARAMS.get(name, {})},
        targets=TARGETS,
        mlip={"max_epochs": 3, "finetune_epochs": 2},
        uncertainty={"hessian": "energy"} if name == "mig" else {},
        exploration={"walkers": 2, "steps": 9, "frame_interval": 3,
                     **({"gamma_hi": 1000.0} if name == "dopt" else {})},
    )
    result = campaign(str(path))
    assert not result["paused"]
    store = Store(load_config(path).store)
    cid = store.campaign_id(f"sel-{name.replace('_', '-')}")
    it1, it2 = store.iterations(cid)
    sel = store.selection_for_iteration(it1.id)
    assert sel["selector"] == name
    assert 1 <= len(sel["picked_ids"]) <= 2
    assert len(set(sel["picked_ids"])) == len(sel["picked_ids"])
    assert set(sel["picked_ids"]) <= set(sel["candidate_ids"])
    assert set(sel["picked_ids"]) <= set(store.labelled_ids(cid, role="candidate"))
    assert store.structure_ids(cid, role="target") and not store.labelled_ids(cid, role="target")
    diag = json.loads(it1.summary_json)["diagnostics"]
    assert diag["pr_candidates"]["q00"] > 0 and diag["lpr_test"]["q50"] > 0
    cal = diag["calibration"]
    assert cal["alpha2"] > 0 and 0 <= cal["conformal_coverage"] <= 1 and np.isfinite(cal["nll"])
    diag2 = json.loads(it2.summary_json)["diagnostics"]
    assert "pr_test" in diag2 and set(diag2["cpr_test"]) == {"readouts.0", "readouts.1"}
    hessian = diag2["hessian"]
    assert hessian["form"] == ("energy" if name == "mig" else "loss")
    assert hessian["regularizer"] > 0 and hessian["regularizer_method"]
    if hessian["form"] == "loss":
        assert hessian["weights"]["forces"] > 0, "force rows weighted as trained"
    if name == "committee":
        m1, m2 = store.models(cid)
        assert len(store.committee_paths(m1.id)) == 1, "one extra member beside the model"
        assert np.all(np.diff(sel["scores"]) <= 0), "ordered by decreasing force deviation"
