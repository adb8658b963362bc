"""Label with any ASE calculator, given by a registered name or a ``module:factory`` import path.

This is how a user's existing calculator set-up works unchanged: ``factory(**kwargs)`` must return an
``ase.calculators.calculator.Calculator``.
"""

from __future__ import annotations

import importlib
import inspect
import time
from typing import Any, Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from alforge.labelling.base import (
    FailureClass,
    Label,
    LabelFailure,
    Labeller,
    check_label,
    params_hash,
    provenance_metadata,
)


#: Fast analytic calculators shipped with ASE, usable by short name (imported on first use).
BUILTIN_CALCULATORS: dict[str, str] = {"emt": "ase.calculators.emt:EMT", "lj": "ase.calculators.lj:LennardJones"}


def resolve_factory(spec: str) -> Callable[..., Calculator]:
    """Turn ``"emt"`` or ``"package.module:factory"`` into a callable, with errors that name ``spec``."""
    if spec in BUILTIN_CALCULATORS:
        module_name, class_name = BUILTIN_CALCULATORS[spec].split(":")
        return getattr(importlib.import_module(module_name), class_name)
    if ":" not in spec:
        raise ValueError(
            f"labeller {spec!r} is neither a built-in name ({', '.join(BUILTIN_CALCULATORS)}) "
            "nor a 'module:factory' import path"
        )
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"labeller {spec!r}: cannot import module {module_name!r}: {exc}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"labeller {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise ValueError(f"labeller {spec!r}: {attr!r} is not callable")
    return factory


def accepted_kwargs(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` is known to accept, or None when that cannot be known.

    An ASE calculator class takes its ``default_parameters`` and the named arguments of its
    ``__init__`` chain; everything else, ASE's ``Calculator.set`` stores without a word and the
    calculator never reads (a misspelt ``asap_cutof`` would run with the default). A calculator that
    overrides ``set`` (file-based codes with long keyword lists) and a function that takes
    ``**kwargs`` handle keywords their own way: None, nothing is checked here.
    """
    if isinstance(factory, type) and issubclass(factory, Calculator):
        if factory.set is not Calculator.set:
            return None
        names = set(getattr(factory, "default_parameters", {}))
        for cls in factory.__mro__:
            if "__init__" in vars(cls):
                names |= _named_parameters(cls.__init__) - {"self"}
        return names
    return _named_parameters(factory) if not _takes_var_keyword(factory) else None


def _named_parameters(func: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _takes_var_keyword(func: Callable[..., Any]) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return True  # unknown: assume it does


def check_kwargs(spec: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise ValueError naming ``spec``, the unknown kwargs and the accepted ones."""
    known = accepted_kwargs(factory)
    unknown = sorted(set(kwargs) - known) if known is not None else []
    if unknown:
        raise ValueError(
            f"labeller {spec!r}: unknown kwarg(s) {', '.join(unknown)}; it accepts {', '.join(sorted(known))}"
        )


class ASECalculatorLabeller(Labeller):
    """Runs ``factory(**kwargs)`` once and reuses the calculator for every structure.

    The labels' identity (``params_hash``) covers the spec and every kwarg that changes the physics.
    A factory names the kwargs that do not (log files, verbosity, a delay) in a ``non_physics_kwargs``
    attribute (a collection of names): they are left out of the hash, so changing one is a change of
    settings (``alforge run --accept-changes``), not a new calculator. Without it every kwarg counts.
    """

    def __init__(self, spec: str, kwargs: dict[str, Any] | None = None, max_force: float | None = None):
        self.spec = spec
        self.kwargs = dict(kwargs or {})
        self.max_force = max_force
        self.name = spec
        self._factory = resolve_factory(spec)
        check_kwargs(spec, self._factory, self.kwargs)
        self._calc: Calculator | None = None

    def provenance(self) -> dict[str, Any]:
        import ase

        return {
            "code": self.spec,
            "version": f"ase {ase.__version__}",
            "params_hash": params_hash({"spec": self.spec, **self.physics_kwargs()}),
        }

    def physics_kwargs(self) -> dict[str, Any]:
        """The kwargs that determine the labels: all but the factory's ``non_physics_kwargs``."""
        ignored = set(getattr(self._factory, "non_physics_kwargs", ()))
        return {k: v for k, v in self.kwargs.items() if k not in ignored}

    def label(self, atoms: Atoms) -> Label:
        if self._calc is None:
            self._calc = self._factory(**self.kwargs)
        work = atoms.copy()
        work.calc = self._calc
        start = time.perf_counter()
        try:
            try:
                energy = float(work.get_potential_energy())
                forces = np.array(work.get_forces(), dtype=float)
                stress = None
                if work.pbc.all() and "stress" in getattr(self._calc, "implemented_properties", ()):
                    stress = np.array(work.get_stress(voigt=False), dtype=float)
            except LabelFailure:
                raise
            except Exception as exc:  # a calculator failure is data, not a crash
                raise LabelFailure(FailureClass.CRASH, f"{self.spec}: {type(exc).__name__}: {exc}") from exc
            label = Label(energy, forces, stress, provenance_metadata(self.provenance(), time.perf_counter() - start))
            return check_label(label, len(atoms), self.max_force)
        except LabelFailure as failure:
            failure.metadata = {**provenance_metadata(self.provenance(), time.perf_counter() - start),
                                **failure.metadata}
            raise
