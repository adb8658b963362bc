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
common for the smooth, clustered embeddings of MD data), its recall@10 at ``efSearch`` 128 is
printed by ``tests/test_ltau.py`` (≥ 0.9 asserted), and it can grow with a campaign's training set.
Its memory (``M`` = 32 links per vector) is ~256 bytes per atom beyond the vectors themselves.
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


def exceedance(error_log: np.ndarray, tolerance: float | np.ndarray) -> np.ndarray:
    """``p_i = 1 − mean_t 1[ε_i^t ≤ tol_i]``: the fraction of a sample's epochs above its tolerance
    (a scalar, or one per row). Works on a log or on its quantile summary alike."""
    log = np.asarray(error_log)
    tol = np.asarray(tolerance, dtype=np.float64)
    if tol.ndim == 1:
        tol = tol[:, None]
    return 1.0 - np.mean(log.astype(np.float64) <= tol, axis=1)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (n_atoms, dim) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        rows = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
        raise ValueError(f"{name} has non-finite values in rows {rows[:10].tolist()}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_elements(elements: Sequence[int] | np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    if elements is None:
        return None
    arr = np.asarray(elements)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integer atomic numbers (one per row), got {arr.dtype} shape {arr.shape}")
    return arr.astype(np.int64)


class _Index:
    """One FAISS index over a group of training rows (``rows``: their positions in the whole set)."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray, kind: str) -> None:
        import faiss

        dim = vectors.shape[1]
        if kind == "flat":
            self.faiss = faiss.IndexFlatL2(dim)
        else:
            self.faiss = faiss.IndexHNSWFlat(dim, HNSW_M)
            self.faiss.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.faiss.add(vectors)
        if kind == "hnsw":
            self.faiss.hnsw.efSearch = HNSW_EF_SEARCH
        self.rows = rows
        self.kind = kind

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and training-row indices of the ``k`` nearest (k ≤ group size)."""
        if self.kind == "hnsw":
            self.faiss.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        distances, local = self.faiss.search(queries, k)
        return distances, self.rows[local]


class LTAU:
    """Loss-trajectory uncertainty of per-atom predictions (module docstring; METHODS §7).

    ``atol``: the tolerance of an epoch's error (eV/Å for force-error norms); ``None`` takes the
    final-epoch training MAE, the mean of the log's last column (for a quantile summary, pass the
    mean of the final epoch's errors explicitly). ``rtol`` adds ``rtol·|F_ref,i|`` per training atom
    (``fit(reference_norms=...)``). ``k`` neighbours are averaged (all of a group's atoms when it has
    fewer). ``index``: ``"flat"`` (exact), ``"hnsw"`` (approximate, see the module docstring) or
    ``"auto"`` (flat up to :data:`FLAT_LIMIT` training atoms per index). With ``elements`` each
    chemical element has its own index, so an atom is compared with atoms of its own element only.
    """

    def __init__(self, atol: float | None = None, rtol: float = 0.0, k: int = 10, index: str = "auto") -> None:
        if atol is not None and not (np.isfinite(atol) and atol > 0):
            raise ValueError(f"LTAU atol must be a positive number or None, got {atol!r}")
        if not (np.isfinite(rtol) and rtol >= 0):
            raise ValueError(f"LTAU rtol must be ≥ 0, got {rtol!r}")
        if int(k) != k or k < 1:
            raise ValueError(f"LTAU k must be a positive integer, got {k!r}")
        if index not in ("auto", "flat", "hnsw"):
            raise ValueError(f"LTAU index must be 'auto', 'flat' or 'hnsw', got {index!r}")
        self.atol, self.rtol, self.k, self.index = atol, float(rtol), int(k), index
        self.atol_: float | None = None
        self.train_p_: np.ndarray | None = None
        self._indices: dict[int | None, _Index] = {}
        self._by_element = False

    def fit(
        self,
        train_embeddings: np.ndarray,
        error_log: np.ndarray,
        *,
        elements: Sequence[int] | np.ndarray | None = None,
        reference_norms: np.ndarray | None = None,
    ) -> LTAU:
        """Compute every training atom's ``p_i`` from ``error_log`` (n_train × n_epochs, or its
        quantile summary) and index the ``train_embeddings`` (n_train × dim) rows."""
        vectors = _as_matrix(train_embeddings, "train_embeddings")
        n = vectors.shape[0]
        log = np.asarray(error_log)
        if log.ndim != 2 or log.shape[0] != n or log.shape[1] == 0:
            raise ValueError(f"error_log must be (n_train={n}, n_epochs ≥ 1), got shape {log.shape}")
        if not np.all(np.isfinite(log)) or np.any(log < 0):
            rows = np.flatnonzero(~np.all(np.isfinite(log) & (log >= 0), axis=1))
            raise ValueError(f"error_log must hold finite errors ≥ 0; rows {rows[:10].tolist()} do not "
                             "(leave out atoms of structures without reference forces)")
        self.atol_ = float(self.atol) if self.atol is not None else float(np.mean(log[:, -1], dtype=np.float64))
        if not self.atol_ > 0:
            raise ValueError("the final-epoch training MAE is 0: pass atol explicitly")
        tolerance: float | np.ndarray = self.atol_
        if self.rtol > 0:
            if reference_norms is None:
                raise ValueError("LTAU rtol > 0 needs fit(reference_norms=|F_ref| per training atom)")
            norms = np.asarray(reference_norms, dtype=np.float64)
            if norms.shape != (n,) or not np.all(np.isfinite(norms)):
                raise ValueError(f"reference_norms must be {n} finite values, got shape {norms.shape}")
            tolerance = self.atol_ + self.rtol * norms
        self.train_p_ = exceedance(log, tolerance)
        groups = _as_elements(elements, n, "elements")
        self._by_element = groups is not None
        self._indices = {}
        for key, rows in self._groups(groups, n).items():
            kind = self.index if self.index != "auto" else ("flat" if len(rows) <= FLAT_LIMIT else "hnsw")
            self._indices[key] = _Index(vectors[rows], rows, kind)
        return self

    @property
    def index_kinds(self) -> dict[int | None, str]:
        """The kind of index (``flat`` or ``hnsw``) per element (``None``: one index for all)."""
        return {key: index.kind for key, index in self._indices.items()}

    @staticmethod
    def _groups(elements: np.ndarray | None, n: int) -> dict[int | None, np.ndarray]:
        if elements is None:
            return {None: np.arange(n)}
        return {int(z): np.flatnonzero(elements == z) for z in np.unique(elements)}

    def kneighbors(
        self, embeddings: np.ndarray, *, elements: Sequence[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(squared distances, training-row indices)`` of each query's ``k`` nearest training
        atoms (its element's, when fitted per element), both (n_query × k); a group with fewer than
        ``k`` atoms pads with index −1 and distance ∞."""
        if self.train_p_ is None:
            raise RuntimeError("LTAU.fit must be called before predict/kneighbors")
        queries = _as_matrix(embeddings, "embeddings")
        dim = next(iter(self._indices.values())).faiss.d
        if queries.shape[1] != dim:
            raise ValueError(f"embeddings have dimension {queries.shape[1]}, the training embeddings {dim}")
        groups = _as_elements(elements, queries.shape[0], "elements")
        if self._by_element and groups is None:
            raise ValueError("LTAU was fitted per element: predict needs elements= too")
        if not self._by_element and groups is not None:
            raise ValueError("LTAU was fitted without elements: predict cannot use elements=")
        distances = np.full((queries.shape[0], self.k), np.inf)
        neighbours = np.full((queries.shape[0], self.k), -1, dtype=np.int64)
        for key, rows in self._groups(groups, queries.shape[0]).items():
            if key not in self._indices:
                raise ValueError(f"element {key} has no training atoms; LTAU knows elements {sorted(self._indices)}")
            index = self._indices[key]
            k = min(self.k, len(index.rows))
            d, i = index.search(queries[rows], k)
            distances[rows, :k], neighbours[rows, :k] = d, i
        return distances, neighbours

    def predict(self, embeddings: np.ndarray, *, elements: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Each query atom's ``p`` ∈ [0, 1]: the mean ``p_i`` of its ``k`` nearest training atoms."""
        _, neighbours = self.kneighbors(embeddings, elements=elements)
        found = neighbours >= 0
        values = np.where(found, self.train_p_[np.where(found, neighbours, 0)], 0.0)
        return values.sum(axis=1) / found.sum(axis=1)


@dataclass(frozen=True)
class CalibrationCurve:
    """Predicted confidence ``1 − p`` per bin against the observed fraction of atoms with error
    ≤ ``atol·s``; ``ece`` is the count-weighted mean |confidence − observed| over non-empty bins
    (the expected calibration error, ECE). Empty bins hold NaN."""

    edges: np.ndarray
    confidence: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    ece: float
    tolerance: float


def calibration_curve(p: np.ndarray, errors: np.ndarray, atol: float, s: float = 1.0, bins: int = 10) -> CalibrationCurve:
    """Bin atoms by predicted confidence ``1 − p`` (``bins`` equal bins of [0, 1]) and compare each
    bin's mean confidence with the fraction whose true ``errors`` are within ``atol·s``. The scale
    factor ``s`` loosens the tolerance for shifted test data, whose errors sit above the training
    errors that defined ``atol`` (METHODS §7)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if p.shape != errors.shape or p.size == 0:
        raise ValueError(f"p and errors must have the same non-zero length, got {p.shape} and {errors.shape}")
    if not (np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))):
        raise ValueError("p must lie in [0, 1]")
    if not (atol > 0 and s > 0 and bins >= 1):
        raise ValueError(f"atol and s must be > 0 and bins ≥ 1, got atol={atol}, s={s}, bins={bins}")
    confidence = 1.0 - p
    within = errors <= atol * s
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / counts
        observed = np.bincount(which, weights=within.astype(float), minlength=bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(mean_conf[filled] - observed[filled])) / p.size)
    return CalibrationCurve(edges, mean_conf, observed, counts, ece, float(atol * s))
