"""Compact binary encoding of NumPy arrays for BLOB columns.

Arrays are stored as raw little-endian bytes with their dtype and shape in sibling columns, never
as JSON lists: a 32×48 float64 feature block is 12 KB of bytes instead of ~30 KB of text, and it
decodes with one ``np.frombuffer``.
"""

from __future__ import annotations

import numpy as np


def encode(array: np.ndarray, dtype: str | np.dtype | None = None) -> tuple[bytes, str, str]:
    """Return ``(data, dtype, shape)``; ``shape`` is a comma-separated string ('' for a scalar)."""
    arr = np.asarray(array, dtype=dtype)
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return arr.tobytes(), arr.dtype.str, ",".join(str(s) for s in arr.shape)


def decode(data: bytes, dtype: str, shape: str) -> np.ndarray:
    dims = tuple(int(s) for s in shape.split(",")) if shape else ()
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims).copy()


def pack(array: np.ndarray | None, dtype: str = "<f8") -> bytes | None:
    """Raw bytes of an array whose shape the caller knows (e.g. forces are (n_atoms, 3))."""
    if array is None:
        return None
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def unpack(data: bytes | None, shape: tuple[int, ...], dtype: str = "<f8") -> np.ndarray | None:
    if data is None:
        return None
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
