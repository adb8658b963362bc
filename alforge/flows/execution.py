"""Where labels and MD walkers run: the Prefect task runner a campaign's ``execution:`` asks for.

``task_runner: thread`` (the default) runs tasks on a thread pool inside the campaign's process.
``task_runner: dask`` hands them to Dask through ``prefect_dask.DaskTaskRunner``: a local cluster
of worker processes (``cluster: local``), batch jobs of a SLURM cluster (``cluster: slurm``, with
``dask_jobqueue.SLURMCluster``), or an existing scheduler (``address``).

A task on a Dask worker shares no memory with the campaign's process, so it gets everything as
arguments it can resolve where it runs (:func:`worker_context`, :class:`~alforge.tasks.worker.WorkerContext`):

* **The store**, as a reference that carries no password: a ``$env:NAME``/``$secret:NAME``
  reference as written (the worker resolves it from its own environment or through Prefect), a URL
  without a password as it is (a relative SQLite path made absolute, so a worker's cwd does not
  matter). A URL with a password in the campaign file reaches a local cluster's workers only through
  their environment (``ALFORGE_STORE_URL``, set by their nanny); for workers on other hosts the
  configuration refuses it (alforge/config.py), since there is no safe way to hand it over.
* **The label claims' owner**: the campaign lease's owner id, not the worker's own
  (:data:`alforge.ownership.PROCESS_OWNER` of the campaign's process, whose heartbeat renews them).
* **Paths**: models are stored with absolute paths under ``workdir``, the scratch root is passed
  along (``workdir/scratch`` unless the worker's ``ALFORGE_SCRATCH`` names a local disk).

Prefect's ephemeral API lives on the campaign's host only: a local cluster's workers are pointed at
it (``PREFECT_API_URL`` in their environment) so their task runs show in the same API; workers on
other hosts need a Prefect server both sides can reach (``PREFECT_API_URL``), else their task runs
go to throwaway APIs of their own (a warning says so). A code a worker starts dies with the worker
process: the lifetime supervisor (alforge/lifetime.py) watches the process that started it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from sqlalchemy.engine import make_url

from alforge.config import CampaignConfig
from alforge.ownership import PROCESS_OWNER
from alforge.storage.urls import is_reference, redact_url
from alforge.tasks.common import store_handle
from alforge.tasks.worker import WorkerContext

log = logging.getLogger(__name__)

#: The variable a local cluster's workers find a password-bearing store URL in.
STORE_URL_VARIABLE = "ALFORGE_STORE_URL"


def _api_url() -> str:
    """The Prefect API this process reports to (the ephemeral one it started, if no server is set)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def _absolute_sqlite(url: str) -> str:
    """``url`` with a relative SQLite path made absolute against this process's cwd."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(database).resolve())).render_as_string(hide_password=False)


def _task_store(cfg: CampaignConfig) -> str:
    """The store as this campaign's tasks receive it: resolvable wherever the runner runs them, and
    never a password (module docstring)."""
    url = str(cfg.store)
    if cfg.execution.task_runner == "thread":
        return store_handle(url)  # the redacted URL, which open_store resolves in this process
    if is_reference(url):
        return url
    url = _absolute_sqlite(url)
    if redact_url(url) == url:
        return url
    return f"$env:{STORE_URL_VARIABLE}"  # set by the local cluster's nannies (make_task_runner)


def worker_context(cfg: CampaignConfig) -> WorkerContext:
    """What this campaign's label and walker tasks get, built in the process that holds its lease."""
    return WorkerContext(store=_task_store(cfg), owner=PROCESS_OWNER, scratch=str(cfg.workdir / "scratch"))


def _worker_env(cfg: CampaignConfig) -> dict[str, str]:
    """Environment of a local cluster's workers beyond the one they inherit."""
    env = {"PREFECT_API_URL": _api_url()}
    if _task_store(cfg) == f"$env:{STORE_URL_VARIABLE}":
        env[STORE_URL_VARIABLE] = _absolute_sqlite(str(cfg.store))
    return env


def make_task_runner(cfg: CampaignConfig, max_workers: int) -> TaskRunner[Any]:
    """The task runner for a batch of labels or walkers: ``max_workers`` threads by default; with
    Dask, the cluster ``cfg.execution`` describes (a local one has ``n_workers`` processes, default
    ``max_workers``, one thread each). Started when the flow that uses it starts, closed with it."""
    ex = cfg.execution
    if ex.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    from prefect_dask import DaskTaskRunner

    if ex.address is not None:
        _warn_without_server("address")
        return DaskTaskRunner(address=ex.address)
    adapt = dict(ex.adapt_kwargs) or None
    if ex.cluster == "local":
        kwargs = {
            "n_workers": ex.n_workers or max_workers,
            "threads_per_worker": 1,  # one label or walker per process: codes and torch get the cores
            "processes": True,
            "dashboard_address": None,
            "env": _worker_env(cfg),
        }
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs, adapt_kwargs=adapt)
    _warn_without_server("cluster: slurm")
    # one thread per worker process unless the user says otherwise: walkers in threads of one
    # process would share torch's process-wide default dtype (alforge/flows/exploration.py)
    kwargs = {"processes": ex.cluster_kwargs["cores"], **ex.cluster_kwargs}
    return DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs=kwargs, adapt_kwargs=adapt)


def _warn_without_server(where: str) -> None:
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        log.warning(
            "execution.%s: PREFECT_API_URL is not set, so workers on other hosts cannot reach this run's "
            "ephemeral Prefect API and their task runs will not show in it; start a Prefect server", where
        )
