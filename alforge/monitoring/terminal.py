"""What ``alforge run`` shows on the terminal: the step and iteration summaries, warnings and
errors, and a compact progress display; everything else (Prefect's per-task chatter, per-epoch
lines, third-party warnings) stays in the Prefect API and UI, and ``--verbose`` brings it back.

A small run printed ~350 lines before this (most of them TorchScript warnings from e3nn and
"Finished in state Completed()"), so the lines that matter were lost.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from datetime import datetime
from types import TracebackType

from rich.default_styles import DEFAULT_STYLES
from rich.theme import Theme

from alforge.monitoring.progress import ProgressEvent, add_listener, remove_listener

#: rich's own styles for progress bars (a Console with a theme of its own lacks them)
_BAR_STYLES = {k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}

#: Third-party warnings a user can do nothing about (the same ones pyproject.toml filters in tests):
#: e3nn and mace still use TorchScript and unpickle constants with weights_only off.
THIRD_PARTY_WARNINGS = (
    ("`torch.jit", DeprecationWarning),
    ("The TorchScript type system", UserWarning),
    ("Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", UserWarning),
)

#: Prefect's own bookkeeping lines of a flow run (task runs' INFO lines are all hidden).
_ENGINE_CHATTER = re.compile(
    r"^(Beginning (sub)?flow run|Finished in state Completed|Created (task|subflow) run|Executing )"
)


def silence_third_party_warnings() -> None:
    """Ignore :data:`THIRD_PARTY_WARNINGS` in this process; called before e3nn is first imported
    (the campaign file's irreps check imports it)."""
    for message, category in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


class QuietConsole(logging.Filter):
    """The default console: warnings and errors, and the campaign's own INFO lines from its flow
    runs (one per step and iteration). Dropped: INFO from task runs, Prefect's engine lines
    ("Beginning flow run", "Finished in state Completed()", ...), the temporary server's start and
    stop notes, and any record marked :data:`~alforge.monitoring.DETAIL`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if getattr(record, "alforge_detail", False):
            return False
        if not record.name.startswith("prefect.flow_runs"):
            return False
        return _ENGINE_CHATTER.match(record.getMessage()) is None


class ProgressDisplay:
    """A :mod:`~alforge.monitoring.progress` listener for the terminal. On a TTY: rich progress
    bars, transient (gone when their step ends, the step's summary line stays). Otherwise (a log
    file, CI): one plain line when a bar ends. ``console`` is the rich Console the log lines go
    through (Prefect's console handler's), so bars and log lines do not overwrite each other."""

    def __init__(self, console: object | None = None, live: bool | None = None) -> None:
        from rich.console import Console

        self.console: Console = console if console is not None else Console(stderr=True)  # type: ignore[assignment]
        self.live = self.console.is_terminal if live is None else live
        self._lock = threading.Lock()
        self._bars: dict[tuple[str, str], int] = {}
        self._progress = None

    def __enter__(self) -> ProgressDisplay:
        add_listener(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        remove_listener(self)
        with self._lock:
            if self._progress is not None:
                self._stop()
            self._bars.clear()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            if self.live:
                self._show_bar(event)
            elif event.finished:
                stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]  # as Prefect's console lines
                self.console.print(
                    f"{stamp} | INFO    | {event.description}: {event.done}/{event.total} done",
                    soft_wrap=True, markup=False, highlight=False,
                )

    def _show_bar(self, event: ProgressEvent) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._progress is None:
            # Prefect's console has a theme of its own only (inherit=False): lend it rich's bar styles.
            self.console.push_theme(Theme(_BAR_STYLES))
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.console, transient=True,
            )
            self._progress.start()
        bar = (event.key, event.description)
        if bar not in self._bars:
            self._bars[bar] = self._progress.add_task(event.description, total=event.total)
        task = self._bars[bar]
        if event.finished:
            self._progress.remove_task(task)
            del self._bars[bar]
            if not self._bars:
                self._stop()
        else:
            self._progress.update(task, completed=event.done, total=event.total)

    def _stop(self) -> None:
        self._progress.stop()
        self._progress = None
        self.console.pop_theme()


def console_of(handlers: list[logging.Handler]) -> object | None:
    """The rich Console of Prefect's console handler among ``handlers`` (None if there is none)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in handlers:
        if isinstance(handler, PrefectConsoleHandler):
            return handler.console
    return None
