"""What a campaign shows in Prefect: run names and tags, artifacts and figures (one tiny campaign,
run as a deployment would run it: the flow itself, with overrides, taking its own lease)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import matplotlib.image
import pytest

from alforge.config import ConfigError, load_config
from alforge.monitoring import slug
from conftest import tiny_campaign

NAME = "Tiny_Watch.1"  # not the other tests' "tiny": the Prefect harness is shared by the session
KEY = "tiny-watch-1"


def test_slug():
    assert slug(NAME) == KEY
    assert slug("Cu--EMT  run") == "cu-emt-run"
    with pytest.raises(ValueError, match="no letter or digit"):
        slug("__")


def test_overrides_are_dotted_keys_and_bad_ones_are_named(tmp_path):
    path = tiny_campaign(tmp_path)
    cfg = load_config(path, overrides={"selector.batch_size": 4, "stopping.max_iterations": 1,
                                       "seeds.0.generate.count": 2, "labeller.kwargs.asap_cutoff": True})
    assert (cfg.selector.batch_size, cfg.stopping.max_iterations, cfg.seeds[0].generate.count) == (4, 1, 2)
    assert cfg.labeller.kwargs == {"asap_cutoff": True}
    assert load_config(path).selector.batch_size == 3, "the file itself is unchanged"
    for key, said in [("selector.bogus", "selector has no setting 'bogus'"), ("name.x", "name is a single value"),
                      ("seeds.x", "seeds is a list"), ("seeds.3.file", "index 3 is past the end")]:
        with pytest.raises(ConfigError, match=re.escape(f"override {key!r}: {said}")):
            load_config(path, overrides={key: 1})
    with pytest.raises(ConfigError, match="selector.batch_size"):  # a known key with a bad value: pydantic's message
        load_config(path, overrides={"selector.batch_size": -1})


def test_a_failing_report_is_a_warning(tmp_path, caplog):
    from alforge.monitoring import artifacts
    from alforge.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    cid = store.get_or_create_campaign("c", {})
    artifacts.logger.addHandler(caplog.handler)  # Prefect's logging setup may stop propagation
    try:
        assert artifacts.publish_iteration(store, cid, "c", 1, str(tmp_path)) is False  # no iteration 1
    finally:
        artifacts.logger.removeHandler(caplog.handler)
    assert "could not publish its artifacts" in caplog.text


def test_the_summary_shows_probe_and_ltau():
    from alforge.monitoring.artifacts import summary_markdown

    row = {"iteration": 2, "labels done": 5, "labels failed": 0, "failures by class": {}, "training structures": 9,
           "train F RMSE (meV/Å)": 1, "valid F RMSE (meV/Å)": 2, "test F RMSE (meV/Å)": 3,
           "test E RMSE (meV/atom)": 4, "selected": 2, "score min": None, "score max": None, "stop reason": None}
    metrics = {"n": 40, "accuracy": 0.75, "mcc": 0.5, "f1": 0.8, "roc_auc": 0.81, "ece": 0.05, "brier": 0.17}
    diagnostics = {
        "probe": {"target": "energy", "probe": metrics, "majority": {"accuracy": 0.55},
                  "ensemble_std": {"accuracy": 0.6, "mcc": 0.2, "f1": 0.65}},
        "ltau": {"n_atoms": 64, "k": 10, "atol": 0.0123, "mean_p": 0.4, "ece": 0.08, "spearman": 0.31},
    }
    text = summary_markdown("c", row, diagnostics)
    assert "**PROBE** (energy) on 40 test structures: accuracy 0.75, MCC 0.50" in text
    assert "majority class 0.55; ensemble std accuracy 0.60, MCC 0.20" in text
    assert "**LTAU** (k = 10, atol 12.3 meV/Å) on 64 test atoms: mean p 0.40, ECE 0.08, Spearman with |ΔF| 0.31" in text
    assert "PROBE" not in summary_markdown("c", row, {}) and "LTAU" not in summary_markdown("c", row, {})


@pytest.fixture(scope="module")
def watched(tmp_path_factory, prefect_harness):
    """One campaign through ``campaign_flow`` (as a worker runs a deployment) and what Prefect holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterTags,
    )

    from alforge.flows.campaign import campaign_flow
    from alforge.storage import Store

    path = tiny_campaign(tmp_path_factory.mktemp("monitoring"), stopping={"max_iterations": 3})
    result = campaign_flow(str(path), {"name": NAME, "stopping.max_iterations": 2})
    tag = f"campaign:{NAME}"
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[tag])))
        keys = [f"{KEY}-{k}" for k in ("metrics", "summary", "learning-curve", "labelling")]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    latest = {}
    for art in sorted(artifacts, key=lambda a: a.created):
        latest[art.key] = art
    cfg = load_config(path, overrides={"name": NAME})
    return {"result": result, "flow_runs": flow_runs, "task_runs": task_runs, "artifacts": latest,
            "store": Store(cfg.store), "workdir": cfg.workdir}


