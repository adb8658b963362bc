"""Import ``e3nn.o3`` with only ``slice`` allow-listed for torch's weights-only unpickler.

e3nn's import unpickles a constants file holding ``slice`` objects, which torch >= 2.6 refuses by
default; mace works around that by setting ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` process-wide, which
alforge must not leave behind (see :mod:`alforge.mlip.mace_import`). This module imports only torch
and e3nn, so reading a campaign file can check irreps without importing mace.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch


def e3nn_o3() -> ModuleType:
    """``e3nn.o3``, imported on first use with ``slice`` the only extra global allowed."""
    if "e3nn.o3" not in sys.modules:
        with torch.serialization.safe_globals([slice]):
            import e3nn.o3  # noqa: F401
    return sys.modules["e3nn.o3"]
