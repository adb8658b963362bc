"""Compact binary encoding of NumPy arrays for BLOB columns.

Arrays are stored as raw little-endian bytes with their dtype and shape in sibling columns, never
as JSON lists: a 32×48 float64 feature block is 12 KB of bytes instead of ~30 KB of text, and it
decodes with one ``np.frombuffer``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class StackedRows:
    """Several 2-D arrays with the same width stacked into one: block ``k`` is
    ``rows[offsets[k]:offsets[k + 1]]``.

    The store fills ``rows`` in place while it streams blobs (:meth:`Store.get_feature_rows`), so a
    million atoms' features are one allocation rather than tens of thousands of arrays plus the copy
    a ``np.concatenate`` of them would make.
    """

    rows: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.rows.ndim != 2:
            raise ValueError(f"rows must be 2-D, got shape {self.rows.shape}")
        if self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if self.offsets[-1] != len(self.rows) or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"offsets must be non-decreasing and end at len(rows) = {len(self.rows)}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Rows per block."""
        return np.diff(self.offsets)

    def block(self, k: int) -> np.ndarray:
        """Block ``k`` as a view of ``rows`` (no copy)."""
        return self.rows[self.offsets[k] : self.offsets[k + 1]]

    def blocks(self) -> list[np.ndarray]:
        """Every block as a view of ``rows``: what an API taking a list of arrays is given."""
        return [self.block(k) for k in range(len(self))]

    def groups(self) -> np.ndarray:
        """For each row, the index of its block (int64)."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.sizes)
