"""A fault-injecting labeller: real failure paths on demand, for tests and campaign rehearsals.

It wraps any registered labeller and, for structures picked by a deterministic rule, fails in one
of four ways instead of (or before) labelling:

``crash``  raises a ``CRASH`` failure, as a code that exits non-zero would;
``hang``   runs ``sleep hang_seconds`` through the same process runner as the real codes, so with a
           ``timeout`` the attempt is killed and classified ``TIMEOUT`` exactly as a hung pw.x would
           be (without one it is merely slow, and then labels normally);
``scf``    reports ``SCF_NOT_CONVERGED``, unless ``scf_iterations >= scf_iterations_needed`` — so a
           retry policy that raises the iteration count (as the default one does) heals it;
``nan``    returns the inner label with a NaN energy, which the label check turns into ``NON_FINITE``.

Structures are picked by ``atoms.info[info_key]`` naming a mode (the store or a test tags them), or
by ``rules``: ``[{"mode": "crash", "modulo": 5, "remainder": 0}, ...]`` applied to an integer digest
of the structure, so the same structures fail in every process and on every run. Everything is a
plain kwarg, so a campaign file can say ``labeller: faulty`` with ``inner: emt`` and the rules.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from alforge.labelling.base import (
    FailureClass,
    Label,
    LabelFailure,
    Labeller,
    check_label,
    provenance_metadata,
)
from alforge.labelling.runner import ProcessTimeout, run_process, structure_digest

MODES = ("crash", "hang", "scf", "nan")


class FaultyLabeller(Labeller):
    """Wraps ``make_labeller(inner, **inner_kwargs)`` and injects faults for selected structures."""

    name = "faulty"

    def __init__(
        self,
        inner: str = "emt",
        inner_kwargs: Mapping[str, Any] | None = None,
        *,
        info_key: str = "fault",
        rules: Sequence[Mapping[str, Any]] = (),
        timeout: float | None = None,
        hang_seconds: float = 3600.0,
        scf_iterations: int = 50,
        scf_iterations_needed: int | None = None,
        max_force: float | None = None,
    ) -> None:
        """
        inner, inner_kwargs: the labeller that does the real work (any registry spec).
        info_key: ``atoms.info`` key whose value, if a mode name, selects that fault.
        rules: ``{"mode": m, "modulo": n, "remainder": r}`` dicts; the first whose
            ``digest % n == r`` applies (r defaults to 0).
        timeout: time limit for the ``hang`` fault (s). hang_seconds: how long it sleeps.
        scf_iterations, scf_iterations_needed: the ``scf`` fault clears once the former reaches the
            latter (None: never).
        max_force: passed to the label check of the ``nan`` and healthy paths.
        """
        from alforge.labelling.registry import make_labeller

        self.inner_spec = inner
        self.inner_kwargs = dict(inner_kwargs or {})
        self.inner = make_labeller(inner, **self.inner_kwargs)
        self.info_key = info_key
        self.rules = [self._check_rule(i, dict(r)) for i, r in enumerate(rules)]
        self.timeout = timeout
        self.hang_seconds = float(hang_seconds)
        self.scf_iterations = int(scf_iterations)
        self.scf_iterations_needed = scf_iterations_needed
        self.max_force = max_force

    @staticmethod
    def _check_rule(index: int, rule: dict[str, Any]) -> dict[str, Any]:
        unknown = set(rule) - {"mode", "modulo", "remainder"}
        if rule.get("mode") not in MODES or unknown:
            raise ValueError(
                f"faulty labeller: rules[{index}] = {rule!r}: needs mode in {MODES}, modulo, optional remainder"
            )
        modulo = int(rule.get("modulo", 0))
        if modulo < 1:
            raise ValueError(f"faulty labeller: rules[{index}]: modulo must be a positive integer")
        return {"mode": rule["mode"], "modulo": modulo, "remainder": int(rule.get("remainder", 0)) % modulo}

    def provenance(self) -> dict[str, Any]:
        inner = self.inner.provenance()
        return {**inner, "code": f"faulty[{inner.get('code', self.inner_spec)}]"}

    def fault_for(self, atoms: Atoms) -> str | None:
        """The fault this structure gets, or None: the info tag first, then the first matching rule."""
        tagged = atoms.info.get(self.info_key)
        if tagged in MODES:
            return str(tagged)
        digest = int(structure_digest(atoms), 16)
        for rule in self.rules:
            if digest % rule["modulo"] == rule["remainder"]:
                return str(rule["mode"])
        return None

    def label(self, atoms: Atoms) -> Label:
        start = time.perf_counter()
        mode = self.fault_for(atoms)
        try:
            if mode == "crash":
                raise LabelFailure(FailureClass.CRASH, "faulty: injected crash",
                                   output_tail="faulty: injected crash (simulated non-zero exit)")
            if mode == "scf" and (self.scf_iterations_needed is None
                                  or self.scf_iterations < self.scf_iterations_needed):
                raise LabelFailure(
                    FailureClass.SCF_NOT_CONVERGED,
                    f"faulty: injected SCF non-convergence after {self.scf_iterations} iterations",
                    output_tail=f"convergence NOT achieved after {self.scf_iterations} iterations (injected)",
                )
            if mode == "hang":
                self._hang()
            label = self.inner.label(atoms)
            if mode == "nan":
                label.energy = math.nan
            label.metadata = {**label.metadata, **provenance_metadata(self.provenance(), time.perf_counter() - start),
                              "injected_fault": mode}
            return check_label(label, len(atoms), self.max_force)
        except LabelFailure as failure:
            failure.metadata = {**provenance_metadata(self.provenance(), time.perf_counter() - start),
                                "injected_fault": mode, "structure": structure_digest(atoms), **failure.metadata}
            raise

    def _hang(self) -> None:
        with tempfile.TemporaryDirectory(prefix="faulty-hang-") as tmp:
            workdir = Path(tmp)
            try:
                run_process(["sleep", f"{self.hang_seconds:g}"], workdir, workdir / "stdout", workdir / "stderr",
                            timeout=self.timeout)
            except ProcessTimeout as exc:
                raise LabelFailure(
                    FailureClass.TIMEOUT, f"faulty: injected hang: {exc}",
                    output_tail=f"faulty: sleep {self.hang_seconds:g} killed after {self.timeout:g} s",
                ) from None
