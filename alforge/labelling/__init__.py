"""Labellers turn a structure into a reference label (energy, forces, stress) or a classified failure.

Entry points: :func:`make_labeller` (registry name or ``module:factory`` → :class:`Labeller`),
:class:`RetryPolicy` and :func:`label_with_policy` (what to do after a failure, and every attempt
recorded). The code-specific labellers are imported lazily by the registry, so importing this package
needs neither PySCF nor any DFT executable.
"""

from alforge.labelling.base import FailureClass, Label, LabelFailure, Labeller, check_label, params_hash
from alforge.labelling.policy import AttemptRecord, GiveUp, Quarantine, Retry, RetryPolicy, label_with_policy
from alforge.labelling.registry import available, make_labeller

__all__ = [
    "AttemptRecord",
    "FailureClass",
    "GiveUp",
    "Label",
    "LabelFailure",
    "Labeller",
    "Quarantine",
    "Retry",
    "RetryPolicy",
    "available",
    "check_label",
    "label_with_policy",
    "make_labeller",
    "params_hash",
]
