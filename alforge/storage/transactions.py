"""Re-running a store transaction that the database aborted for a reason that a retry cures.

Several processes share one store (campaigns on one PostgreSQL database, a labelling thread pool
and a heartbeat thread in each), so the database may abort a transaction that did nothing wrong:

* a **serialization failure** (SQLSTATE 40001; under READ COMMITTED only when a DBA made a
  stricter isolation level the server's default) or a **deadlock** (40P01: PostgreSQL aborts one
  of two transactions that wait on each other's row locks);
* a **dropped connection** while a statement ran (a server restart, a failover, a connection cut
  by a firewall): SQLAlchemy invalidates it, and the pool's pre-ping gives the next attempt a
  fresh one;
* on SQLite, SQLITE_BUSY_SNAPSHOT ("database is locked" at once, without the busy handler's
  wait): a transaction of a WAL database that read, then would write after another writer committed.

Each :class:`~alforge.storage.store.Store` method is one transaction, and the whole method is
re-run (:func:`unit_of_work`): the aborted transaction was rolled back entirely, so a retry never
finds half of it applied. Only these errors are retried, a bounded number of times with jittered
exponential backoff (so two aborted writers do not collide again in lockstep); anything else, such
as a constraint violation, is raised at once. A store method calling another one runs inside the
outer retry only, so attempts never multiply.

A connection lost *during* COMMIT is not retried: the transaction may have committed, and a re-run
could apply it twice (a second config version, a second selection row). It is raised as it is, and
the task that made it fails with the database's message. (A serialization failure or deadlock
reported at COMMIT is retried: the server aborted that transaction.)
"""

from __future__ import annotations

import functools
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

#: How many times a unit of work is tried before :class:`StoreRetryError`.
ATTEMPTS = 8
#: Backoff before retry k (1-based) is uniform in [0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**(k-1))].
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0

#: SQLSTATEs of aborts that a re-run cures.
RETRYABLE_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock"}
_SQLITE_BUSY_SNAPSHOT = 517  # SQLITE_BUSY | 2 << 8; plain SQLITE_BUSY already waited the busy timeout

T = TypeVar("T")
_log = logging.getLogger("alforge.storage")
_inside = threading.local()  # .active while this thread runs a unit of work


class StoreRetryError(RuntimeError):
    """A unit of work the database kept aborting; the message names the operation and the store."""


def retry_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is worth a re-run of its transaction (``"deadlock"``, ...), or None if it is not."""
    if not isinstance(exc, DBAPIError):
        return None
    if exc.connection_invalidated:  # no statement: lost at COMMIT, which may have committed
        return "connection lost" if exc.statement is not None else None
    code = getattr(exc.orig, "sqlstate", None)
    if code in RETRYABLE_SQLSTATES:
        return f"{RETRYABLE_SQLSTATES[code]} ({code})"
    if isinstance(exc.orig, sqlite3.OperationalError) and exc.orig.sqlite_errorcode == _SQLITE_BUSY_SNAPSHOT:
        return "database is locked (SQLITE_BUSY_SNAPSHOT)"
    return None


def _first_line(exc: DBAPIError) -> str:
    lines = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_with_retries(fn: Callable[[], T], operation: str, *, where: str = "", attempts: int | None = None) -> T:
    """``fn()``, re-run from the start while it fails with a :func:`retry_reason`; after
    ``attempts`` tries (default :data:`ATTEMPTS`), :class:`StoreRetryError` naming ``operation``
    (and ``where``, the redacted store URL). ``fn`` must be one whole transaction: it opens,
    commits or rolls back its own."""
    if getattr(_inside, "active", False):  # the outer unit of work retries the whole of it
        return fn()
    attempts = ATTEMPTS if attempts is None else attempts
    _inside.active = True
    try:
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except DBAPIError as exc:
                reason = retry_reason(exc)
                if reason is None:
                    raise
                if attempt >= attempts:
                    store = f"store {where}: " if where else ""
                    raise StoreRetryError(
                        f"{store}{operation} gave up after {attempts} attempts, each aborted by the "
                        f"database ({reason}: {_first_line(exc)})"
                    ) from exc
                pause = random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
                _log.debug("%s: %s, attempt %d of %d; retrying in %.3f s", operation, reason, attempt, attempts, pause)
                time.sleep(pause)
    finally:
        _inside.active = False


def unit_of_work(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a :class:`~alforge.storage.store.Store` method that is one transaction, so that
    it is re-run as :func:`run_with_retries` says; errors name it ``Store.<method>``."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        return run_with_retries(
            lambda: method(self, *args, **kwargs), f"Store.{method.__name__}", where=getattr(self, "url", "")
        )

    return wrapper
