"""What to do after a failed labelling attempt: retry (perhaps with adjusted settings), give up, or
quarantine the structure.

:class:`RetryPolicy` is pure — a function of the failure class, the structure's earlier failures and
the kwargs of the attempt that failed — so the store and the flows can replay or unit-test every
decision. :func:`label_with_policy` is the one loop that applies it and returns a record of *every*
attempt, successful or not, for the store to keep.

Defaults, and why:

* ``CRASH`` — never retried: the same input crashes the same way (a missing pseudopotential, a bad
  basis name); retrying only burns core-hours.
* ``TIMEOUT`` — retried once: a node can be slow or oversubscribed.
* ``SCF_NOT_CONVERGED`` — retried once with more iterations and gentler mixing (a per-code hook);
  for a code without a hook there is nothing sensible to change, so it is not retried.
* ``NON_FINITE`` / ``IMPLAUSIBLE`` — not retried: the structure itself is suspect (atoms on top of
  each other); it is the selector's job to learn from that, not the labeller's to insist.
* ``NO_LABEL`` — never retried, and the structure is quarantined at once: a lookup labeller that does
  not have a structure's label never will.
* After ``quarantine_after`` failed attempts in total (across rounds), the structure is quarantined:
  the campaign never offers it to a labeller again.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ase import Atoms

from alforge.labelling.base import FailureClass, Label, LabelFailure, Labeller

KwargsHook = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Retry:
    """Run again with the attempt's kwargs updated by ``kwargs_update`` (possibly empty)."""

    kwargs_update: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GiveUp:
    """No further attempt now; the structure stays eligible for a later round."""

    reason: str


@dataclass(frozen=True)
class Quarantine:
    """No attempt ever again: the structure failed too often."""

    reason: str


Decision = Retry | GiveUp | Quarantine


