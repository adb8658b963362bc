"""The CLI's failures: one named line and a non-zero exit (the traceback only with --debug);
read-only commands never create a store and write no output before everything is read."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

import alforge.cli
from alforge.cli import main
from alforge.storage import Store
from alforge.storage.urls import StoreError


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["export", "--campaign", "c", "--out", "o.xyz"]])
def test_read_only_commands_do_not_create_a_store(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "typo.db"
    assert main([*command, "--store", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err
    assert f"store sqlite:///{db}: no such database file" in err and "Traceback" not in err
    assert not db.exists() and not (tmp_path / "o.xyz").exists()


def test_read_only_commands_refuse_a_database_that_is_not_a_store(tmp_path, capsys):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    assert main(["status", "--store", f"sqlite:///{db}"]) == 2
    assert "not an alforge store" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:  # not migrated
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["t"]


@pytest.mark.parametrize("url", ["not a url", "postgresql+psycopg://alice:hunter2@127.0.0.1:1/db"])
def test_bad_or_unreachable_url_is_one_line_without_the_password(capsys, url):
    assert main(["status", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alforge: store ")
    assert "hunter2" not in err and "Traceback" not in err


def test_export_writes_nothing_when_the_model_is_missing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    cid = store.get_or_create_campaign("c", {})
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[2.5] * 3, pbc=True)
    store.add_structures(cid, [atoms], role="seed", source="t", provenance=[{}])
    out, model = tmp_path / "train.xyz", tmp_path / "m.model"
    with pytest.raises(SystemExit, match="has no model yet"):
        main(["export", "--store", url, "--campaign", "c", "--out", str(out), "--model", str(model)])
    assert not out.exists() and not model.exists()
    assert main(["export", "--store", url, "--campaign", "nope", "--out", str(out)]) == 2
    assert "no campaign named 'nope'" in capsys.readouterr().err and not out.exists()


def test_unexpected_errors_are_one_line_and_the_traceback_needs_debug(monkeypatch, capsys):
    def boom(args):
        raise FileNotFoundError("MACE model file /x/iteration-002.model does not exist")

    monkeypatch.setattr(alforge.cli, "cmd_status", boom)
    assert main(["status", "--store", "sqlite://"]) == 1
    err = capsys.readouterr().err
    assert err == ("alforge: FileNotFoundError: MACE model file /x/iteration-002.model does not exist"
                   " (--debug for the traceback)\n")
    assert main(["--debug", "status", "--store", "sqlite://"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("does not exist")


def test_store_errors_are_store_errors():
    with pytest.raises(StoreError, match="no such database file"):
        Store("sqlite:////nonexistent/dir/x.db", create=False)


def test_prefect_defaults_keep_a_users_startup_timeout(tmp_path):
    """In a fresh process (Prefect reads its settings once): our 600 s default, unless the user set one."""
    code = (
        "from alforge.cli import _prefect_defaults\n"
        "_prefect_defaults()\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T\n"
        "print(T.value())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   timeout=300, check=True).stdout.split()[-1]
    assert run(env) == "600"
    assert run({**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}) == "45"
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = "77"\n'
    )
    assert run(env) == "77"


@pytest.mark.slow
def test_a_failing_flow_is_one_line_without_prefect_tracebacks(tmp_path):
    """The real CLI in its own process, a task failing inside the import flow (as a bug would): exit
    status 1, one alforge line, none of Prefect's tracebacks."""
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]], cell=[3.6] * 3, pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((2, 3)))
    write(tmp_path / "d.extxyz", [atoms])
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    args = [str(tmp_path / "d.extxyz"), "--store", f"sqlite:///{tmp_path / 's.db'}", "--campaign", "c"]
    proc = subprocess.run([sys.executable, "-c", _FAILING_IMPORT, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("alforge:")]
    assert ours == ["alforge: RuntimeError: injected failure inside the flow (--debug for the traceback)"]


_FAILING_IMPORT = """
import sys
from prefect import task
import alforge.flows.importing as importing
from alforge.cli import main

@task(name="ingest")
def failing(*args, **kwargs):
    raise RuntimeError("injected failure inside the flow")

importing.ingest_sources = failing
sys.exit(main(["import", *sys.argv[1:]]))
"""
