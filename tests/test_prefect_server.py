"""With PREFECT_API_URL set, alforge's flow runs land in a real Prefect server (what its UI shows)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "si_gap18" / "Si_tiny.xyz"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if _get(f"{api}/health") is True:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "Prefect server did not become healthy"
            time.sleep(0.5)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_import_flow_run_is_visible_in_a_real_server(prefect_server, tmp_path):
    if not DATA.exists():
        pytest.skip(f"{DATA} not present")
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "client"))
    cmd = [sys.executable, "-m", "alforge.cli", "import", str(DATA), "--store", f"sqlite:///{tmp_path / 's.db'}",
           "--campaign", "si", "--index", "0:4", "--energy-key", "dft_energy", "--forces-key", "dft_force"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _get(f"{prefect_server}/flow_runs/filter", {"limit": 10})
    assert [(r["state_type"]) for r in runs] == ["COMPLETED"]
    flows = {f["id"]: f["name"] for f in _get(f"{prefect_server}/flows/filter", {"limit": 10})}
    assert flows[runs[0]["flow_id"]] == "import-dataset"
    tasks = _get(f"{prefect_server}/task_runs/filter", {"limit": 10})
    assert any(t["name"].startswith("ingest") and t["state_type"] == "COMPLETED" for t in tasks)
    assert urllib.request.urlopen(prefect_server.removesuffix("/api") + "/", timeout=10).status == 200  # the UI
