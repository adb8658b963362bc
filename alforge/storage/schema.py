"""Engine creation and schema migration.

SQLite gets WAL (readers never block the one writer, so `alforge status` works during a run),
enforced foreign keys and a busy timeout (concurrent label tasks wait instead of failing).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            _set_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _set_wal(cur: sqlite3.Cursor, patience_s: float = 60.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried while the database is locked.

    Switching a new database to WAL needs an exclusive lock, and SQLite answers "database is locked"
    at once, without calling the busy handler, while another connection holds a lock (several runs
    opening a new store together, one of them migrating it).
    """
    deadline = time.monotonic() + patience_s
    pause = 0.01
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (creates the schema on an empty database)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        # Two runs opening a new store at once would both create the schema ("table already
        # exists"): the migration holds the database's write lock (SQLite: pysqlite would run the
        # DDL outside any transaction) or a transaction-scoped advisory lock (PostgreSQL).
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7158210)")  # any fixed key: alforge's
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
