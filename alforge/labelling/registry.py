"""One entry point from a campaign file's ``labeller: NAME`` + kwargs to a :class:`Labeller`.

Names map to lazily imported builders, so ``import alforge.labelling.registry`` needs neither PySCF
nor any DFT code; a name's dependencies are imported only when that labeller is built.

* ``emt``, ``lj`` and any ``module:factory`` import path → :class:`ASECalculatorLabeller`
  (``max_force`` is the labeller's; every other kwarg goes to the calculator factory);
* ``espresso``, ``cp2k``, ``xtb``, ``pyscf``, ``external``, ``faulty`` → their labeller classes,
  with the kwargs their constructors document;
* ``lookup`` → :class:`~alforge.labelling.lookup.LookupLabeller`: the labels a file already holds
  (``files``, ``energy_key``/``forces_key``/``stress_key``), matched by canonical structure hash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from alforge.labelling.ase_calculator import BUILTIN_CALCULATORS, ASECalculatorLabeller
from alforge.labelling.base import Labeller

#: Registry name → "module:class" of the labeller, imported on first use.
LABELLERS: dict[str, str] = {
    "espresso": "alforge.labelling.espresso:EspressoLabeller",
    "cp2k": "alforge.labelling.cp2k:CP2KLabeller",
    "xtb": "alforge.labelling.xtb:XTBLabeller",
    "pyscf": "alforge.labelling.pyscf_calc:PySCFLabeller",
    "external": "alforge.labelling.external:ExternalLabeller",
    "faulty": "alforge.labelling.faulty:FaultyLabeller",
    "lookup": "alforge.labelling.lookup:LookupLabeller",
}


def available() -> list[str]:
    """Every registered name (``module:factory`` paths are accepted as well)."""
    return sorted([*BUILTIN_CALCULATORS, *LABELLERS])


def _ase_labeller(spec: str, kwargs: dict[str, Any]) -> Labeller:
    max_force = kwargs.pop("max_force", None)
    return ASECalculatorLabeller(spec, kwargs, max_force=max_force)


def make_labeller(spec: str, **kwargs: Any) -> Labeller:
    """Build the labeller named ``spec`` with ``kwargs``.

    Raises ValueError naming ``spec`` and the registered names for an unknown spec, and TypeError
    naming ``spec`` for kwargs its constructor does not take.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"labeller spec must be a non-empty string, got {spec!r}; options: {', '.join(available())}")
    if spec in LABELLERS:
        module_name, class_name = LABELLERS[spec].split(":")
        cls: Callable[..., Labeller] = getattr(importlib.import_module(module_name), class_name)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise TypeError(f"labeller {spec!r}: {exc}") from None
    if spec in BUILTIN_CALCULATORS or ":" in spec:
        return _ase_labeller(spec, dict(kwargs))
    raise ValueError(
        f"unknown labeller {spec!r}; options: {', '.join(available())}, or a 'module:factory' import path"
    )
