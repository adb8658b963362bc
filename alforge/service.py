"""A local Prefect server, campaign deployments and workers: thin wrappers over Prefect's own
commands and API, so scheduling and the UI stay Prefect's (``alforge server|deploy|worker``).

The server is ``prefect server start`` on loopback in a process group of its own, with its own
``PREFECT_HOME`` (SQLite database, logs) under a state directory, analytics off and
``PREFECT_UI_API_URL`` matching its port (the UI cannot reach its API on a non-default port
otherwise). A PID file and ``server.json`` there let ``stop`` and ``status`` find it again from
another shell. ``deploy`` and ``worker`` talk to ``PREFECT_API_URL`` when it is set, else to the
server this module started.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alforge.lifetime import pid_alive

DEFAULT_PORT = 4200
DEFAULT_POOL = "alforge"
#: The deployable campaign flow (contract C1), as a module path: it needs no copy of the source,
#: only alforge installed where the worker runs.
FLOW_ENTRYPOINT = "alforge.flows.campaign.campaign_flow"
#: Seconds to wait for a new server's /api/health; Prefect migrates its database first, slow on a loaded node.
STARTUP_TIMEOUT_S = 600.0


class ServiceError(RuntimeError):
    """A server, deployment or worker request that cannot be done; the message says why."""


def state_dir(path: str | Path | None = None) -> Path:
    """Where the server keeps its PID file, log and Prefect home: ``path``, else
    ``$ALFORGE_HOME/prefect``, else ``~/.alforge/prefect``."""
    if path:
        return Path(path).expanduser().resolve()
    home = os.environ.get("ALFORGE_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".alforge").resolve() / "prefect"


@dataclass(frozen=True)
class ServerStatus:
    """What the state directory says about a server and whether it answers."""

    state: Path
    pid: int | None
    port: int | None
    running: bool  # the recorded process is alive
    healthy: bool  # its /api/health answered true

    @property
    def api_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}/api" if self.port else None

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None


def _pid_file(state: Path) -> Path:
    return state / "server.pid"


def _info_file(state: Path) -> Path:
    return state / "server.json"


def _is_our_server(pid: int) -> bool:
    """The PID still names the server we started (a reused PID is left alone): it leads its own
    process group and, where procfs exists, runs ``prefect server start``."""
    try:
        if os.getpgid(pid) != pid:
            return False
    except ProcessLookupError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True
    args = cmdline.read_bytes().split(b"\0")
    return b"prefect" in b" ".join(args) and b"server" in args


def health(api_url: str, timeout: float = 5.0) -> bool:
    """Whether Prefect's API at ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return json.loads(resp.read()) is True
    except (OSError, ValueError):  # URLError is an OSError
        return False