# -- SCF hooks: the attempt's kwargs in, the kwargs to change out ------------------------------
def _espresso_scf(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    from alforge.labelling.espresso import _nested_input

    input_data = _nested_input(kwargs.get("input_data"))
    electrons = input_data["electrons"]
    electrons["electron_maxstep"] = 2 * int(electrons.get("electron_maxstep", 100))
    electrons["mixing_beta"] = max(0.05, 0.5 * float(electrons.get("mixing_beta", 0.7)))
    return {"input_data": input_data}


def _cp2k_scf(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"max_scf": 2 * int(kwargs.get("max_scf", 50)),
            "mixing_alpha": max(0.05, 0.5 * float(kwargs.get("mixing_alpha", 0.4)))}


def _pyscf_scf(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # Second-order SCF is PySCF's robust fallback; it has no mixing parameter to soften.
    return {"max_cycle": 2 * int(kwargs.get("max_cycle", 50)), "newton": True}


def _xtb_scf(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # xtb exposes no mixing parameter on its command line; more iterations is the available lever.
    return {"iterations": 2 * int(kwargs.get("iterations", 250))}


def _faulty_scf(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"scf_iterations": 2 * int(kwargs.get("scf_iterations", 50))}


#: The default SCF_NOT_CONVERGED hook per registry name.
SCF_HOOKS: dict[str, KwargsHook] = {
    "espresso": _espresso_scf, "cp2k": _cp2k_scf, "pyscf": _pyscf_scf, "xtb": _xtb_scf,
    "faulty": _faulty_scf,
}

DEFAULT_MAX_RETRIES: dict[FailureClass, int] = {
    FailureClass.CRASH: 0,
    FailureClass.TIMEOUT: 1,
    FailureClass.SCF_NOT_CONVERGED: 1,
    FailureClass.NON_FINITE: 0,
    FailureClass.IMPLAUSIBLE: 0,
    FailureClass.NO_LABEL: 0,
}

#: Classes no retry and no later round can fix: the structure is quarantined at once.
NEVER_LABELLABLE: frozenset[FailureClass] = frozenset({FailureClass.NO_LABEL})


@dataclass(frozen=True)
class RetryPolicy:
    """Per failure class: how many retries, and an optional hook adjusting the kwargs for them."""

    max_retries: Mapping[FailureClass, int] = field(default_factory=lambda: dict(DEFAULT_MAX_RETRIES))
    hooks: Mapping[FailureClass, KwargsHook] = field(default_factory=dict)
    quarantine_after: int = 3

    @classmethod
    def for_labeller(cls, spec: str, **overrides: Any) -> RetryPolicy:
        """The default policy for a registry name: its SCF hook, or no SCF retry if it has none."""
        max_retries = dict(DEFAULT_MAX_RETRIES)
        hooks: dict[FailureClass, KwargsHook] = {}
        if spec in SCF_HOOKS:
            hooks[FailureClass.SCF_NOT_CONVERGED] = SCF_HOOKS[spec]
        else:
            max_retries[FailureClass.SCF_NOT_CONVERGED] = 0
        return cls(**{"max_retries": max_retries, "hooks": hooks, **overrides})

    def decide(
        self,
        failure_class: FailureClass | str,
        attempts: Sequence[FailureClass | str | AttemptRecord],
        kwargs: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Decide after a failure of class ``failure_class``.

        attempts: the structure's *earlier* failed attempts (any round, oldest first, not counting
        this one), as failure classes or attempt records. kwargs: those of the failed attempt, which
        a hook adjusts.
        """
        failure_class = FailureClass(failure_class)
        history = [FailureClass(a.failure_class if isinstance(a, AttemptRecord) else a) for a in attempts]
        total = len(history) + 1
        if failure_class in NEVER_LABELLABLE:
            return Quarantine(f"{failure_class.value}: the labeller can never label this structure")
        if total >= self.quarantine_after:
            return Quarantine(f"{total} failed attempts (limit {self.quarantine_after}); last: {failure_class.value}")
        retries_used = history.count(failure_class)
        allowed = int(self.max_retries.get(failure_class, 0))
        if retries_used >= allowed:
            return GiveUp(f"{failure_class.value}: {retries_used} of {allowed} retries used")
        hook = self.hooks.get(failure_class)
        return Retry(hook(copy.deepcopy(dict(kwargs or {}))) if hook is not None else {})


@dataclass
class AttemptRecord:
    """One labelling attempt as the store keeps it (``failure_class`` None means it succeeded)."""

    attempt: int
    kwargs: dict[str, Any]
    wall_time: float
    failure_class: FailureClass | None = None
    message: str = ""
    output_tail: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    decision: str | None = None  # "retry", "give_up" or "quarantine" after a failure
    decision_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failure_class"] = self.failure_class.value if self.failure_class is not None else None
        return out


def label_with_policy(
    labeller_factory: Callable[..., Labeller],
    atoms: Atoms,
    policy: RetryPolicy,
    kwargs: Mapping[str, Any] | None = None,
    previous_failures: Sequence[FailureClass | str | AttemptRecord] = (),
) -> tuple[Label | None, list[AttemptRecord]]:
    """Label ``atoms``, retrying as ``policy`` says; return the label (or None) and every attempt.

    ``labeller_factory(**kwargs)`` builds the labeller for each attempt (a retry may change its
    kwargs), e.g. ``functools.partial(make_labeller, "espresso")``. Errors building it are
    configuration errors and propagate; anything raised while labelling is recorded — an exception
    other than LabelFailure as a CRASH with its traceback as the tail. ``previous_failures`` are the
    structure's failed attempts from earlier rounds, which count towards quarantine.
    """
    current = dict(kwargs or {})
    history = list(previous_failures)
    records: list[AttemptRecord] = []
    while True:
        labeller = labeller_factory(**current)
        start = time.perf_counter()
        try:
            label = labeller.label(atoms)
        except LabelFailure as exc:
            failure = exc
        except Exception as exc:  # a labeller bug must not take the campaign down
            failure = LabelFailure(FailureClass.CRASH, f"{type(exc).__name__}: {exc}",
                                   output_tail=traceback.format_exc(limit=-10))
        else:
            records.append(AttemptRecord(len(records) + 1, copy.deepcopy(current), time.perf_counter() - start,
                                         metadata=dict(label.metadata)))
            return label, records
        decision = policy.decide(failure.failure_class, history, current)
        records.append(AttemptRecord(
            len(records) + 1, copy.deepcopy(current), time.perf_counter() - start, failure.failure_class,
            failure.message, failure.output_tail, dict(failure.metadata),
            {Retry: "retry", GiveUp: "give_up", Quarantine: "quarantine"}[type(decision)],
            getattr(decision, "reason", ""),
        ))
        history.append(failure.failure_class)
        if not isinstance(decision, Retry):
            return None, records
        current = {**current, **decision.kwargs_update}
