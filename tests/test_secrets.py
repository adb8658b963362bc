"""A store URL's password stays out of what is shown, stored and recorded: the campaign's stored
config, every table, the Prefect API's flow-run parameters and logs, and the console."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from sqlalchemy import select
from sqlalchemy.engine import make_url

from alforge.cli import main
from alforge.config import ConfigError, load_config
from alforge.storage import Store, models
from alforge.storage.urls import StoreError, redact_url
from alforge.tasks.common import open_store
from alforge.tasks.ingest import ingest_sources
from alforge.tasks.label import labeller_identity
from conftest import tiny_campaign

PG = "postgresql+psycopg://alice:hunter2@127.0.0.1:5/al"


def test_redaction():
    assert redact_url(PG) == "postgresql+psycopg://alice:***@127.0.0.1:5/al"
    assert "hunter2" not in redact_url("postgresql://alice:hunter2@db:notaport/al")
    assert redact_url("$env:ALFORGE_STORE_URL") == "$env:ALFORGE_STORE_URL"
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_campaign_file_dumps_never_carry_the_password(tmp_path):
    cfg = load_config(tiny_campaign(tmp_path, store=PG))
    assert cfg.store == PG  # kept to connect with
    assert "hunter2" not in json.dumps(cfg.model_dump(mode="json"))


def test_a_bad_store_url_is_named_without_its_password(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_campaign(tmp_path, store="postgresql://alice:hunter2@db:notaport/al"))
    assert "  store: " in str(err.value) and "alice:***@db" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_store_may_be_an_environment_reference(tmp_path, monkeypatch):
    path = tiny_campaign(tmp_path, store="$env:ALFORGE_TEST_STORE")
    with pytest.raises(ConfigError, match="  store: .*'ALFORGE_TEST_STORE' is not set"):
        load_config(path)
    url = f"sqlite:///{tmp_path / 'by-env.db'}"
    monkeypatch.setenv("ALFORGE_TEST_STORE", url)
    cfg = load_config(path)
    assert cfg.store == "$env:ALFORGE_TEST_STORE" and cfg.model_dump(mode="json")["store"] == cfg.store
    assert Store(cfg.store).url == url and (tmp_path / "by-env.db").exists()
    with pytest.raises(ConfigError, match="expected \\$env:NAME"):
        load_config(tiny_campaign(tmp_path, store="$env:"))


def test_unreachable_store_error_hides_the_password():
    with pytest.raises(StoreError) as err:
        Store(PG)
    assert "alice:***@127.0.0.1:5/al" in str(err.value) and "hunter2" not in str(err.value)


def _labelled_file(path) -> None:
    frames = []
    for i in range(2):
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0.05 * i]], cell=[3.6] * 3, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - i, forces=np.zeros((2, 3)))
        frames.append(atoms)
    write(path, frames)


async def _prefect_records() -> tuple[list, list, list]:
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
    async with get_client() as client:
        runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs()
        logs, offset = [], 0
        while page := await client.read_logs(limit=200, offset=offset):
            logs += page
            offset += len(page)
    return runs, task_runs, logs


def _assert_password_nowhere(password: str, store: Store, capfd) -> None:
    """Not in any flow run's parameters, task run, log line, table row or console output."""
    runs, task_runs, logs = asyncio.run(_prefect_records())
    assert runs and task_runs and logs
    for run in runs:
        assert password not in json.dumps(run.parameters, default=str), run.name
    assert not [t.name for t in task_runs if password in t.model_dump_json()]
    assert not [log.message for log in logs if password in log.message]
    with store.session() as s:  # every row of every table, as text
        for table in models.Base.metadata.sorted_tables:
            for row in s.execute(select(table)):
                assert password not in repr(tuple(row)), table.name
    out, err = capfd.readouterr()
    assert password not in out and password not in err


def test_password_is_absent_from_store_prefect_and_logs(tmp_path, postgres_db_url, prefect_harness, capfd):
    from alforge.flows.campaign import _label

    password = make_url(postgres_db_url).password
    assert password
    cfg = load_config(tiny_campaign(tmp_path, store=postgres_db_url))
    store = open_store(cfg.store)
    assert password not in store.url
    # what the campaign flow does first: record the campaign, ingest, label through the subflow
    cid = store.get_or_create_campaign(cfg.name, cfg.model_dump(mode="json"))
    calculator, params_hash = labeller_identity(cfg.labeller)
    ingest_sources.fn(cfg.store, cid, cfg.seeds, "seed", calculator, params_hash)
    assert _label(cfg.store, cid, cfg, cfg.name) is None
    assert store.label_counts(cid).get("done") == len(store.structure_ids(cid, role="seed"))
    # the import flow, through the CLI, with the URL on the command line
    _labelled_file(tmp_path / "d.extxyz")
    assert main(["import", str(tmp_path / "d.extxyz"), "--store", postgres_db_url, "--campaign", "imported"]) == 0
    assert json.loads(store.campaigns()[0].config_json)["store"] == redact_url(postgres_db_url)
    _assert_password_nowhere(password, store, capfd)


@pytest.mark.slow
def test_a_whole_campaign_keeps_the_password_out(tmp_path, postgres_db_url, prefect_harness, capfd):
    """``alforge run`` with the password written in the campaign file: one iteration, end to end."""
    password = make_url(postgres_db_url).password
    path = tiny_campaign(tmp_path, store=postgres_db_url, stopping={"max_iterations": 1})
    assert main(["run", str(path)]) == 0
    store = Store(postgres_db_url, create=False)
    (campaign,) = store.campaigns()
    assert campaign.status == "finished" and store.models(campaign.id)
    assert json.loads(campaign.config_json)["store"] == redact_url(postgres_db_url)
    _assert_password_nowhere(password, store, capfd)
