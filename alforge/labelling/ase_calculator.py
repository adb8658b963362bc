"""Label with any ASE calculator, given by a registered name or a ``module:factory`` import path.

This is how a user's existing calculator set-up works unchanged: ``factory(**kwargs)`` must return an
``ase.calculators.calculator.Calculator``.
"""

from __future__ import annotations

import importlib
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


def _emt(**kwargs: Any) -> Calculator:
    from ase.calculators.emt import EMT

    return EMT(**kwargs)


def _lj(**kwargs: Any) -> Calculator:
    from ase.calculators.lj import LennardJones

    return LennardJones(**kwargs)


#: Fast analytic calculators shipped with ASE, usable by short name.
BUILTIN_CALCULATORS: dict[str, Callable[..., Calculator]] = {"emt": _emt, "lj": _lj}


def resolve_factory(spec: str) -> Callable[..., Calculator]:
    """Turn ``"emt"`` or ``"package.module:factory"`` into a callable, with errors that name ``spec``."""
    if spec in BUILTIN_CALCULATORS:
        return BUILTIN_CALCULATORS[spec]
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


class ASECalculatorLabeller(Labeller):
    """Runs ``factory(**kwargs)`` once and reuses the calculator for every structure."""

    def __init__(self, spec: str, kwargs: dict[str, Any] | None = None, max_force: float | None = None):
        self.spec = spec
        self.kwargs = dict(kwargs or {})
        self.max_force = max_force
        self.name = spec
        self._factory = resolve_factory(spec)
        self._calc: Calculator | None = None

    def provenance(self) -> dict[str, Any]:
        import ase

        return {
            "code": self.spec,
            "version": f"ase {ase.__version__}",
            "params_hash": params_hash({"spec": self.spec, **self.kwargs}),
        }

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
