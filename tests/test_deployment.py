"""A campaign deployed to a real Prefect server runs on a real worker, end to end.

``alforge server start`` (its own state dir, a free port), a PostgreSQL store, ``alforge deploy``,
``alforge worker``; a run triggered through Prefect's REST API must complete, carry the campaign's
name and tags, publish its artifacts and leave the labels in the store; then Debian's headless
chromium opens the run's artifacts tab in the UI (served on a non-default port) and saves a screenshot.
Every process started here is stopped by its PID (process group) at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import tiny_campaign

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
#: generous: on 2 loaded cores a worker's flow run imports torch and mace and trains a model
RUN_TIMEOUT_S = 900
#: set (to anything) to keep a copy of the UI screenshot in benchmarks/results/ui/
SAVE_SCREENSHOT_ENV = "ALFORGE_SAVE_SCREENSHOT"


def _unavailable(reason: str) -> None:
    """Skip on a developer machine without the tool; fail in CI, which installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"deployment test cannot run in CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(url: str, body: dict | None = None, method: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} not written)"


def _alforge(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alforge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group the worker leads (its flow-run subprocesses too), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _chromium(args: list[str], timeout: float = 300) -> tuple[str, str]:
    """Run headless chromium in a process group of its own; the group is killed when it is done
    (or past ``timeout``), so no renderer or GPU process outlives the test. Returns stdout, stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", f"chromium still running after {timeout:g} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def _stop_server(state: Path, env: dict[str, str]) -> None:
    """``alforge server stop``; if that fails, the PID file's group is killed here."""
    done = _alforge("server", "stop", "--state", str(state), env=env, timeout=180)
    pid_file = state / "server.pid"
    if done.returncode != 0 and pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_compose_and_prefect_yaml_describe_the_stack():
    """The files docker and `prefect deploy` read (neither runs here): services, entrypoint, pull step."""
    from alforge.service import FLOW_ENTRYPOINT

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker"} <= set(services)
    build = services["worker"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert "prefect-server" in services["worker"]["depends_on"] and "postgres" in services["prefect-server"]["depends_on"]
    assert "postgresql" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    prefect_yaml = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    (deployment,) = prefect_yaml["deployments"]
    assert deployment["entrypoint"] == FLOW_ENTRYPOINT
    assert set(deployment["parameters"]) == {"config_path", "overrides"}
    assert deployment["work_pool"]["name"] and deployment["schedules"][0]["cron"]
    assert [next(iter(step)) for step in prefect_yaml["pull"]] == ["prefect.deployments.steps.set_working_directory"]


def test_slurm_example_is_a_valid_campaign(monkeypatch):
    from alforge.config import load_config

    monkeypatch.setenv("ALFORGE_STORE", "sqlite:///unused.db")
    cfg = load_config(DEPLOY / "slurm" / "campaign.yaml", check_device=False)
    assert cfg.execution.task_runner == "dask" and cfg.execution.cluster == "slurm"


def test_deploy_and_worker_name_what_is_missing(tmp_path, monkeypatch, capsys):
    """No server to deploy to, or a malformed --set: one line saying what to do, before any work."""
    from alforge.cli import main
    from alforge.service import parse_overrides

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    config = tiny_campaign(tmp_path)
    state = str(tmp_path / "no-server")
    # an earlier test's Prefect harness sets the API URL in the settings context, not the environment
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for argv in (["deploy", str(config), "--state", state], ["worker", "--state", state]):
            with pytest.raises(SystemExit, match="no Prefect server: set PREFECT_API_URL, or start one with `alforge server start`"):
                main(argv)
    with pytest.raises(SystemExit, match="--set 'stopping': expected KEY=VALUE"):
        main(["deploy", str(config), "--set", "stopping", "--state", state])
    assert parse_overrides(["stopping.max_iterations=3", "selector.name=fps", "x.y=[1, 2]"]) == {
        "stopping.max_iterations": 3, "selector.name": "fps", "x.y": [1, 2]}
    assert main(["server", "status", "--state", state]) == 1
    assert "no Prefect server running" in capsys.readouterr().out


@pytest.mark.slow
def test_deployed_campaign_runs_on_a_worker_and_shows_in_the_ui(tmp_path, postgres_db_url):
    chromium = shutil.which("chromium")
    if chromium is None:
        _unavailable("Debian's chromium is not installed (deploy/install.sh --dft)")
    port = _free_port()
    state = tmp_path / "server"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "client"), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1")
    worker = None
    worker_log = tmp_path / "worker.log"
    try:
        started = _alforge("server", "start", "--port", str(port), "--state", str(state), "--timeout", "300", env=env)
        assert started.returncode == 0, started.stdout + started.stderr + _tail(state / "server.log")
        api = f"http://127.0.0.1:{port}/api"
        assert f"export PREFECT_API_URL={api}" in started.stdout
        again = _alforge("server", "start", "--port", str(port), "--state", str(state), env=env)
        assert again.returncode == 1 and "already runs" in again.stderr, again.stderr
        status = _alforge("server", "status", "--state", str(state), env=env)
        assert status.returncode == 0 and "healthy" in status.stdout, status.stdout + status.stderr
        env["PREFECT_API_URL"] = api

        config = tiny_campaign(
            tmp_path, store=postgres_db_url, stopping={"max_iterations": 1},
            seeds=[{"generate": {"element": "Cu", "a": 3.61, "count": 4, "rattle": 0.05, "seed": 1}}],
        )
        deployed = _alforge("deploy", str(config), "--pool", "test-pool", "--set", "mlip.max_epochs=2", env=env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        (dep,) = _api(f"{api}/deployments/filter", {})
        assert dep["name"] == "tiny" and dep["entrypoint"] == "alforge.flows.campaign.campaign_flow"
        assert dep["parameters"] == {"config_path": str(config), "overrides": {"mlip.max_epochs": 2}}
        assert "password" not in json.dumps(dep) and postgres_db_url not in json.dumps(dep)

        with open(worker_log, "wb") as log:
            worker = subprocess.Popen(
                # polling every 2 s, not Prefect's 10 s: the run starts as soon as it is created
                [sys.executable, "-m", "alforge.cli", "worker", "--pool", "test-pool"],
                env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        run = _api(f"{api}/deployments/{dep['id']}/create_flow_run", {})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (state_type := _api(f"{api}/flow_runs/{run['id']}")["state_type"]) not in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"
        ):
            assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{_tail(worker_log)}"
            assert time.monotonic() < deadline, f"run still {state_type} after {RUN_TIMEOUT_S} s:\n{_tail(worker_log)}"
            time.sleep(2)
        assert state_type == "COMPLETED", _tail(worker_log)

        # C1: names and tags a user filters the runs list by
        runs = _api(f"{api}/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["campaign:tiny"]}}})
        by_name = {r["name"]: r for r in runs}
        assert {"tiny", "tiny/iteration-1"} <= set(by_name), sorted(by_name)
        assert by_name["tiny"]["id"] == run["id"] and "alforge" in by_name["tiny"]["tags"]
        assert "iteration:1" in by_name["tiny/iteration-1"]["tags"]
        # C2: the artifacts the UI's artifacts tab shows
        artifacts = _api(f"{api}/artifacts/filter", {"limit": 200})
        keys = {a["key"] for a in artifacts}
        assert {"tiny-metrics", "tiny-learning-curve", "tiny-labelling"} <= keys, sorted(k for k in keys if k)
        (curve_run,) = {a["flow_run_id"] for a in artifacts if a["key"] == "tiny-learning-curve"}
        assert curve_run in {r["id"] for r in runs}
        shown = {a["key"] for a in artifacts if a["flow_run_id"] == curve_run and a["key"]}

        # the store: the campaign's labels are in PostgreSQL
        import sqlalchemy as sa

        engine = sa.create_engine(postgres_db_url)
        try:
            with engine.connect() as conn:
                done = conn.execute(sa.text(
                    "SELECT count(*) FROM labels l JOIN structures s ON s.id = l.structure_id"
                    " JOIN campaigns c ON c.id = s.campaign_id WHERE c.name = 'tiny' AND l.status = 'done'"
                )).scalar_one()
        finally:
            engine.dispose()
        assert done >= 4 + 4  # the seeds and the test set at least

        # The UI (on this non-default port it needs PREFECT_UI_API_URL, which server start sets): the
        # default (V2) UI's page of the run that holds the learning curve, on its artifacts tab.
        page = f"http://127.0.0.1:{port}/v2/runs/flow-run/{curve_run}?tab=Artifacts"
        browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1440,1000",
                   "--virtual-time-budget=30000"]
        for _ in range(3):  # a loaded machine may render the page after chromium's virtual time is up
            dom, err = _chromium([*browser, "--dump-dom", page])
            missing = sorted(k for k in shown if k not in dom)
            if not missing:
                break
        assert not missing, f"the artifacts tab does not list {missing}: {err[-2000:]}"
        shot = tmp_path / "flow-run-artifacts.png"
        _, err = _chromium([*browser, f"--screenshot={shot}", page])
        assert shot.exists(), err[-3000:]
        from matplotlib.image import imread

        pixels = imread(shot)
        assert shot.stat().st_size > 20_000 and pixels.std() > 0.05, "the screenshot is blank"
        if os.environ.get(SAVE_SCREENSHOT_ENV):
            out = ROOT / "benchmarks" / "results" / "ui"
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / shot.name)
    finally:
        if worker is not None:
            _stop_group(worker)
        _stop_server(state, env)
