"""What every task shares: one :class:`Store` per process and database URL."""

from __future__ import annotations

from functools import lru_cache

from alforge.storage import Store


@lru_cache(maxsize=8)
def open_store(url: str) -> Store:
    """Tasks receive the URL (small and serialisable) and open the store once per process."""
    return Store(url)
