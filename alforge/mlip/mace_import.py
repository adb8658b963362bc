"""Import e3nn and mace without leaving ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` behind.

Importing ``mace`` (and again ``mace.calculators``) sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in
``os.environ``, for e3nn's sake: e3nn's import unpickles a constants file holding ``slice`` objects,
which torch >= 2.6 refuses by default. Left set, every later ``torch.load`` without an explicit
``weights_only`` would unpickle arbitrary objects, and every child process (the labellers' codes and
their Python helpers) would inherit it. So e3nn is imported first with only ``slice`` allow-listed,
then mace, and the variable is removed again. Import this module before any other mace or e3nn
import.
"""

from __future__ import annotations

import os
import sys

import torch

if "e3nn.o3" not in sys.modules:
    with torch.serialization.safe_globals([slice]):
        import e3nn.o3  # noqa: F401
import mace.calculators  # noqa: E402, F401
import mace.modules  # noqa: E402, F401

os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
