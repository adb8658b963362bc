"""Device and dtype helpers shared by training, evaluation and feature extraction.

Kept separate so that ``features.py`` and ``mace_model.py`` agree on how ``"auto"`` resolves and so
that neither leaves torch's process-wide default dtype changed for the caller (mace builds its
tensors with ``torch.get_default_dtype()``, so the dtype has to be set while graphs are built).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str = "auto") -> str:
    """Return a torch device string: ``'cuda'`` when ``'auto'`` and a GPU is visible, else ``'cpu'``.

    An explicit ``'cuda…'`` request on a machine without CUDA is an error rather than a silent CPU
    fallback, so a misconfigured GPU worker is noticed instead of running 20× slower.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return device


def torch_dtype(name: str) -> torch.dtype:
    """Map ``'float32'``/``'float64'`` (the ``MACEParams.dtype`` values) to the torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`torch_dtype`, used to load a saved model in the dtype it was trained in."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported model dtype {dtype}")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default dtype for the block and always restore the caller's afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
