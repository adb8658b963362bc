"""What a task needs to do its work in any process: a thread of the campaign's process or a Dask
worker on another host, which shares no memory with the campaign (alforge/flows/execution.py).

A :class:`WorkerContext` is built once per batch in the campaign's process and passed to every
label and walker task. It carries no password, so it may be a flow parameter (Prefect records
those): the store is a reference the task's process can resolve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from alforge.storage import Store
from alforge.tasks.common import open_store


@dataclass(frozen=True)
class WorkerContext:
    #: the store: a redacted handle (tasks in the campaign's process), a ``$env:``/``$secret:``
    #: reference or a URL without a password (tasks anywhere)
    store: str
    #: owner id of the campaign's lease: label claims are made and stored under it, so the
    #: campaign's heartbeat renews them whichever process computes the label
    owner: str
    #: scratch root of the labellers' job directories unless the worker's ``ALFORGE_SCRATCH`` names one
    scratch: str

    def open(self) -> Store:
        """This process's store for the campaign, with the scratch root set for its labellers."""
        os.environ.setdefault("ALFORGE_SCRATCH", self.scratch)
        return open_store(self.store)
