"""LTAU: uncertainty from the training loss trajectory (METHODS §7, seed 001).

Every epoch of a training logs the error ``ε_i^t`` of every training sample ``i`` (per atom, the
force-error norm). A sample the model fitted early and kept fitted has most of its epochs below the
tolerance; one it kept missing has few. ``p_i = 1 − mean_t 1[ε_i^t ≤ atol (+ rtol·|F_ref,i|)]`` is
the sample's uncertainty (confidence ``1 − p_i``, the paper's Algorithm 1), and a query atom gets
the mean ``p`` of its ``k`` nearest training atoms in the model's own per-atom embedding space:
no ensemble, one nearest-neighbour lookup per atom.

What a store keeps of a log is :func:`summarize_error_log`'s summary, not the raw N × E log: LTAU
only ever counts epochs below a tolerance, i.e. reads each sample's error distribution over its
epochs, and ``Q`` quantiles of that distribution reproduce the count to within ``1/(2Q)`` for every
tolerance at once (so ``atol`` and ``rtol`` can still be chosen after training). With
:data:`MAX_LOG_COLUMNS` = 64 columns of float16 a sample costs at most 128 bytes (plus 2 for its
final-epoch error) however long the training: a few hundred epochs of 1e5 atoms is 13 MB per model
instead of 60 MB raw (2 bytes per atom-epoch); a log of at most 64 epochs is kept as it is.

The nearest-neighbour index (FAISS, imported when an index is built) is exact (``IndexFlatL2``) below
:data:`FLAT_LIMIT` training atoms and HNSW above: HNSW needs no training pass and no choice of cell
count (IVF needs both, and its recall drops when a query's neighbours straddle cells, which is
common for the smooth, clustered embeddings of MD data), its recall at ``efSearch`` 64–128 is
≥ 0.95 for ``k`` ≤ 10, and it can be built incrementally as a campaign's training set grows. Its
memory (``M`` = 32 links per vector) is ~256 bytes per atom beyond the vectors themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FLAT_LIMIT",
    "LTAU",
    "MAX_LOG_COLUMNS",
    "CalibrationCurve",
    "calibration_curve",
    "exceedance",
    "summarize_error_log",
]

#: Columns a stored log keeps at most (:func:`summarize_error_log`).
MAX_LOG_COLUMNS = 64
#: Training atoms up to which ``index="auto"`` searches exactly (``IndexFlatL2``); HNSW above.
FLAT_LIMIT = 100_000
#: HNSW settings: links per vector, and the candidate lists of construction and search.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def summarize_error_log(log: np.ndarray, max_columns: int = MAX_LOG_COLUMNS) -> tuple[np.ndarray, str]:
    """``(columns, form)``: the log itself (``form="epochs"``) when it has at most ``max_columns``
    epochs, else each row's ``max_columns`` error quantiles over its epochs (``form="quantiles"``).

    Quantile ``j`` is the empirical ``(j + ½)/Q`` quantile, taken as an observed value (numpy's
    ``inverted_cdf``), so ``mean_j 1[q_j ≤ a]`` is within ``1/(2Q)`` of the fraction of epochs with
    ``ε ≤ a`` for every ``a``; :class:`LTAU` reads either form as an error log. float16 in and out.
    """
    log = np.asarray(log)
    if log.ndim != 2:
        raise ValueError(f"error log must be (n_samples, n_epochs), got shape {log.shape}")
    if max_columns < 1:
        raise ValueError(f"max_columns must be ≥ 1, got {max_columns}")
    if log.shape[1] <= max_columns:
        return log.astype(np.float16), "epochs"
    levels = (np.arange(max_columns) + 0.5) / max_columns
    quantiles = np.quantile(log.astype(np.float32), levels, axis=1, method="inverted_cdf").T
    return np.ascontiguousarray(quantiles, dtype=np.float16), "quantiles"
