"""Selectors: which candidates deserve a label.

``make_selector(name, **params)`` returns a configured :class:`~alforge.selectors.base.Selector`;
``register`` adds one under a name usable from a campaign file.
"""

from __future__ import annotations

from typing import Any, Callable

from alforge.selectors.base import Selection, Selector

_REGISTRY: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make ``cls`` available as ``make_selector(cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_selector_class(name: str) -> type[Selector]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown selector {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def make_selector(name: str, **params: Any) -> Selector:
    """Build the selector registered as ``name`` with its hyperparameters."""
    cls = get_selector_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for selector {name!r}: {exc}") from None


def _load_builtins() -> None:
    # Imported lazily so that `alforge.selectors.base` stays importable on its own and the
    # registry fills on first use.
    from alforge.selectors import builtin  # noqa: F401


__all__ = ["Selection", "Selector", "register", "make_selector", "available", "get_selector_class"]
