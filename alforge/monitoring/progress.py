"""Progress of a long step (a labelling batch, the epochs of a training run), shown twice: as a
Prefect progress artifact in the UI, and in the CLI's terminal display through listeners.

    with Progress(key=f"{slug(name)}-labelling", description="labelling iteration 2", total=n) as p:
        for ...:
            p.advance(1)

Progress is advisory: an API error while publishing it is logged as a warning and never reaches
the caller, so a flaky Prefect server cannot fail a campaign. Outside any Prefect flow or task run
no artifact is made (the listeners are still told, and none are registered unless the CLI runs).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds between two artifact updates: a bar advanced per label must not flood the API.
MIN_UPDATE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ProgressEvent:
    """What a listener is told: the bar's key and description, how far it is and whether it ended."""

    key: str
    description: str
    done: int
    total: int
    finished: bool

    @property
    def percent(self) -> float:
        """0–100; a bar with nothing to do is complete."""
        if self.total <= 0:
            return 100.0
        return min(100.0, 100.0 * self.done / self.total)


Listener = Callable[[ProgressEvent], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


def add_listener(fn: Listener) -> None:
    """Call ``fn`` on every start, advance and end of any Progress in this process (the CLI's display)."""
    with _listeners_lock:
        if fn not in _listeners:
            _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    """Stop calling ``fn``; a listener that was never added is ignored."""
    with _listeners_lock:
        if fn in _listeners:
            _listeners.remove(fn)


def _notify(event: ProgressEvent) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(event)
        except Exception:  # noqa: BLE001 - a broken display must not stop the work it displays
            logger.warning("progress listener %r failed on %s", fn, event.key, exc_info=True)


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """A progress bar of ``total`` units under a Prefect artifact ``key`` (lowercase letters, digits
    and dashes: see ``alforge.monitoring.slug``). ``advance`` may be called from worker threads: the
    Prefect run context is captured on enter, so updates go to the run that opened the bar."""

    def __init__(self, key: str, description: str, total: int) -> None:
        self.key = key
        self.description = description
        self.total = int(total)
        self.done = 0
        self._lock = threading.Lock()
        self._context: contextvars.Context | None = None
        self._artifact_id: Any = None
        self._last_update = 0.0
        self._published_percent: float | None = None

    def __enter__(self) -> Progress:
        if _in_prefect_run():
            self._context = contextvars.copy_context()
            self._publish(create=True)
        _notify(self._event(finished=False))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        """``n`` more units done; the artifact follows at most every ``MIN_UPDATE_INTERVAL_S``."""
        with self._lock:
            self.done += n
            due = time.monotonic() - self._last_update >= MIN_UPDATE_INTERVAL_S
        if due:
            self._publish(create=False)
        _notify(self._event(finished=False))

    def close(self) -> None:
        """The step ended (or failed): the artifact reaches 100 so the UI shows no stalled bar."""
        with self._lock:
            self.done = max(self.done, self.total)
        self._publish(create=False)
        _notify(self._event(finished=True))
        self._context = None

    @property
    def percent(self) -> float:
        return self._event(finished=False).percent

    def _event(self, finished: bool) -> ProgressEvent:
        return ProgressEvent(self.key, self.description, self.done, self.total, finished)

    def _publish(self, create: bool) -> None:
        """Create or update the artifact inside the captured run context, one call at a time."""
        if self._context is None:
            return
        with self._lock:
            percent = self.percent
            if not create and (self._artifact_id is None or percent == self._published_percent):
                return
            self._last_update = time.monotonic()
            try:
                self._context.run(self._call_api, create, percent)
            except Exception:  # noqa: BLE001 - progress is advisory; the campaign goes on
                logger.warning("could not publish progress artifact %r", self.key, exc_info=True)

    def _call_api(self, create: bool, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if create:
            self._artifact_id = create_progress_artifact(
                percent, key=self.key, description=self.description, _sync=True
            )
        else:
            update_progress_artifact(self._artifact_id, percent, description=self.description, _sync=True)
        self._published_percent = percent
