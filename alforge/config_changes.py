"""What changed in a campaign's settings since its last run, and whether the run may go on.

A rerun with another labeller would silently mix calculators (two finished labels for one structure,
training on either), and a rerun with other MLIP settings would silently mix models. So a rerun is
compared field by field with the campaign's stored config:

* a different **labeller identity** (the ``(calculator, params_hash)`` its labels are stored under,
  which covers only the settings that change the physics: see each labeller's docstring) is refused
  outright: a new labeller means a new campaign, or relabelling (a future ``alforge relabel``);
* a change under ``mlip`` is refused unless accepted (``alforge run --accept-changes``): it changes
  the models trained from now on, not the labels;
* other changes (labeller settings outside its identity, such as concurrency, failure budget,
  retries, timeouts or logging options; stopping, selector, exploration, sources) are taken as they
  come: raising the failure budget of a paused campaign is the documented way to resume it.

Every accepted change is kept in the store's config history (:meth:`Store.record_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Top-level sections whose changes must be accepted explicitly.
GUARDED = ("mlip",)


class ConfigChanged(RuntimeError):
    """A rerun's settings differ from the stored ones in a way the user has not accepted."""


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {self.old!r} -> {self.new!r}"

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


def diff(old: Any, new: Any, prefix: str = "") -> list[Change]:
    """Every leaf that differs between two JSON-like configs, as dotted field names (a key present
    on one side only shows ``None`` on the other)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Change] = []
        for key in sorted(set(old) | set(new), key=str):
            field = f"{prefix}.{key}" if prefix else str(key)
            out += diff(old.get(key), new.get(key), field)
        return out
    return [] if old == new else [Change(prefix, old, new)]


def check_changes(
    name: str,
    old_config: dict[str, Any],
    old_identity: tuple[str, str] | None,
    new_config: dict[str, Any],
    new_identity: tuple[str, str],
    accept: bool,
) -> list[Change]:
    """The changes from the stored config to the new one, if the run may go on with them; raises
    :class:`ConfigChanged` saying what changed otherwise (see the module docstring).

    ``old_identity`` None (a config stored before identities were) compares the labeller's name
    and kwargs instead. A section the stored config lacks (``alforge import`` creates a campaign
    with neither labeller nor MLIP settings) is new, not changed.
    """
    changes = diff(old_config, new_config)
    labeller = [c for c in changes if c.field.split(".")[0] == "labeller"]
    if "labeller" not in old_config:
        identity_changed = False
    elif old_identity is None:
        identity_changed = any(c.field == "labeller.name" or c.field.startswith("labeller.kwargs") for c in labeller)
    else:
        identity_changed = tuple(old_identity) != tuple(new_identity)
    if identity_changed:
        was = "/".join(old_identity) if old_identity else "the stored labeller"
        raise ConfigChanged(
            f"campaign {name!r}: the labeller changed ({was} -> {'/'.join(new_identity)}): "
            + "; ".join(map(str, labeller))
            + ". Its labels would mix with the stored ones: a new labeller means a new campaign (give it "
            "another name), or relabelling the stored structures (a future `alforge relabel`)"
        )
    guarded = [c for c in changes if c.field.split(".")[0] in GUARDED and c.field.split(".")[0] in old_config]
    if guarded and not accept:
        raise ConfigChanged(
            f"campaign {name!r}: settings differ from the stored ones: "
            + "; ".join(map(str, guarded))
            + ". They change the models trained from now on, not the labels; rerun with --accept-changes"
            " to go on with them"
        )
    return changes
