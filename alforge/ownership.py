"""One campaign, one owner: the lease a run holds on its campaign while it runs.

Two ``alforge run`` on one campaign (a double-submitted job, a scheduler restarting one while the
old one still runs) would otherwise compute the same labels twice and train the same model twice.
So a run first takes the campaign's lease (:meth:`Store.acquire_lease`: atomic on SQLite and
PostgreSQL), keeps it alive with a heartbeat thread, and gives it back on every way out.

* A lease held by a live run is respected: the second run waits (``wait=True``, ``alforge run
  --wait``) or stops at once with :class:`LeaseHeld`, naming the owner (host, pid, since when).
* A lease whose owner is gone (its heartbeat expired, or its pid is dead on this host) is taken over.
* Labels are claimed under the lease (:data:`PROCESS_OWNER` is the claim's owner; the heartbeat
  renews the claims), so a ``running`` label of a live run is never started by another.
* On any exit from :func:`campaign_lease` (return, exception, ``KeyboardInterrupt``, ``SystemExit``
  such as :class:`alforge.lifetime.CampaignInterrupted`), this owner's running labels go back to
  ``pending``, the lease is released and, after an exception, the campaign's status is ``failed``
  (``interrupted`` after an interrupt or exit) with the exception's one-line summary.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from alforge.lifetime import pid_alive
from alforge.storage.store import LEASE_SECONDS, LeaseInfo, Store

log = logging.getLogger(__name__)

#: This process's owner id: of the leases it takes and of the label claims it makes under them.
PROCESS_OWNER = str(uuid.uuid4())
HOST = socket.gethostname()
#: (store, campaign id) of the leases this process holds now, so a flow can tell whether its
#: caller (``alforge run``) already owns the campaign or it must take the lease itself (a deployment run).
_HELD: set[tuple[str, int]] = set()
_HELD_LOCK = threading.Lock()


class LeaseHeld(RuntimeError):
    """Another live run owns the campaign."""


class LeaseLost(RuntimeError):
    """This run's lease expired and another run took the campaign over: this run must stop."""


def holds_lease(store: Store, campaign_id: int) -> bool:
    """Whether this process holds campaign ``campaign_id``'s lease as :data:`PROCESS_OWNER`
    (inside :func:`campaign_lease`)."""
    with _HELD_LOCK:
        return (store.url, campaign_id) in _HELD


def holder_gone(lease: LeaseInfo) -> bool:
    """A lease's holder is known to be gone only on this host, where its pid can be looked up."""
    return lease.host == HOST and lease.pid != os.getpid() and not pid_alive(lease.pid)


def describe(lease: LeaseInfo, name: str) -> str:
    """One line naming who owns campaign ``name``."""
    age = (datetime.now(timezone.utc) - lease.heartbeat_at).total_seconds()
    return (
        f"campaign {name!r} is being run by pid {lease.pid} on host {lease.host} "
        f"(since {lease.acquired_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {age:.0f} s ago)"
    )


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, what a campaign's status message says about a crash."""
    text = str(exc).strip()
    summary = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return summary[:500]


class _Heartbeat(threading.Thread):
    """Renews the lease (and this owner's label claims) every ``ttl / 4`` seconds. If the lease is
    found taken over, the main thread is interrupted (as by SIGINT, so :mod:`alforge.lifetime` kills
    the running codes): a run that lost its campaign must stop."""

    def __init__(self, store: Store, campaign_id: int, owner: str, ttl: float) -> None:
        super().__init__(name=f"alforge-lease-{campaign_id}", daemon=True)
        self.store, self.campaign_id, self.owner, self.ttl = store, campaign_id, owner, ttl
        self.lost = False
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.ttl / 4):
            try:
                renewed = self.store.renew_lease(self.campaign_id, self.owner, self.ttl)
            except Exception as exc:  # a store hiccup: try again next beat, the lease has slack
                log.warning("campaign %s: lease heartbeat failed (%s); retrying", self.campaign_id, one_line(exc))
                continue
            if not renewed:
                self.lost = True
                log.error("campaign %s: lease lost to another run; stopping this one", self.campaign_id)
                # a real signal aimed at the main thread wakes it from a blocking wait
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def acquire(
    store: Store,
    campaign_id: int,
    name: str,
    *,
    wait: bool = False,
    poll: float = 5.0,
    ttl: float = LEASE_SECONDS,
    owner: str = PROCESS_OWNER,
) -> LeaseInfo:
    """Take the campaign's lease, waiting for a live owner to finish if ``wait``; raises
    :class:`LeaseHeld` naming the owner otherwise."""
    announced = False
    while True:
        lease = store.acquire_lease(campaign_id, owner, HOST, os.getpid(), ttl, holder_gone=holder_gone)
        if lease.owner == owner:
            return lease
        if not wait:
            raise LeaseHeld(f"{describe(lease, name)}; wait for it with `alforge run --wait`, or stop that run")
        if not announced:
            print(f"{describe(lease, name)}; waiting for it to finish", file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll)


@contextmanager
def campaign_lease(
    store: Store,
    campaign_id: int,
    name: str,
    *,
    wait: bool = False,
    poll: float = 5.0,
    ttl: float = LEASE_SECONDS,
    owner: str = PROCESS_OWNER,
) -> Iterator[LeaseInfo]:
    """Own campaign ``campaign_id`` for the ``with`` block (see the module docstring)."""
    lease = acquire(store, campaign_id, name, wait=wait, poll=poll, ttl=ttl, owner=owner)
    beat = _Heartbeat(store, campaign_id, owner, ttl)
    beat.start()
    status: str | None = None
    message: str | None = None
    held = (store.url, campaign_id)
    if owner == PROCESS_OWNER:  # the owner id this process's label claims are made under
        with _HELD_LOCK:
            _HELD.add(held)
    try:
        yield lease
    except BaseException as exc:
        if beat.lost:  # the heartbeat interrupted the main thread (as SIGINT: running codes are killed)
            raise LeaseLost(f"campaign {name!r}: this run's lease expired and another run took it over") from None
        status = "failed" if isinstance(exc, Exception) else "interrupted"
        message = one_line(exc)
        raise
    finally:
        with _HELD_LOCK:
            _HELD.discard(held)
        beat.stop()
        try:
            store.release_lease(campaign_id, owner, status, message)
        except Exception as exc:  # never hide the exception that ended the run; the lease will expire
            log.error("campaign %s: could not release its lease: %s", campaign_id, one_line(exc))