def server_status(state: Path) -> ServerStatus:
    """Read the PID file and ``server.json`` and ask the server's health endpoint."""
    info: dict[str, Any] = {}
    if _info_file(state).exists():
        try:
            info = json.loads(_info_file(state).read_text())
        except ValueError as exc:
            raise ServiceError(f"{_info_file(state)}: not JSON ({exc}); remove it if no server runs") from exc
    pid = None
    if _pid_file(state).exists():
        text = _pid_file(state).read_text().strip()
        if not text.isdigit():
            raise ServiceError(f"{_pid_file(state)}: expected a process id, found {text[:40]!r}")
        pid = int(text)
    running = pid is not None and pid_alive(pid) and _is_our_server(pid)
    port = info.get("port")
    healthy = running and port is not None and health(f"http://127.0.0.1:{port}/api")
    return ServerStatus(state, pid, port, running, healthy)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def start_server(state: Path, port: int = DEFAULT_PORT, timeout: float = STARTUP_TIMEOUT_S) -> ServerStatus:
    """Start ``prefect server start`` on 127.0.0.1:``port`` and wait until it is healthy.

    The server outlives this call (its own session and process group; ``stop_server`` ends it).
    Its Prefect home, SQLite database and log (``server.log``) live under ``state``.
    """
    current = server_status(state)
    if current.running:
        raise ServiceError(f"a Prefect server started from {state} already runs (pid {current.pid}, {current.ui_url})")
    if not _port_free(port):
        raise ServiceError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
    state.mkdir(parents=True, exist_ok=True)
    home = state / "home"
    home.mkdir(exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_UI_API_URL=api_url,  # the UI in the browser calls this; the default assumes port 4200
        PREFECT_API_URL=api_url,  # the server's own services talk to it, never to a user's other server
    )
    env.setdefault("DO_NOT_TRACK", "1")  # nor client-side telemetry (the machine may be offline)
    log_path = state / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    _pid_file(state).write_text(f"{proc.pid}\n")
    _info_file(state).write_text(json.dumps({"pid": proc.pid, "port": port, "api_url": api_url}) + "\n")
    deadline = time.monotonic() + timeout
    while not health(api_url):
        if proc.poll() is not None:
            _forget(state)
            raise ServiceError(f"the Prefect server exited with {proc.returncode} at start-up; {log_path}:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            stop_server(state)
            raise ServiceError(f"the Prefect server did not answer {api_url}/health within {timeout:g} s; see {log_path}")
        time.sleep(0.5)
    return server_status(state)


def _forget(state: Path) -> None:
    _pid_file(state).unlink(missing_ok=True)
    _info_file(state).unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


def stop_server(state: Path, timeout: float = 60.0) -> bool:
    """Stop the server recorded in ``state``: SIGTERM to its process group (``prefect server start``
    and the uvicorn it runs), SIGKILL to what is left after ``timeout``. A server whose leader died
    but left children in its group (its port still taken) is stopped the same way; the group id is
    the recorded pid, which Linux does not hand out again while the group exists. Returns False when
    nothing of ours was running (stale files are removed)."""
    status = server_status(state)
    pgid = status.pid  # it leads its own group (start_new_session), checked by _is_our_server
    leftover = pgid is not None and not pid_alive(pgid) and _group_alive(pgid)
    if pgid is None or not (status.running or leftover):
        _forget(state)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    _forget(state)
    return True


def resolve_api_url(state: Path) -> str:
    """The Prefect API that deploy and worker use: ``PREFECT_API_URL`` (environment or profile),
    else the healthy server started from ``state``. Prefect's ephemeral API is no use here: a
    deployment must live in a server that a worker can poll."""
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    if configured:
        return str(configured)
    status = server_status(state)
    if status.healthy and status.api_url:
        return status.api_url
    raise ServiceError(
        f"no Prefect server: set PREFECT_API_URL, or start one with `alforge server start` (state dir {state})"
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["selector.batch_size=4", ...]`` → ``{"selector.batch_size": 4}``; values are read as YAML
    (numbers, booleans, lists), keys stay dotted for :func:`alforge.config.load_config`."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ServiceError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stopping.max_iterations=3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ServiceError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return out


def ensure_process_pool(name: str) -> None:
    """Create the process work pool ``name`` unless it exists; refuse one of another type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return
    if pool.type != "process":
        raise ServiceError(f"work pool {name!r} exists with type {pool.type!r}; alforge deploys to a process pool (--pool)")


@dataclass(frozen=True)
class Deployment:
    id: str
    name: str  # "<flow name>/<deployment name>", what `prefect deployment run` takes
    pool: str
    api_url: str


def deploy_campaign(
    config_path: str | Path,
    *,
    api: str,
    pool: str = DEFAULT_POOL,
    name: str | None = None,
    cron: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Deployment:
    """Create or update the deployment of the campaign flow for one campaign file.

    The file is read and validated now (with ``overrides``), so a bad file fails here, not at the
    scheduled hour. Parameters are the absolute file path and the overrides, never the store URL
    (Prefect records parameters). One run at a time (concurrency limit 1): a campaign has one owner.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from alforge.config import load_config

    path = Path(config_path).resolve()
    overrides = dict(overrides or {})
    cfg = load_config(path, overrides=overrides, check_device=False)
    deployment_name = name or cfg.name
    with temporary_settings(updates={PREFECT_API_URL: api}):
        from alforge.flows.campaign import campaign_flow

        ensure_process_pool(pool)
        # Prefect prints its own table of applied deployments; the CLI says what was made, once.
        with contextlib.redirect_stdout(io.StringIO()):
            deployment_id = campaign_flow.deploy(
                name=deployment_name,
                work_pool_name=pool,
                entrypoint_type=EntrypointType.MODULE_PATH,
                parameters={"config_path": str(path), "overrides": overrides},
                job_variables={"working_dir": str(path.parent)},
                cron=cron,
                concurrency_limit=1,
                tags=["alforge", f"campaign:{cfg.name}"],
                description=f"alforge campaign {cfg.name!r} from {path}",
                build=False,
                push=False,
                print_next_steps=False,
                ignore_warnings=True,
            )
    return Deployment(str(deployment_id), f"{campaign_flow.name}/{deployment_name}", pool, api)


def worker_command(pool: str, limit: int | None = None) -> list[str]:
    """``prefect worker start`` for a process pool, with this interpreter's Prefect."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def exec_worker(pool: str, api: str, limit: int | None = None) -> None:
    """Replace this process by a Prefect worker polling ``pool`` on ``api`` (never returns)."""
    cmd = worker_command(pool, limit)
    env = dict(os.environ, PREFECT_API_URL=api)
    env.setdefault("DO_NOT_TRACK", "1")  # no client-side telemetry from the worker or its flow runs
    os.execve(cmd[0], cmd, env)
