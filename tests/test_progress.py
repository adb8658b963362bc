"""Progress: artifact keys, listeners, the no-op path outside Prefect, and a real progress artifact."""

from __future__ import annotations

import pytest

from alforge.monitoring import slug
from alforge.monitoring import progress as progress_mod
from alforge.monitoring.progress import Progress, ProgressEvent, add_listener, remove_listener


def test_slug_makes_prefect_artifact_keys():
    assert slug("Cu EMT_run#2") == "cu-emt-run-2"
    assert slug("--tiny--") == "tiny"
    with pytest.raises(ValueError, match="'__'"):
        slug("__")


def test_listeners_see_start_advances_and_a_finished_bar_outside_prefect():
    events: list[ProgressEvent] = []
    add_listener(events.append)
    add_listener(events.append)  # once only
    try:
        with Progress(key="tiny-labelling", description="labelling iteration 1", total=4) as p:
            p.advance()
            p.advance(2)
            assert (p.done, p.percent) == (3, 75.0)
    finally:
        remove_listener(events.append)
    assert [(e.done, e.finished) for e in events] == [(0, False), (1, False), (3, False), (4, True)]
    assert events[-1].percent == 100.0 and events[-1].description == "labelling iteration 1"
    with Progress(key="tiny-labelling", description="after removal", total=1) as p:
        p.advance()
    assert len(events) == 4


def test_a_failing_listener_or_empty_bar_does_not_reach_the_caller(caplog):
    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("display gone")

    add_listener(broken)
    try:
        with Progress(key="tiny-training", description="nothing to do", total=0) as p:
            assert p.percent == 100.0
    finally:
        remove_listener(broken)
    assert "progress listener" in caplog.text


def test_progress_artifact_reaches_100_inside_a_flow(prefect_harness, monkeypatch):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    monkeypatch.setattr(progress_mod, "MIN_UPDATE_INTERVAL_S", 3600.0)  # only the close may update

    @task
    def work() -> None:
        with Progress(key="tiny-progress-test", description="three steps", total=3) as p:
            p.advance()
            p.advance()  # stopped short of total: close still reports 100

    @flow
    def watched() -> None:
        work()

    watched()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-progress-test"])))
    assert len(artifacts) == 1
    assert artifacts[0].type == "progress" and float(artifacts[0].data) == 100.0
    assert artifacts[0].task_run_id is not None
