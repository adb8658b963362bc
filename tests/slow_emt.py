"""A labeller factory for resume tests: EMT that takes ``delay`` seconds and logs every finished
calculation (pid and structure hash) so a test can prove what was computed by which run."""

from __future__ import annotations

import os
import time

from ase.calculators.emt import EMT

from alforge.structure_hash import canonical_hash


class SlowLoggingEMT(EMT):
    def __init__(self, delay: float, log: str, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay
        self.log = log

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or [])
        time.sleep(self.delay)
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {canonical_hash(self.atoms)}\n")


def make(delay: float = 1.0, log: str = "calls.log") -> SlowLoggingEMT:
    return SlowLoggingEMT(delay, log)


#: How long a calculation takes and where it is logged do not change a label.
make.non_physics_kwargs = ("delay", "log")
