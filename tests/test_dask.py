"""Labelling through Dask: the ``execution:`` section of a campaign file, 8 labels computed by a
local cluster of 2 worker processes, each stored once under the campaign lease's owner, and a code
started on a worker dying with the worker process."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import Counter
from dataclasses import asdict

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from alforge.config import ConfigError, load_config
from alforge.flows.execution import make_task_runner, worker_context
from alforge.ownership import PROCESS_OWNER
from alforge.storage import models
from alforge.tasks.common import open_store
from alforge.tasks.ingest import ingest_sources
from alforge.tasks.label import label_structure, labeller_identity
from conftest import tiny_campaign

SLURM = {"task_runner": "dask", "cluster": "slurm", "cluster_kwargs": {"cores": 4, "memory": "8GB", "queue": "short"}}


@pytest.mark.parametrize(
    ("execution", "expected"),
    [
        ({"task_runner": "mpi"}, "execution.task_runner: Input should be 'thread' or 'dask'"),
        ({"n_workers": 2}, "n_workers: Dask settings need task_runner: dask"),
        ({"task_runner": "dask"}, "exactly one of 'address' (a running scheduler) or 'cluster'"),
        ({"task_runner": "dask", "cluster": "local", "n_workers": 0}, "execution.n_workers: Input should be greater"),
        ({"task_runner": "dask", "cluster": "local", "address": "tcp://h:8786"}, "exactly one of"),
        ({"task_runner": "dask", "cluster": "k8s"}, "execution.cluster: Input should be 'local' or 'slurm'"),
        ({**SLURM, "cluster_kwargs": {"cores": 4, "memory": "8GB", "queu": "short"}}, "SLURMCluster takes no 'queu'"),
        ({**SLURM, "cluster_kwargs": {"cores": 4}}, "SLURMCluster needs memory"),
        ({**SLURM, "n_workers": 3}, "n_workers is for cluster: local"),
    ],
)
def test_execution_errors_name_the_field(tmp_path, execution, expected):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_campaign(tmp_path, execution=execution))
    assert expected in str(err.value)


def test_a_password_in_the_store_url_never_goes_to_remote_workers(tmp_path, monkeypatch):
    url = "postgresql+psycopg://alice:hunter2@db.example/al"
    remote = {"task_runner": "dask", "address": "tcp://10.0.0.5:8786"}
    with pytest.raises(ConfigError, match=r"execution.address: the store URL holds a password"):
        load_config(tiny_campaign(tmp_path, store=url, execution=remote))
    monkeypatch.setenv("AL_STORE", url)  # the reference form is what such workers get
    cfg = load_config(tiny_campaign(tmp_path, store="$env:AL_STORE", execution=remote))
    assert worker_context(cfg).store == "$env:AL_STORE"
    monkeypatch.chdir(tmp_path)  # a relative SQLite path reaches workers made absolute
    cfg = load_config(tiny_campaign(tmp_path, store="sqlite:///rel.db", execution={"task_runner": "dask", "cluster": "local"}))
    assert worker_context(cfg).store == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"


def test_runner_per_execution_section(tmp_path):
    cfg = load_config(tiny_campaign(tmp_path))
    assert isinstance(make_task_runner(cfg, 3), ThreadPoolTaskRunner)
    slurm = make_task_runner(load_config(tiny_campaign(tmp_path, execution={**SLURM, "adapt_kwargs": {"maximum": 4}})), 3)
    assert isinstance(slurm, DaskTaskRunner) and slurm.cluster_class == "dask_jobqueue.SLURMCluster"
    assert slurm.adapt_kwargs == {"maximum": 4}
    from dask_jobqueue import SLURMCluster

    # the job script SLURM would get (a scheduler starts here; no job is submitted before scaling)
    with SLURMCluster(**slurm.cluster_kwargs, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p short" in script and "--mem=8G" in script
    assert "--nthreads 1 " in script and "--nworkers 4 " in script, "one thread per worker process"


def _labels_through(cfg, cid: int) -> tuple[list[str], list[str]]:
    """What the label-batch subflow does: every unfinished label as a task on the campaign's runner;
    the outcomes, and the final states of the batch's task runs as the campaign's Prefect API has them."""
    todo = open_store(cfg.store).unfinished_labels(cid)
    worker = worker_context(cfg)

    @flow(name="dask-label-batch")
    def batch() -> list[str]:
        futures = [label_structure.submit(worker, lid, sid, cfg.labeller) for lid, sid in todo]
        return [f.result() for f in futures]

    state = batch.with_options(task_runner=make_task_runner(cfg, cfg.labeller.concurrency))(return_state=True)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return state.result(), [r.state_name for r in runs]


@pytest.mark.slow
def test_eight_labels_on_two_dask_worker_processes(tmp_path, postgres_db_url, prefect_harness):
    """On PostgreSQL, the password in the campaign file: the workers get it from their environment,
    never as a task argument."""
    log = tmp_path / "calls.log"
    cfg = load_config(tiny_campaign(
        tmp_path,
        store=postgres_db_url,
        seeds=[{"generate": {"element": "Cu", "a": 3.61, "supercells": [[1, 1, 1], [2, 1, 1]], "count": 8,
                             "rattle": 0.05, "seed": 1}}],
        test=[],
        labeller={"name": "slow_emt:make", "kwargs": {"delay": 0.5, "log": str(log)}, "concurrency": 2},
        execution={"task_runner": "dask", "cluster": "local", "n_workers": 2},
    ))
    store = open_store(cfg.store)
    cid = store.get_or_create_campaign(cfg.name, cfg.model_dump(mode="json"))
    calculator, params_hash = labeller_identity(cfg.labeller)
    ingest_sources.fn(cfg.store, cid, cfg.seeds, "seed", calculator, params_hash)
    assert len(store.unfinished_labels(cid)) == 8
    password = make_url(postgres_db_url).password
    assert password and password not in json.dumps(asdict(worker_context(cfg)))

    claims: set[str] = set()  # owners of running labels' claims, seen while the batch runs
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            with store.session() as s:
                claims.update(s.execute(select(models.Label.claim_owner).where(models.Label.status == "running")).scalars())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        statuses, task_states = _labels_through(cfg, cid)
    finally:
        done.set()
        watcher.join()

    with store.session() as s:
        labels = s.execute(select(models.Label)).scalars().all()
        attempts = s.execute(select(func.count()).select_from(models.LabelAttempt)).scalar_one()
    assert statuses == ["done"] * 8 and [lb.status for lb in labels] == ["done"] * 8
    assert task_states == ["Completed"] * 8, "the workers report their task runs to the campaign's Prefect API"
    assert len({lb.structure_id for lb in labels}) == 8 and attempts == 8, "each label stored once, one attempt"
    pids = Counter(json.loads(lb.metadata_json)["worker_pid"] for lb in labels)
    assert len(pids) == 2 and os.getpid() not in pids, f"labels ran in {dict(pids)}, campaign pid {os.getpid()}"
    calls = [line.split() for line in log.read_text().splitlines()]
    assert len(calls) == 8 and len({h for _, h in calls}) == 8, "the labeller ran once per structure"
    assert Counter(int(p) for p, _ in calls) == pids
    assert claims == {PROCESS_OWNER}, "workers claim labels as the campaign's owner, not as themselves"


def _start_supervised_sleep() -> tuple[int, int, int]:
    """On a Dask worker: start a code the way labellers do (alforge/lifetime.py's supervisor)."""
    import subprocess
    import time

    import psutil

    from alforge import lifetime

    supervisor = subprocess.Popen(lifetime.supervised(["/usr/bin/sleep", "300"]), start_new_session=True)
    while not (children := psutil.Process(supervisor.pid).children()):
        time.sleep(0.05)
    return os.getpid(), supervisor.pid, children[0].pid


@pytest.mark.slow
def test_a_code_dies_with_its_dask_worker_process():
    import signal
    import time

    import psutil
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            worker_pid, supervisor, code = client.submit(_start_supervised_sleep).result(timeout=300)
            try:
                assert worker_pid != os.getpid() and psutil.Process(code).cmdline()[0] == "/usr/bin/sleep"
                os.kill(worker_pid, signal.SIGKILL)
                deadline = time.monotonic() + 60  # the supervisor polls every 0.25 s; a loaded machine is slow
                while psutil.pid_exists(code) and psutil.Process(code).status() != psutil.STATUS_ZOMBIE:
                    assert time.monotonic() < deadline, "the code outlived its worker process"
                    time.sleep(0.1)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(supervisor, signal.SIGKILL)  # only if the test failed: the code's own group
