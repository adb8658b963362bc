"""External codes die with the campaign (issue 8, "Process lifetime").

A real ``alforge run`` labels with the ``external`` adapter around a small script that, while a hang
flag file exists, writes its own pid and that of a child it spawned (an MPI rank, so to speak) and
sleeps. Once it runs, the campaign is killed (SIGKILL of its process group) or stopped (SIGTERM or
SIGINT to its pid alone); afterwards neither pid may be alive, a stop must exit with the documented
status, and a resume without the flag labels every structure exactly once. Limits are generous and
nothing is timed: Prefect's ephemeral API can take long to start on a loaded machine.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alforge.lifetime import CampaignInterrupted, supervised
from alforge.structure_hash import canonical_hash
from conftest import TESTS, tiny_campaign

CODE = """\
import os, subprocess, sys, time
from pathlib import Path
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from alforge.structure_hash import canonical_hash

here = Path(sys.argv[3])
atoms = read(sys.argv[1])
if (here / "hang").exists():
    rank = subprocess.Popen(["sleep", "600"])
    (here / "pids.tmp").write_text(f"{os.getpid()} {rank.pid}\\n")
    (here / "pids.tmp").replace(here / "pids")
    time.sleep(600)
atoms.calc = EMT()
res = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
atoms.calc = SinglePointCalculator(atoms, **res)
write(sys.argv[2], atoms, format="extxyz")
with open(here / "calls.log", "a") as log:
    log.write(canonical_hash(read(sys.argv[1])) + "\\n")
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has stopped computing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], limit: float = 60.0) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _campaign(tmp_path: Path) -> Path:
    code = tmp_path / "code.py"
    code.write_text(CODE)
    return tiny_campaign(
        tmp_path,
        seeds=[{"generate": {"element": "Cu", "a": 3.61, "count": 3, "rattle": 0.05, "seed": 1}}],
        test=[{"generate": {"element": "Cu", "a": 3.61, "count": 1, "rattle": 0.1, "seed": 2}}],
        labeller={"name": "external", "kwargs": {
            "command": [sys.executable, str(code), "{input}", "{output}", str(tmp_path)],
            "input_file": "in.xyz", "input_format": "extxyz",
            "output_file": "out.xyz", "output_format": "extxyz",
        }},
        stopping={"max_iterations": 1},
    )


def _labelled(path: Path) -> tuple[list[str], list[str]]:
    """(canonical hashes of the seed and test structures, their labels' statuses)."""
    from alforge.config import load_config
    from alforge.storage import Store

    cfg = load_config(path)
    store = Store(str(cfg.store))
    cid = store.campaign_id(cfg.name)
    ids = store.structure_ids(cid, role="seed") + store.structure_ids(cid, role="test")
    return sorted(canonical_hash(a) for a in store.get_atoms(ids)), [label.status for label in store.labels(ids)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_no_code_survives_the_campaign(tmp_path: Path, sig: signal.Signals) -> None:
    path = _campaign(tmp_path)
    (tmp_path / "hang").touch()
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "alforge.cli", "run", str(path)]
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "pids").exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the code never started"
            time.sleep(0.2)
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert all(_alive(p) for p in pids)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)  # the campaign and its Prefect server; the code has its own session
        else:
            os.kill(proc.pid, sig)  # the campaign process alone, as a scheduler or Ctrl-C would
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert not _wait_gone(pids), f"the code outlived the campaign ({sig.name})"
    if sig == signal.SIGKILL:
        assert status == -signal.SIGKILL
    else:
        assert status == 128 + sig, output[-3000:]
        assert f"interrupted by {sig.name}" in output
        assert "running" not in _labelled(path)[1], "a stopped campaign puts its running labels back"

    (tmp_path / "hang").unlink()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    calls = sorted((tmp_path / "calls.log").read_text().split())
    assert calls == _labelled(path)[0], "the resume labels every structure exactly once"


def test_supervisor_kills_the_group_when_its_parent_dies(tmp_path: Path) -> None:
    """The supervisor alone (no campaign): a parent that dies by SIGKILL takes the code group down."""
    pids = tmp_path / "pids"
    script = (
        "import subprocess, sys, time\n"
        "from alforge.lifetime import supervised\n"
        f"subprocess.Popen(supervised(['sh', '-c', 'sleep 600 & echo $$ $! > {pids}; wait']), start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not pids.exists() or len(pids.read_text().split()) < 2:
        assert time.monotonic() < deadline and parent.poll() is None, "the code never started"
        time.sleep(0.1)
    code = [int(p) for p in pids.read_text().split()]
    parent.kill()
    parent.wait()
    assert not _wait_gone(code), "the code outlived its parent"


def test_exit_status_and_argv() -> None:
    assert CampaignInterrupted(signal.SIGTERM).code == 143
    assert CampaignInterrupted(signal.SIGINT).code == 130
    assert isinstance(CampaignInterrupted(signal.SIGINT), SystemExit)
    wrapped = supervised(["/bin/true", "x"])
    assert wrapped[0] == sys.executable and wrapped[-2:] == ["/bin/true", "x"]
    assert subprocess.run(wrapped).returncode == 0
    assert subprocess.run(supervised(["sh", "-c", "exit 7"])).returncode == 7
    assert subprocess.run(supervised(["sh", "-c", "kill -9 $$"])).returncode == -signal.SIGKILL


def test_stop_kills_codes_of_labelling_threads_and_refuses_new_ones(tmp_path: Path) -> None:
    """In one process (a subprocess here, as a stop is final): SIGTERM kills a code a worker thread
    waits for, the thread gets CampaignInterrupted rather than an exit status, the main thread gets
    it too, and no code starts afterwards."""
    script = f"""
import os, signal, sys, threading, time
from pathlib import Path
from alforge import lifetime
from alforge.labelling.runner import run_process

d = Path({str(tmp_path)!r})
lifetime.handle_termination()
seen = []
def label():
    try:
        run_process(["sh", "-c", "echo $$ > pid; exec sleep 600"], d, d / "out", d / "err")
    except lifetime.CampaignInterrupted as exc:
        seen.append(exc.code)
worker = threading.Thread(target=label)
worker.start()
while not (d / "pid").exists() or not (d / "pid").read_text().strip():
    time.sleep(0.05)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
except lifetime.CampaignInterrupted as exc:
    seen.append(exc.code)
worker.join(60)
try:
    run_process(["true"], d, d / "out", d / "err")
except lifetime.CampaignInterrupted:
    seen.append("refused")
print(seen, (d / "pid").read_text().strip())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen, pid = out.stdout.rsplit(" ", 1)
    assert ast.literal_eval(seen) == [143, 143, "refused"]  # the worker's, the main thread's, the refusal
    assert not _wait_gone([int(pid)]), "the code outlived the stop"
