"""What every task shares: one :class:`Store` per process and database URL, found without a password.

Prefect records every flow run's parameters in its API (and shows them in its UI), and a store URL
may carry a database password. So flows never take a URL: the campaign flow binds its campaign id
to its store (:func:`bind_campaign`) and subflows take the id (:func:`campaign_store_url`); a flow
that starts before a campaign exists takes :func:`store_handle`, the redacted URL of a store this
process has opened. Tasks that run in this process may still take the URL itself; label and MD
walker tasks, which may run on a Dask worker, take a :class:`~alforge.tasks.worker.WorkerContext`.
"""

from __future__ import annotations

from functools import lru_cache

from alforge.storage import Store

_HANDLES: dict[str, str] = {}  # redacted URL → the URL (or $env:/$secret: reference) it was opened with
_CAMPAIGNS: dict[int, str] = {}  # campaign id → URL of its store, for this process's campaigns


@lru_cache(maxsize=8)
def _open(url: str) -> Store:
    store = Store(url)
    _HANDLES[store.url] = url
    return store


def open_store(url: str) -> Store:
    """The process's one :class:`Store` for ``url``: a URL, a ``$env:``/``$secret:`` reference or a
    :func:`store_handle` of a store opened earlier in this process."""
    return _open(_HANDLES.get(url, url))


def store_handle(url: str) -> str:
    """Open ``url``'s store and return its redacted URL, which :func:`open_store` accepts in this
    process: safe to pass as a flow parameter."""
    return open_store(url).url


def bind_campaign(campaign_id: int, url: str) -> None:
    """Note that campaign ``campaign_id`` of this process lives in ``url``'s store. Ids are per store,
    so a later campaign with the same id in another store rebinds it: one campaign flow at a time."""
    _CAMPAIGNS[campaign_id] = url


def campaign_store_url(campaign_id: int) -> str:
    """The URL :func:`bind_campaign` noted for ``campaign_id`` (tasks take it; it never leaves the process)."""
    try:
        return _CAMPAIGNS[campaign_id]
    except KeyError:
        raise RuntimeError(f"campaign {campaign_id} has no store bound in this process (bind_campaign)") from None
