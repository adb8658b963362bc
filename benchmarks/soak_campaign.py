"""Soak: concurrent campaigns on one store under random SIGKILLs, with a fault-injecting labeller.

Five tiny Cu campaigns (``alforge run`` subprocesses, each in its own process group) share one
store (SQLite beside the work folder by default, ``--store`` for PostgreSQL). Every 20–60 s one
running campaign, picked at random, has its process group SIGKILLed, as a scheduler or a user's
``kill -9`` would; it is restarted at once. A campaign that finishes is followed by a new one in
its slot, so five run all the time. When ``--minutes`` are up, the running ones are killed a last
time and then resumed without kills until they finish (the drain), so that anything still pending
afterwards is lost, not merely late.

The labeller is ``faulty`` (alforge/labelling/faulty.py: crash, hang past its timeout, SCF
non-convergence, NaN, each for a fixed subset of structures) around :func:`logging_emt`: EMT that
takes ``--delay`` seconds and appends ``pid structure-hash`` to its campaign's ``calls.log`` after
every computation. That side channel, not the store, says what work was done, so it is compared
with the store afterwards:

* labels computed twice: extra computations of structures whose label is done (goal 0). One source
  is inherent: a kill between the computation's end and the store's commit (milliseconds here);
  structures whose label failed (the NaN fault computes, then fails) are counted apart, since a
  failed candidate may legitimately get a new round.
* labels lost: labels still pending or running after the drain, done labels without energy or
  forces, seed/test structures without a label, and computations whose result the store never kept.
* orphan processes: processes carrying this soak's token in their environment whose ancestors
  include no live campaign process, seen in two samples 5 s apart (goal 0). They are listed and then
  killed by PID. "kills while an external code ran" says how often a kill could have left one (a
  hang fault's ``sleep`` under the killed run; ``--hang-timeout`` and ``--fault-modulo`` widen that).
* campaign crashes: exits other than by a kill (goal 0), each with its one-line error.
* store integrity: dangling foreign keys, duplicate label rows, more than one done label per
  structure, more than one model per iteration, duplicate attempt numbers, missing model files and,
  if the ``models`` table has a ``sha256`` column, files whose hash differs from their row.

Prefect: one local server is started for all campaigns (``--ephemeral-prefect``: each run its own).
The exit status is 1 when any goal-0 count is not 0.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak_campaign.py                # 20 min, SQLite
    .venv/bin/python benchmarks/soak_campaign.py --minutes 2 --store postgresql+psycopg://u:pw@host/db

The 20-minute soak (2 shared x86_64 cores, the test suite and a study running beside it; load avg
2.47 / 2.67 / 2.90 before, 5.52 / 5.95 / 5.37 at the end; the code of issue 8 at 0e197f1):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak_campaign.py --workdir WORK

    soaked 20.2 min, drained 2.0 min
    campaigns started 46 (46 finished), SIGKILLs 32, restarts 27, crashes 0
    every goal-0 count 0 (labels computed twice, lost, orphans, integrity, model hashes checked)
    540 computations for 490 done labels, 154 labels failed (faults), 92 models
    kills while an external code ran: 6, orphans 0

Earlier, a check of the script rather than the 20-minute soak (2 shared x86_64 cores,
other tests and a study running; load avg 4.46 / 6.76 / 4.92 before, 8.24 / 8.26 / 6.18 at the end;
the code of issue 8 as committed at 8032580 plus helpers' work in progress):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak_campaign.py --minutes 2 --workdir WORK

    soaked 2.2 min, drained 2.8 min
    campaigns started 5 (5 finished), SIGKILLs 8, restarts 3, crashes 0
    every goal-0 count 0 (labels computed twice, lost, orphans, integrity, model hashes checked)
    56 computations for 51 done labels + 5 NaN-fault failures; 19 labels failed; 10 models
    kills while an external code ran: 0, so this short run did not exercise the orphan path

The same on PostgreSQL (Debian's 15, a throwaway server started with tests/conftest.py's helpers),
3 campaigns: 6 SIGKILLs, 3 restarts, 0 crashes, 3 of 3 finished after a 2.1-minute drain; 33
computations for 31 done labels + 2 NaN failures, 11 failed; every goal-0 count 0:

    .venv/bin/python benchmarks/soak_campaign.py --minutes 2 --campaigns 3 --store postgresql+psycopg://...

And one to hit the orphan path (hangs of 30 s on 1 structure in 6, 4 faults in 6, kills every
15-30 s; load avg 3.13 / 4.03 / 4.95): 7 SIGKILLs, 2 of them while a hang fault's code ran, 0
orphans (the supervisor of alforge/lifetime.py took the codes down), every goal-0 count 0:

    .venv/bin/python benchmarks/soak_campaign.py --minutes 2 --campaigns 3 --fault-modulo 6 \
        --hang-timeout 30 --kill-min 15 --kill-max 30

The first 2-minute run (same settings, before ``storage/schema.upgrade`` took a lock around the
migration) had one crash: of five ``alforge run`` creating a new SQLite store at once, one died with
``table campaigns already exists`` (restarted, it finished; every other count as above).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ase.calculators.emt import EMT

HERE = Path(__file__).resolve().parent
TOKEN_VAR = "ALFORGE_SOAK_TOKEN"
FAULTS = ("crash", "hang", "scf", "nan")


def fault_rules(modulo: int) -> list[dict[str, Any]]:
    """4 of every ``modulo`` structures fail, one way each (the structure digest picks them, stably)."""
    return [{"mode": mode, "modulo": modulo, "remainder": k} for k, mode in enumerate(FAULTS)]


# ------------------------------------------------------------------------ the labeller's side channel
class LoggingEMT(EMT):
    """EMT that takes ``delay`` s (so kills land mid-labelling) and logs each finished computation."""

    def __init__(self, delay: float, log: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay
        self.log = log

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):  # type: ignore[no-untyped-def]
        from alforge.structure_hash import canonical_hash

        super().calculate(atoms, properties, system_changes or [])
        time.sleep(self.delay)
        line = f"{os.getpid()} {canonical_hash(self.atoms)}\n".encode()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one short O_APPEND write: lines of concurrent jobs never interleave
        finally:
            os.close(fd)


def logging_emt(delay: float = 0.3, log: str = "calls.log") -> LoggingEMT:
    """``module:factory`` entry point for the campaign files (``soak_campaign:logging_emt``)."""
    return LoggingEMT(delay, log)


# ------------------------------------------------------------------------ campaigns
def write_campaign(folder: Path, name: str, store: str, seed: int, iterations: int, delay: float,
                   hang_timeout: float, fault_modulo: int) -> Path:
    """A tiny Cu campaign (the CI size of tests/conftest.py) labelled by faulty(logging_emt)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": name,
        "seed": seed,
        "store": store,
        "seeds": [{"generate": {"element": "Cu", "a": 3.61, "supercells": [[1, 1, 1], [2, 1, 1]],
                                "count": 6, "rattle": 0.05, "strain": 0.02, "seed": seed + 1}}],
        "test": [{"generate": {"element": "Cu", "a": 3.61, "count": 4, "rattle": 0.1, "seed": seed + 2}}],
        "mlip": {"num_channels": 8, "max_L": 0, "num_interactions": 2, "max_epochs": 6,
                 "finetune_epochs": 3, "mlp_irreps": "8x0e", "batch_size": 4},
        "exploration": {"walkers": 2, "temperatures": [500, 900], "steps": 18, "frame_interval": 3,
                        "min_distance": 1.6},
        "selector": {"name": "mig", "batch_size": 4},
        "labeller": {
            "name": "faulty",
            "kwargs": {"inner": "soak_campaign:logging_emt",
                       "inner_kwargs": {"delay": delay, "log": str(folder / "calls.log")},
                       "rules": fault_rules(fault_modulo), "timeout": hang_timeout, "hang_seconds": 600,
                       "scf_iterations": 50, "scf_iterations_needed": 100},
            "quarantine_after": 2,
            "concurrency": 2,
            "max_failed_fraction": None,
        },
        "stopping": {"max_iterations": iterations},
    }
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Run:
    """One campaign in one slot: its file, its current ``alforge run`` process and what befell it."""

    slot: int
    generation: int
    name: str
    path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    killed: bool = False
    crashes: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def log(self) -> Path:
        return self.path.parent / "calls.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Soak:
    """Starts, kills and restarts the campaigns; samples orphans while it does."""

    def __init__(self, args: argparse.Namespace, store: str, workdir: Path, env: dict[str, str]) -> None:
        self.args = args
        self.store = store
        self.workdir = workdir
        self.env = env
        self.token = env[TOKEN_VAR]
        self.rng = random.Random(args.seed)
        self.runs: list[Run] = []  # every campaign ever started, in order
        self.slots: list[Run] = []
        self.kills = 0
        self.kills_during_code = 0
        self.restarts = 0
        self.orphans: dict[tuple[int, str], str] = {}  # (pid, start time) -> command line
        self._suspects: set[tuple[int, str]] = set()

    def new_run(self, slot: int, generation: int) -> Run:
        name = f"soak-s{slot}-g{generation}"
        path = write_campaign(self.workdir / name, name, self.store, seed=1000 * slot + 10 * generation,
                              iterations=self.args.iterations, delay=self.args.delay,
                              hang_timeout=self.args.hang_timeout, fault_modulo=self.args.fault_modulo)
        run = Run(slot, generation, name, path)
        self.runs.append(run)
        self.start(run)
        return run

    def start(self, run: Run) -> None:
        out = open(run.path.parent / f"run-{run.starts}.out", "wb")  # noqa: SIM115 - the child owns it
        run.proc = subprocess.Popen(
            [sys.executable, "-m", "alforge.cli", "run", str(run.path)], env=self.env, cwd=run.path.parent,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        run.starts += 1
        run.killed = False

    def kill(self, run: Run) -> None:
        """SIGKILL the run's whole process group (it leads its own session).

        Counts the kills that found an external code running under the run (the ``hang`` fault's
        ``sleep``, the only one here): those are the kills that can leave an orphan.
        """
        assert run.proc is not None
        table = process_table()
        self.kills_during_code += any(
            self.ours(p) and Path(p.cmd.split(" ")[0]).name == "sleep" and run.proc.pid in ancestors(table, pid)
            for pid, p in table.items())
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.proc.wait()
        run.killed = True
        self.kills += 1

    def exited(self, run: Run) -> bool:
        """Whether the run's process has ended and not been reaped yet."""
        return run.proc is not None and run.proc.poll() is not None

    def reap(self, run: Run, restart: bool) -> None:
        """Note how a run's process ended; restart it unless it finished or crashed too often."""
        assert run.proc is not None
        rc = run.proc.wait()
        run.proc = None
        if rc == 0:
            run.finished = True
            return
        if not run.killed:
            run.crashes.append(f"exit {rc}: {last_error_line(run.path.parent / f'run-{run.starts - 1}.out')}")
        if restart and len(run.crashes) <= self.args.max_crashes:
            self.start(run)
            self.restarts += 1

    def soak(self, seconds: float) -> None:
        """Keep ``campaigns`` runs going, one SIGKILL every ``kill_min``–``kill_max`` s."""
        self.slots = [self.new_run(i, 0) for i in range(self.args.campaigns)]
        end = time.monotonic() + seconds
        next_kill = time.monotonic() + self.rng.uniform(self.args.kill_min, self.args.kill_max)
        next_sample = time.monotonic()
        while time.monotonic() < end:
            for i, run in enumerate(self.slots):
                if self.exited(run):
                    self.reap(run, restart=True)
                    if not run.running():  # finished, or left after repeated crashes
                        self.slots[i] = self.new_run(i, run.generation + 1)
            if time.monotonic() >= next_kill:
                alive = [r for r in self.slots if r.running()]
                if alive:
                    victim = self.rng.choice(alive)
                    self.kill(victim)
                    self.reap(victim, restart=True)
                next_kill = time.monotonic() + self.rng.uniform(self.args.kill_min, self.args.kill_max)
            if time.monotonic() >= next_sample:
                self.sample_orphans()
                next_sample = time.monotonic() + 5
            time.sleep(0.5)
        for run in self.slots:  # the last fault
            if run.running():
                self.kill(run)
                run.proc = None
        for _ in range(2):
            time.sleep(5)
            self.sample_orphans()

    def drain(self, seconds: float) -> list[Run]:
        """Resume every unfinished campaign without kills until it finishes; those that did not."""
        todo = [r for r in self.runs if not r.finished and len(r.crashes) <= self.args.max_crashes]
        for run in todo:
            self.start(run)
        end = time.monotonic() + seconds
        while time.monotonic() < end and any(r.proc is not None for r in todo):
            for run in todo:
                if self.exited(run):
                    self.reap(run, restart=True)
            self.sample_orphans()
            time.sleep(5)
        for run in todo:  # past the drain's limit
            if run.running():
                self.kill(run)
                run.proc = None
        time.sleep(3)
        self.sample_orphans()
        self.sample_orphans(confirm=False)  # nothing of ours runs now: whatever is left is orphaned
        return [r for r in self.runs if not r.finished]

    def sample_orphans(self, confirm: bool = True) -> None:
        """Record token-carrying processes that no live campaign process is an ancestor of.

        With ``confirm`` a process counts only when seen orphaned twice in a row, so a code that
        is being taken down by its campaign's death (parent-death signal, supervisor) is not one.
        """
        live = {r.proc.pid for r in self.runs if r.running()}
        table = process_table()
        now: set[tuple[int, str]] = set()
        for pid, proc in table.items():
            if not self.ours(proc) or pid in live or ancestors(table, pid) & live:
                continue
            now.add((pid, proc.start))
            if not confirm or (pid, proc.start) in self._suspects:
                self.orphans[(pid, proc.start)] = proc.cmd
        self._suspects = now

    def ours(self, proc: Proc) -> bool:
        """A live process started by one of this soak's campaigns (they all carry its token)."""
        return proc.state != "Z" and f"\n{TOKEN_VAR}={self.token}\n" in proc.environ + "\n"

    def kill_orphans(self) -> None:
        """The orphans found are this soak's descendants (by its token): end them by PID."""
        table = process_table()
        for pid, start in self.orphans:
            if pid in table and table[pid].start == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Proc(NamedTuple):
    ppid: int
    start: str  # clock ticks since boot: with the pid, names one process
    state: str
    cmd: str
    environ: str


def process_table() -> dict[int, Proc]:
    """Every process readable in /proc (Linux), by pid."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            environ = "\n" + (entry / "environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
        except (OSError, ValueError):
            continue  # gone, or not ours to read
        table[int(entry.name)] = Proc(int(fields[1]), fields[19], fields[0], cmd, environ)
    return table


def ancestors(table: dict[int, Proc], pid: int) -> set[int]:
    chain, cur = set(), table[pid].ppid
    while cur in table and cur not in chain:
        chain.add(cur)
        cur = table[cur].ppid
    return chain


def last_error_line(path: Path) -> str:
    """The most telling line of a run's output: the last that names an error, else the last."""
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "(no output)"
    errors = [l for l in lines if "Error" in l or "error:" in l]
    return (errors or lines or ["(no output)"])[-1][:200]


# ------------------------------------------------------------------------ Prefect
def start_prefect_server(home: Path, env: dict[str, str], timeout: float = 300) -> tuple[subprocess.Popen[bytes], str]:
    """One local Prefect server for every campaign (lighter than five ephemeral ones)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": api}
    out = open(home.parent / "prefect-server.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=server_env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=10) as resp:
                if json.loads(resp.read()) is True:
                    return proc, api
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            raise RuntimeError(f"the Prefect server did not come up (see {home.parent / 'prefect-server.out'})")
        time.sleep(1)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process group this script started, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------ the store afterwards
def audit_store(url: str, runs: Sequence[Run]) -> dict[str, Any]:
    """Compare every campaign's labeller log with the store, and check the store's integrity."""
    from sqlalchemy import MetaData, func, select

    from alforge.storage.schema import make_engine

    engine = make_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    st, lb, md, at, cp = t["structures"], t["labels"], t["models"], t["label_attempts"], t["campaigns"]
    out: dict[str, Any] = collections.defaultdict(int)
    with engine.connect() as conn:
        campaign_ids = {name: cid for cid, name in conn.execute(select(cp.c.id, cp.c.name))}
        out["campaign status"] = dict(collections.Counter(
            s for s, in conn.execute(select(cp.c.status).where(cp.c.name.in_([r.name for r in runs])))))
        for run in runs:
            cid = campaign_ids.get(run.name)
            calls = collections.Counter(line.split()[1] for line in _lines(run.log))
            out["computations"] += sum(calls.values())
            if cid is None:
                out["computations of campaigns never stored"] += sum(calls.values())
                continue
            rows = conn.execute(
                select(st.c.id, st.c.hash, st.c.role, lb.c.status, lb.c.failure_class,
                       lb.c.energy.is_(None), lb.c.forces.is_(None))
                .select_from(st.outerjoin(lb, lb.c.structure_id == st.c.id))
                .where(st.c.campaign_id == cid)
            ).all()
            by_hash: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
            for row in rows:
                by_hash[row[1]].append(row)
            for sid, h, role, status, failure, no_energy, no_forces in rows:
                if status is None and role in ("seed", "test"):
                    out["seed/test structures without a label"] += 1
                if status in ("pending", "running"):
                    out["labels pending or running after the drain"] += 1
                if status == "done" and (no_energy or no_forces):
                    out["done labels without energy or forces"] += 1
                if status is not None:
                    out[f"labels {status}"] += 1
            for h, n in calls.items():
                statuses = {r[3] for r in by_hash.get(h, [])}
                failures = {r[4] for r in by_hash.get(h, [])}
                if h not in by_hash:
                    out["computations of structures not in the store"] += n
                elif "done" in statuses:
                    out["extra computations of done labels"] += n - 1
                    out["done labels computed twice or more"] += n > 1
                elif "non_finite" in failures:
                    out["extra computations of failed labels"] += n - 1
                else:
                    out["computations whose result was not kept"] += n
        # integrity, over the whole store
        for table in meta.sorted_tables:
            for fk in table.foreign_keys:
                referred = fk.column.table.alias()  # an alias: structures.parent_id refers to its own table
                child, parent = fk.parent, referred.c[fk.column.name]
                dangling = conn.scalar(
                    select(func.count()).select_from(table.outerjoin(referred, child == parent))
                    .where(child.is_not(None), parent.is_(None)))
                out["dangling foreign keys"] += dangling or 0
        out["duplicate label rows"] = conn.scalar(select(func.count()).select_from(
            select(lb.c.structure_id).group_by(lb.c.structure_id, lb.c.calculator, lb.c.params_hash)
            .having(func.count() > 1).subquery())) or 0
        out["structures with more than one done label"] = conn.scalar(select(func.count()).select_from(
            select(lb.c.structure_id).where(lb.c.status == "done").group_by(lb.c.structure_id)
            .having(func.count() > 1).subquery())) or 0
        out["iterations with more than one model"] = conn.scalar(select(func.count()).select_from(
            select(md.c.iteration_id).group_by(md.c.iteration_id).having(func.count() > 1).subquery())) or 0
        out["duplicate attempt numbers"] = conn.scalar(select(func.count()).select_from(
            select(at.c.label_id).group_by(at.c.label_id, at.c.attempt).having(func.count() > 1).subquery())) or 0
        hash_col = next((c for c in md.c if "sha256" in c.name), None)
        out["model hashes checked"] = "yes" if hash_col is not None else "no (models has no sha256 column)"
        cols = [md.c.path] + ([hash_col] if hash_col is not None else [])
        for path, *digest in conn.execute(select(*cols)):
            out["models"] += 1
            if not Path(path).is_file():
                out["model files missing"] += 1
            elif digest and digest[0] and _sha256(Path(path)) != digest[0]:
                out["model files whose hash differs from their row"] += 1
    engine.dispose()
    return dict(out)


def _lines(path: Path) -> Iterable[str]:
    return path.read_text().splitlines() if path.exists() else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


GOALS = (  # the counts that must be 0
    "extra computations of done labels",
    "labels pending or running after the drain",
    "done labels without energy or forces",
    "seed/test structures without a label",
    "computations whose result was not kept",
    "computations of structures not in the store",
    "orphan processes",
    "dangling foreign keys",
    "duplicate label rows",
    "structures with more than one done label",
    "iterations with more than one model",
    "duplicate attempt numbers",
    "model files missing",
    "model files whose hash differs from their row",
    "campaigns unfinished after the drain",
    "campaign crashes (exits other than by a kill)",
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20, help="how long the kills go on")
    p.add_argument("--campaigns", type=int, default=5, help="campaigns running at once")
    p.add_argument("--store", help="SQLAlchemy URL of the shared store (default: SQLite in the work folder)")
    p.add_argument("--workdir", type=Path, help="where campaigns, logs and the store go (default: a new temp dir)")
    p.add_argument("--kill-min", type=float, default=20, help="shortest gap between two SIGKILLs (s)")
    p.add_argument("--kill-max", type=float, default=60, help="longest gap between two SIGKILLs (s)")
    p.add_argument("--iterations", type=int, default=2, help="max_iterations of each campaign")
    p.add_argument("--delay", type=float, default=0.3, help="seconds each EMT label takes")
    p.add_argument("--fault-modulo", type=int, default=12, help="4 of every N structures get a fault")
    p.add_argument("--hang-timeout", type=float, default=8,
                   help="time limit of the hang fault (s): the window in which a kill can orphan a code")
    p.add_argument("--drain-minutes", type=float, default=30, help="limit for resuming the killed campaigns")
    p.add_argument("--max-crashes", type=int, default=3, help="crashes (not kills) after which a campaign is left")
    p.add_argument("--ephemeral-prefect", action="store_true", help="each run starts its own Prefect API")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill schedule")
    args = p.parse_args(argv)
    if args.fault_modulo <= len(FAULTS):
        p.error(f"--fault-modulo must exceed {len(FAULTS)}: some structures must label cleanly")

    from sqlalchemy.engine import make_url

    from _machine import machine_report, table

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="alforge-soak-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or f"sqlite:///{workdir / 'soak.db'}"
    shown_store = make_url(store).render_as_string(hide_password=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", TOKEN_VAR: secrets.token_hex(8),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    print(machine_report())
    print(f"soak: {args.campaigns} campaigns, {args.minutes:g} min, SIGKILL every {args.kill_min:g}-"
          f"{args.kill_max:g} s, store {shown_store}, work folder {workdir}", flush=True)
    load_before = os.getloadavg()
    server = None
    if not args.ephemeral_prefect:
        (workdir / "prefect").mkdir(exist_ok=True)
        server, api = start_prefect_server(workdir / "prefect", {k: v for k, v in env.items() if k != TOKEN_VAR})
        env["PREFECT_API_URL"] = api
    soak = Soak(args, store, workdir, env)
    started = time.monotonic()
    try:
        soak.soak(args.minutes * 60)
        soaked = time.monotonic() - started
        unfinished = soak.drain(args.drain_minutes * 60)
        drained = time.monotonic() - started - soaked
    finally:  # also on Ctrl-C: nothing this script started outlives it
        for run in soak.runs:
            if run.running():
                soak.kill(run)
        if server is not None:
            stop_group(server)
    load_during = os.getloadavg()
    report = audit_store(store, soak.runs)
    report["orphan processes"] = len(soak.orphans)
    report["campaigns unfinished after the drain"] = len(unfinished)
    report["campaign crashes (exits other than by a kill)"] = sum(len(r.crashes) for r in soak.runs)
    report["kills while an external code ran"] = soak.kills_during_code
    soak.kill_orphans()

    crashes = [(r.name, c) for r in soak.runs for c in r.crashes]
    print(f"\nsoaked {soaked / 60:.1f} min, drained {drained / 60:.1f} min; load avg before "
          f"{', '.join(f'{x:.2f}' for x in load_before)}, at the end {', '.join(f'{x:.2f}' for x in load_during)}")
    print(f"campaigns started {len(soak.runs)} ({sum(r.finished for r in soak.runs)} finished), "
          f"SIGKILLs {soak.kills}, restarts {soak.restarts}, crashes {len(crashes)}")
    for name, line in crashes:
        print(f"  crash {name}: {line}")
    for (pid, _), cmd in sorted(soak.orphans.items()):
        print(f"  orphan pid {pid}: {cmd[:160]}")
    rows = [(k, report.get(k, 0), 0) for k in GOALS]
    info = sorted((k, v) for k, v in report.items() if k not in GOALS)
    print(table(("check", "count", "goal"), rows))
    print(table(("also", "value"), info))
    bad = [k for k in GOALS if report.get(k, 0)]
    print("goals met" if not bad else f"goals missed: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