def test_flow_runs_are_named_and_tagged(watched):
    assert watched["result"]["stop_reason"] == "reached max_iterations = 2"
    runs = {r.name: r for r in watched["flow_runs"]}
    assert {NAME, f"{NAME}/iteration-1", f"{NAME}/iteration-2"} <= set(runs)
    assert {"alforge", f"campaign:{NAME}"} <= set(runs[NAME].tags), "tagged by the flow itself"
    for k in (1, 2):
        assert {"alforge", f"iteration:{k}"} <= set(runs[f"{NAME}/iteration-{k}"].tags)
    assert runs[f"{NAME}/iteration-1"].parent_task_run_id is not None, "iterations are subflows"
    assert f"{NAME}/iteration-1/labels" in runs, "iteration 1's picks are labelled in its own subflow"


def test_task_runs_are_named_by_step_and_structure(watched):
    store = watched["store"]
    cid = store.campaign_id(NAME)
    names = {t.name for t in watched["task_runs"]}
    labelled = store.labelled_ids(cid)
    assert {f"label {NAME}#{sid}" for sid in labelled} <= names
    for step in ("ingest", "train", "evaluate", "explore", "featurize", "diagnostics", "select", "summarise"):
        assert f"{step} {NAME}" in names, step
        (one, *_) = [t for t in watched["task_runs"] if t.name == f"{step} {NAME}"]
        assert {"alforge", f"campaign:{NAME}", f"step:{step}"} <= set(one.tags), step


def test_the_flow_took_and_released_the_lease(watched):
    store = watched["store"]
    cid = store.campaign_id(NAME)
    assert store.lease(cid) is None, "released"
    assert [c.status for c in store.campaigns() if c.name == NAME] == ["finished"]
    assert len(store.config_versions(cid)) == 1, "the flow recorded the campaign's config"


def test_artifacts_hold_the_iterations(watched):
    arts = watched["artifacts"]
    assert set(arts) == {f"{KEY}-metrics", f"{KEY}-summary", f"{KEY}-learning-curve", f"{KEY}-labelling"}
    import json

    table = arts[f"{KEY}-metrics"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["iteration"] for r in rows] == [1, 2]
    assert [r["selected"] for r in rows] == [3, 0]
    assert rows[1]["training structures"] == 6 + 3 and rows[1]["labels done"] == 6 + 4 + 3
    assert all(r["test F RMSE (meV/Å)"] > 0 for r in rows)
    assert rows[0]["score max"] >= rows[0]["score min"] > 0
    summary = arts[f"{KEY}-summary"].data
    assert f"# {NAME}: iteration 2" in summary and "reached max_iterations = 2" in summary
    assert float(arts[f"{KEY}-labelling"].data) == 100.0


def test_figures_are_pngs_in_the_artifact_and_the_reports_folder(watched):
    md = watched["artifacts"][f"{KEY}-learning-curve"].data
    images = dict(re.findall(r"!\[([a-z-]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md))
    assert set(images) == {"learning-curve", "parity", "calibration"}
    for data in images.values():
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0
    reports = sorted(p.name for p in Path(watched["workdir"], "reports").iterdir())
    assert reports == [f"iteration-{k:03d}-{f}.png" for k in (1, 2) for f in ("calibration", "learning-curve", "parity")]


def test_the_flow_refuses_a_campaign_another_run_owns(watched, tmp_path):
    """Started by a worker while `alforge run` (here: another owner id) holds the campaign, the flow
    stops at once naming the owner, and the campaign is left as it was."""
    from alforge.flows.campaign import campaign_flow
    from alforge.ownership import LeaseHeld, campaign_lease, holds_lease

    store = watched["store"]
    cid = store.campaign_id(NAME)
    path = next(Path(watched["workdir"]).parent.parent.glob("campaign.yaml"))
    with campaign_lease(store, cid, NAME, owner="another-run"):
        assert not holds_lease(store, cid), "held by another owner id, not this process's"
        with pytest.raises(LeaseHeld, match="is being run by pid"):
            campaign_flow(str(path), {"name": NAME, "stopping.max_iterations": 2})
    assert [c.status for c in store.campaigns() if c.name == NAME] == ["finished"]
