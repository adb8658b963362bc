"""The SQL store: every structure, label, model, feature set and selection of every campaign.

It knows nothing of Prefect (see docs/ARCHITECTURE.md); tasks call :class:`Store` methods.
"""

from alforge.storage.store import Store

__all__ = ["Store"]
