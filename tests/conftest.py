"""Shared fixtures: an isolated Prefect home, a tiny campaign file, Prefect's test harness and a
throwaway PostgreSQL server."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

# Before anything imports Prefect: keep its database and settings out of the user's home.
# One home per pytest-xdist worker (``-n 2``), so two workers never share Prefect's files; the
# workers inherit the controller's PREFECT_HOME, hence the suffix rather than ``setdefault``.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect-test"))
if _worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = f"{os.environ['PREFECT_HOME'].rstrip('/')}-{_worker}"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Tiny models on 2 cores: one intra-op thread is faster than two (thread overhead dominates, and
# two threads collapse when anything else runs), and it keeps tests deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent


def tiny_campaign(tmp_path: Path, **overrides) -> Path:
    """Write a campaign file sized for CI: 4-atom Cu cells, an 8-channel MACE, a few MD steps."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "seeds": [{"generate": {"element": "Cu", "a": 3.61, "supercells": [[1, 1, 1], [2, 1, 1]],
                                "count": 6, "rattle": 0.05, "strain": 0.02, "seed": 1}}],
        "test": [{"generate": {"element": "Cu", "a": 3.61, "count": 4, "rattle": 0.1, "seed": 2}}],
        "mlip": {"num_channels": 8, "max_L": 0, "num_interactions": 2, "max_epochs": 6,
                 "finetune_epochs": 3, "mlp_irreps": "8x0e", "batch_size": 4},
        "exploration": {"walkers": 2, "temperatures": [500, 900], "steps": 12, "frame_interval": 3,
                        "min_distance": 1.6},
        "selector": {"name": "mig", "batch_size": 3},
        "labeller": {"name": "emt"},
        "stopping": {"max_iterations": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ------------------------------------------------------------------------------------ PostgreSQL
# A throwaway server from Debian's `postgresql` package (deploy/install.sh --dft installs it), so
# the store is tested on the database a cluster would use, not only SQLite.


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL server on loopback: password login over TCP (scram-sha-256)."""

    process: subprocess.Popen
    port: int
    user: str
    password: str
    root: Path  # data directory, unix socket and log live under it
    _databases: int = 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database on this server; its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = f"{prefix}_{self._databases}"
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _conninfo(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} password={self.password} dbname={database}"


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (`/usr/lib/postgresql/<ver>/bin`), or one on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()])
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _server_user() -> str | None:
    """Who runs the server: initdb and postgres refuse root, so as root the `postgres` account
    (created by Debian's package) or `nobody`; otherwise the current user (None: no switch)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unavailable(reason: str) -> None:
    """Skip on a developer machine without PostgreSQL; fail in CI, which must have it."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}")
    pytest.skip(f"PostgreSQL tests need a local server: {reason}")


def _start_postgres(bindir: Path, user: str | None, startup_timeout: float = 180.0) -> PostgresServer:
    import psycopg

    # Not under pytest's tmp dir: that is private to the current user, and the server may run as
    # another one (the `postgres` account when the tests run as root).
    root = Path(tempfile.mkdtemp(prefix="alforge-pg-"))
    password = secrets.token_hex(12)
    (root / "pwfile").write_text(password + "\n")
    (root / "socket").mkdir()
    if user is not None:
        for path in (root, root / "pwfile", root / "socket"):
            shutil.chown(path, user=user)
    run_as: dict[str, Any] = {}
    if user is not None:  # its own group too, and none of root's supplementary groups
        run_as = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
    db_user = "alforge"
    initdb = subprocess.run(
        [str(bindir / "initdb"), "-D", str(root / "data"), "-U", db_user, f"--pwfile={root / 'pwfile'}",
         "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
        capture_output=True, text=True, timeout=startup_timeout, **run_as,
    )
    if initdb.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({initdb.returncode}): {initdb.stderr[-2000:]}")
    (root / "pwfile").unlink()
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server writes to it until it stops
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root / "socket"),
         "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
         # a test server: durability is not the point, speed on a loaded machine is
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **run_as,
    )
    log.close()
    server = PostgresServer(proc, port, db_user, password, root)
    conninfo = server._conninfo("postgres")
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            text = (root / "server.log").read_text()[-2000:]
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"postgres exited with {proc.returncode} at start-up:\n{text}")
        try:
            psycopg.connect(conninfo, connect_timeout=5).close()
            return server
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                _stop_postgres(server)
                raise RuntimeError(f"postgres did not accept connections within {startup_timeout:g} s") from None
            time.sleep(0.2)


def _stop_postgres(server: PostgresServer) -> None:
    """Fast shutdown (SIGINT) of the server we started, by its PID; SIGKILL if it lingers."""
    proc = server.process
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session, stopped at its end."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install -e '.[test,postgres]')")
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (install Debian's postgresql: deploy/install.sh --dft)")
    user = _server_user()
    if os.geteuid() == 0 and user is None:
        _unavailable("running as root and no non-root account (postgres, nobody) to run the server as")
    server = _start_postgres(bindir, user)
    try:
        yield server
    finally:
        _stop_postgres(server)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``, with a password) of one database for the session."""
    return postgres_server.create_database("session")


@pytest.fixture()
def postgres_db_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of a new, empty database on the session's server: one per test."""
    return postgres_server.create_database("test")
