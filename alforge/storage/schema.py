"""Engine creation and schema migration.

SQLite gets WAL (readers never block the one writer, so `alforge status` works during a run; the
default ``synchronous=FULL`` stays, so a stored DFT label survives a power cut), enforced foreign
keys, a busy timeout (concurrent label tasks wait instead of failing) and 16 KB pages in a new file (feature blobs span fewer overflow pages).

Connection pools are sized for a long campaign: a labelling thread pool, a lease heartbeat thread
and the flow's own thread each hold a connection only within one store method, so a process needs
at most one connection per thread. The pool keeps :data:`POOL_SIZE` connections open and opens
more on demand without a limit (``max_overflow=-1``): a labeller concurrency of any size never
waits for a connection (a bounded pool would fail a label after ``pool_timeout``), and the number
in use stays bounded by the process's threads. PostgreSQL connections are checked before use
(``pool_pre_ping``: a server restart or a firewall's cut costs a reconnect, not a failed label) and
replaced after :data:`POOL_RECYCLE_S`; transactions run at READ COMMITTED, the level the store's
compare-and-swap UPDATEs are written for (PostgreSQL re-checks their WHERE against the newest row
version), whatever the server's default. Aborted transactions are re-run by
:mod:`alforge.storage.transactions`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

MIGRATIONS = Path(__file__).parent / "migrations"
#: Connections a process's pool keeps open; more are opened when more threads need one at once.
POOL_SIZE = 8
#: PostgreSQL connections older than this are replaced (server-side idle limits, load balancers).
POOL_RECYCLE_S = 1800
#: Seconds to wait for a PostgreSQL server to answer a new connection (libpq's default is forever).
CONNECT_TIMEOUT_S = 30
#: Page size of a new SQLite store (existing files keep theirs). Feature blobs are 10-100 KB: at
#: SQLite's 4 KB default each spans a chain of overflow pages, one system call apiece; 16 KB pages
#: cut the CPU time of writing them 1.7x and of reading them 1.1x (benchmarks/bench_select_path.py).
SQLITE_PAGE_SIZE = 16384


def make_engine(url: str | URL) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        pool: dict = {}
        if (parsed.database or ":memory:") != ":memory:":  # a file: QueuePool (memory: one per thread)
            pool = {"pool_size": POOL_SIZE, "max_overflow": -1}
        engine = create_engine(url, connect_args={"timeout": 60}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # a new file only: before WAL fixes it
            _set_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    pooled: dict = {"pool_pre_ping": True, "pool_size": POOL_SIZE, "max_overflow": -1, "pool_recycle": POOL_RECYCLE_S}
    if parsed.get_backend_name() == "postgresql":
        pooled["isolation_level"] = "READ COMMITTED"
        if "connect_timeout" not in parsed.query:  # the URL's own setting wins
            pooled["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return create_engine(url, **pooled)


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
