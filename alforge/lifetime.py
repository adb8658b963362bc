"""Process lifetime: every external code a campaign starts dies with the campaign.

Three mechanisms, each covering what the others cannot:

* **A supervisor per code** (:func:`supervised`). A code is not started directly but through a tiny
  ``python -I -S -c`` supervisor that leads the code's process group (its own session, so a timeout
  still kills the code and everything it spawned with one ``killpg``). The supervisor polls its
  parent pid; when the campaign process is gone — even after ``kill -9``, which no handler sees — it
  SIGKILLs the whole group, so ``mpirun`` *and* its ``pw.x`` ranks die. ``PR_SET_PDEATHSIG`` alone
  would not do: it fires when the *thread* that forked the child exits (labels run on a thread pool
  whose threads come and go), and it reaches only the direct child, never the ranks ``mpirun``
  started. Polling ``getppid`` needs no file descriptor to be inherited, so it also works for codes
  that a library (ASE's CP2K shell) starts with its own ``Popen``.
* **A registry** of the supervisors this process started (:func:`tracked`), so that a stop request
  can kill every running code group at once (:func:`stop_all`).
* **Signal handling** (:func:`handle_termination`, installed by ``alforge run`` in the main thread):
  SIGTERM or SIGINT kills every tracked group (from a watcher thread, at once, even while Prefect's
  own SIGTERM handler is installed), then raises :class:`CampaignInterrupted` in the main thread, so the campaign's context managers put running labels back to ``pending`` and release the
  lease while unwinding. Once stopping has begun no new code is started, and a labelling thread whose
  code was killed raises :class:`CampaignInterrupted` instead of reporting a crash (which the retry
  policy would otherwise answer by starting the code again).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

#: How often the supervisor checks that the campaign process is still its parent (seconds).
PARENT_POLL_S = 0.25
#: Grace period between SIGTERM and SIGKILL when a code group is stopped.
KILL_GRACE_S = 2.0
#: Signals that stop a campaign; the exit status is 128 + the signal number (143 and 130).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# argv: parent pid, then the code's argv. Runs with -I -S: the standard library only, no site, no
# PYTHON* variables, so a campaign's environment cannot change what the supervisor does.
_SUPERVISOR = """\
import os, signal, subprocess, sys, threading, time
parent = int(sys.argv[1])
if os.getpgid(0) != os.getpid():
    os.setsid()  # started without a session of its own (by a library's Popen): lead the group
signal.signal(signal.SIGTERM, lambda *_: None)  # a group-wide TERM is for the code; leave with it
code = subprocess.Popen(sys.argv[2:])
def watch():
    while os.getppid() == parent:
        time.sleep(%r)
    os.killpg(0, signal.SIGKILL)  # the campaign is gone: the code, its children and this process
threading.Thread(target=watch, daemon=True).start()
rc = code.wait()
if rc < 0:  # die by the code's signal, so the campaign sees what the code saw
    if -rc != signal.SIGKILL:
        signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
""" % PARENT_POLL_S


class CampaignInterrupted(SystemExit):
    """The campaign was stopped by a signal; exit status ``128 + signum`` (SIGTERM 143, SIGINT 130).

    A ``SystemExit`` so that ``except Exception`` in labellers and the retry policy lets it through,
    and so that an uncaught one still exits with the documented status.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"campaign interrupted by {signal.Signals(self.signum).name}"


_lock = threading.RLock()  # re-entrant: the handler may run in the main thread while it holds it
_running: set[subprocess.Popen[Any]] = set()
_stop_signal: int | None = None
_watcher: threading.Thread | None = None  # reads the signal wakeup fd (handle_termination)


def supervised(argv: list[str]) -> list[str]:
    """``argv`` wrapped in the supervisor: the code dies when this process does (module docstring).

    The result's first element is this interpreter; ``argv[0]`` must already be a resolvable path.
    """
    return [sys.executable, "-I", "-S", "-c", _SUPERVISOR, str(os.getpid()), *argv]


def check_running() -> None:
    """Raise :class:`CampaignInterrupted` once a stop has begun (in any thread)."""
    if _stop_signal is not None:
        raise CampaignInterrupted(_stop_signal)


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Hold the registry while a code is started, so a stop cannot miss it; refuse after a stop.

    Use as ``with spawning(): proc = Popen(...); track(proc)``.
    """
    with _lock:
        check_running()
        yield


def track(proc: subprocess.Popen[Any]) -> None:
    """Register a started supervisor (the leader of its code's group) until :func:`untrack`."""
    with _lock:
        _running.add(proc)


def untrack(proc: subprocess.Popen[Any]) -> None:
    with _lock:
        _running.discard(proc)


def _has_exited(pid: int) -> bool:
    """True once child ``pid`` has exited; left unreaped so its pid (= group id) is not reused."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def kill_groups(procs: list[subprocess.Popen[Any]], grace: float = KILL_GRACE_S) -> None:
    """Stop each group led by a child in ``procs``: SIGTERM (MPI launchers forward it to their
    ranks), SIGKILL for leaders still alive after ``grace`` seconds, then SIGKILL to whatever is
    left in the groups while the unreaped leaders still pin the group ids; finally reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if not _has_exited(p.pid)]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [p for p in alive if not _has_exited(p.pid)]
        if not alive:
            break
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_all(signum: int) -> None:
    """Refuse new codes from now on and kill every tracked code group."""
    global _stop_signal
    with _lock:
        if _stop_signal is None:
            _stop_signal = signum
        procs = list(_running)
    kill_groups(procs)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # While the groups are killed, a repeated Ctrl-C must not abort the kill half-way; afterwards a
    # second signal gets the default behaviour (KeyboardInterrupt, or death by SIGTERM) so a stuck
    # shutdown can still be forced. The supervisors take the codes down in either case.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    stop_all(signum)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise CampaignInterrupted(signum)


def _watch_wakeups(fd: int) -> None:
    while True:
        for signum in os.read(fd, 64):
            if signum in STOP_SIGNALS:
                stop_all(signum)


def handle_termination() -> None:
    """Install the SIGTERM/SIGINT handling of a campaign run (main thread only).

    Prefect swaps in its own SIGTERM handler while a flow runs: it raises ``TerminationSignal`` in
    the main thread, and its task runner then waits for the labelling threads before it re-delivers
    the signal to the handler it found (this one). Those threads wait for their codes, so the codes
    must die first and independently of which Python handler is installed: the C-level handler
    writes every signal number to the wakeup fd, and a watcher thread reading it kills the groups at
    once. The Python handler then turns the signal into :class:`CampaignInterrupted`.
    """
    global _watcher
    if _watcher is None:  # once per process
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        _watcher = threading.Thread(target=_watch_wakeups, args=(read_end,), name="alforge-stop", daemon=True)
        _watcher.start()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host: it exists (one we may not signal exists too) and
    is not a zombie, which a container's PID 1 may never reap."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no procfs: kill(0) is all we know
