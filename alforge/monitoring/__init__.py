"""Watching a campaign: progress bars (``progress.py``) and the naming rules Prefect's artifacts need."""

from __future__ import annotations

import re

_NOT_KEY = re.compile(r"[^a-z0-9]+")

#: ``logger.info(..., extra=DETAIL)``: a record for the Prefect UI and ``alforge run --verbose``, kept
#: off the default console (one line per training epoch would drown the step summaries).
DETAIL = {"alforge_detail": True}


def slug(name: str) -> str:
    """``name`` as a Prefect artifact key: Prefect accepts only lowercase letters, digits and dashes,
    so every run of other characters becomes one dash (leading/trailing dashes dropped)."""
    key = _NOT_KEY.sub("-", name.lower()).strip("-")
    if not key:
        raise ValueError(f"campaign name {name!r} has no letter or digit to make an artifact key from")
    return key
