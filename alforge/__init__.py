"""alforge: an active-learning workflow engine for machine-learned interatomic potentials.

``import alforge`` stays light (no torch, no Prefect): the Python API, :class:`alforge.Campaign`,
is imported on first use.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alforge.api import Campaign

try:
    __version__ = metadata.version("alforge")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Campaign", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy attributes: ``alforge.Campaign`` imports the API (and pandas) only when asked for."""
    if name == "Campaign":
        from alforge.api import Campaign

        return Campaign
    raise AttributeError(f"module 'alforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Campaign"])
