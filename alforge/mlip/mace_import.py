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

from alforge.mlip.e3nn_import import e3nn_o3

e3nn_o3()
import mace.calculators  # noqa: E402, F401
import mace.modules  # noqa: E402, F401

os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
