"""What ``alforge run`` prints: the quiet console filter, the progress display, silenced warnings,
and a whole tiny run through the CLI (at most ~30 lines, its iteration summaries, epochs stored)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
from rich.console import Console
from rich.theme import Theme

from alforge.monitoring.progress import Progress
from alforge.monitoring.terminal import ProgressDisplay, QuietConsole, silence_third_party_warnings
from conftest import TESTS, tiny_campaign

#: the line budget of a small run's default output (issue 9)
MAX_LINES = 30


def _record(name: str, level: int, msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_quiet_console_keeps_summaries_warnings_and_errors_only():
    keep = QuietConsole().filter
    assert keep(_record("prefect.flow_runs", logging.INFO, "iteration 1: labels 13 done"))
    assert keep(_record("prefect.task_runs", logging.WARNING, "label 7 failed: scf_not_converged"))
    assert keep(_record("prefect.flow_runs", logging.ERROR, "Finished in state Failed('boom')"))
    assert not keep(_record("prefect.task_runs", logging.INFO, "Finished in state Completed()"))
    assert not keep(_record("prefect.task_runs", logging.INFO, "walker 0 (T=500 K): 12 steps"))
    assert not keep(_record("prefect.flow_runs", logging.INFO, "Finished in state Completed()"))
    assert not keep(_record("prefect.flow_runs", logging.INFO, "Beginning subflow run 'x' for flow 'label-batch'"))
    assert not keep(_record("prefect.flow_runs", logging.INFO, "epoch 3/6", alforge_detail=True))
    assert not keep(_record("prefect", logging.INFO, "Starting temporary server on http://127.0.0.1:8799"))


def test_third_party_warnings_are_silenced_and_others_are_not():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_third_party_warnings()
        warnings.warn("The TorchScript type system doesn't support instance-level annotations", UserWarning)
        warnings.warn("`torch.jit.script` is deprecated", DeprecationWarning)
        warnings.warn("a warning of our own", UserWarning)
    assert [str(w.message) for w in seen] == ["a warning of our own"]


def test_progress_display_prints_a_milestone_off_a_tty_and_bars_on_one():
    out = io.StringIO()
    with ProgressDisplay(Console(file=out, force_terminal=False, width=200), live=False):
        with Progress(key="tiny-training", description="training iteration 1", total=3) as p:
            p.advance(3)
    assert out.getvalue().count("\n") == 1 and "training iteration 1: 3/3 done" in out.getvalue()

    tty = io.StringIO()  # a console like Prefect's: a theme of its own, without rich's bar styles
    display = ProgressDisplay(Console(file=tty, force_terminal=True, width=100, theme=Theme({}, inherit=False)), live=True)
    with display:
        with Progress(key="tiny-labelling", description="labelling iteration 2", total=4) as p:
            p.advance(2)
            assert display._bars  # a bar is up while the step runs
        assert not display._bars and display._progress is None  # gone (transient) once it ended
    assert "labelling iteration 2" in tty.getvalue()


@pytest.mark.slow
def test_small_run_prints_a_few_lines_and_stores_its_epochs(tmp_path):
    """A whole ``alforge run`` as a user starts it: no TTY, default settings. Its epochs are read
    back through ``alforge status --json``."""
    config = tiny_campaign(tmp_path, mlip={"max_epochs": 4, "finetune_epochs": 2})
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cli = [sys.executable, "-m", "alforge.cli"]
    run = subprocess.run([*cli, "run", str(config)], env=env, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    lines = output.splitlines()
    assert len(lines) <= MAX_LINES, output
    for expected in ("iteration 1:", "iteration 2:", "campaign 'tiny' finished", "training iteration 1: 4/4 done"):
        assert any(expected in line for line in lines), f"{expected!r} missing from:\n{output}"
    for noise in ("Finished in state", "TorchScript", "Beginning flow run", "epoch 1/4"):
        assert noise not in output, output

    status = subprocess.run(
        [*cli, "status", "--json", "--config", str(config)], env=env, capture_output=True, text=True, timeout=300
    )
    assert status.returncode == 0, status.stderr
    (campaign,) = json.loads(status.stdout)
    curve = campaign["learning_curve"]
    assert [len(p["training_epochs"]) for p in curve] == [4, 2]  # from scratch, then a finetune
    for point in curve:
        epochs = point["training_epochs"]
        assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
        assert all(e["train_loss"] > 0 and e["valid_forces_rmse"] > 0 and e["seconds"] >= 0 for e in epochs)
