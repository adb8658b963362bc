"""Last-layer Hessian and the prediction-rigidity family (METHODS §2).

Everything here rests on one object, the Gauss–Newton Hessian of a squared loss in the last-layer
weights ``w`` (``E = Σ_j w·f_j``):

    H = Σ_s R_sᵀR_s + ς² I

with ``R_s`` the (weighted) label rows of training structure ``s``. The loss-consistent form (the
loss the MACE model was trained with: energy per atom, forces, stress) is built by
:func:`alforge.uncertainty.gauss_newton` (rows summed by :func:`data_matrix`);
:meth:`Hessian.from_features` keeps the older ``λ_E Σ f_s f_sᵀ + λ_F Σ JᵀJ`` assembly from arrays.

factored once in float64 (one Cholesky, O(d³)). A query ``fᵀH⁻¹f`` is then ``‖L⁻¹f‖²``: a triangular
solve per row, done in chunks so a million candidates never materialise a whitened copy at once.
The rigidities are reciprocals of that quantity (PR of a structure, LPR of an atom, CPR of a block
of the feature vector) and the calibrated variance is ``α² fᵀH⁻¹f`` (METHODS §2, §8).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.linalg import cho_solve, cholesky, solve_triangular

from alforge.uncertainty.blas_threads import single_threaded_blas, threads_for

if TYPE_CHECKING:
    from alforge.mlip.loss_weights import LossWeights

#: Default ``ς``: ς² = 1e-6 keeps ``H`` positive definite in float64 when the training set is empty
#: or spans fewer than ``d`` directions, while shifting the well-determined directions (eigenvalues
#: of order N_train·|f|²) by a negligible amount. Pass a larger value for a prior that matters.
DEFAULT_REGULARIZER = 1e-3

#: Rows per chunk in streamed passes over candidates: about 32 MB of float64 per chunk.
_CHUNK_BYTES = 32 * 2**20


def chunk_rows(dim: int) -> int:
    """Rows per chunk so that one float64 chunk of width ``dim`` stays near 32 MB."""
    return max(1, _CHUNK_BYTES // (8 * max(dim, 1)))


def iter_chunks(n: int, dim: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of :func:`chunk_rows` rows."""
    step = chunk_rows(dim)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _as_2d(name: str, array: np.ndarray, dim: int | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {array.shape[1]}, expected {dim}")
    return array


class Hessian:
    """A Cholesky-factored last-layer Hessian ``H = L Lᵀ`` (METHODS §2).

    Build it with :func:`alforge.uncertainty.loss_hessian` or :meth:`from_features`; query it with :meth:`variance`
    (``fᵀH⁻¹f`` per row), :meth:`whiten` (``L⁻¹f``) and :meth:`solve` (``H⁻¹x``). ``regularizer`` is
    ``ς`` (not ``ς²``); ``regularizer_method`` says how it was chosen. ``form`` names the quadratic
    form (``"loss"``: energy + forces (+ stress) rows of the trained loss; ``"energy"``: its energy
    rows only; ``"features"``: :meth:`from_features`; ``"custom"``: a matrix given directly), and
    ``weights`` are the row weights of the ``"loss"``/``"energy"`` forms.
    """

    def __init__(
        self,
        matrix: np.ndarray,
        regularizer: float,
        *,
        weights: LossWeights | None = None,
        form: str = "custom",
        regularizer_method: str = "given",
    ) -> None:
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Hessian matrix must be square, got shape {matrix.shape}")
        self.matrix = matrix
        self.regularizer = float(regularizer)
        self.weights = weights
        self.form = form
        self.regularizer_method = regularizer_method
        try:
            with single_threaded_blas():
                self.cholesky = cholesky(matrix, lower=True)
        except np.linalg.LinAlgError:
            raise ValueError(
                "Hessian matrix is not positive definite; increase `regularizer` (ς)"
            ) from None

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def from_features(
        cls,
        train: np.ndarray | None,
        dim: int | None = None,
        regularizer: float = DEFAULT_REGULARIZER,
        energy_weight: float = 1.0,
    ) -> Hessian:
        """``H = λ FᵀF + ς² I`` from plain feature rows, in float64: the standalone form selectors
        build when no model Hessian is passed (tests, benchmarks). A campaign's ``H`` is the loss
        Hessian of :func:`alforge.uncertainty.loss_hessian` instead.

        ``train`` holds one row per training structure (``None``: no training data; then ``dim``
        is required).
        """
        if regularizer <= 0:
            raise ValueError(f"regularizer (ς) must be > 0, got {regularizer}")
        if energy_weight < 0:
            raise ValueError(f"energy_weight must be >= 0, got {energy_weight}")
        if train is not None:
            train = _as_2d("train", train, dim)
            dim = train.shape[1]
        if dim is None:
            raise ValueError("dim is required when train is None")
        matrix = np.zeros((dim, dim))
        if train is not None and energy_weight:
            for rows in iter_chunks(len(train), dim):
                block = np.asarray(train[rows], dtype=np.float64)
                with threads_for(2.0 * block.size * dim):
                    matrix += energy_weight * (block.T @ block)
        matrix[np.diag_indices(dim)] += regularizer**2
        return cls(matrix, regularizer, form="features")

    def updated(self, features: np.ndarray, weight: float = 1.0) -> Hessian:
        """``H + weight · FᵀF``: the Hessian after adding rows ``features`` to the training set."""
        features = np.asarray(_as_2d("features", features, self.dim), dtype=np.float64)
        with threads_for(2.0 * features.size * self.dim):
            outer = features.T @ features
        return Hessian(
            self.matrix + weight * outer,
            self.regularizer,
            weights=self.weights,
            form=self.form,
            regularizer_method=self.regularizer_method,
        )

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``H⁻¹ rhs`` for a vector or a (d, k) matrix with few columns (one BLAS thread)."""
        with single_threaded_blas():
            return cho_solve(
                (self.cholesky, True), np.asarray(rhs, dtype=np.float64), check_finite=False
            )

    def whiten(self, features: np.ndarray) -> np.ndarray:
        """Rows ``z = L⁻¹ f`` so that ``fᵀH⁻¹f = ‖z‖²`` (returned as an (n, d) float64 array)."""
        features = _as_2d("features", features, self.dim)
        out = np.empty(features.shape, dtype=np.float64)
        for rows in iter_chunks(len(features), self.dim):
            block = np.asarray(features[rows], dtype=np.float64)
            out[rows] = solve_triangular(self.cholesky, block.T, lower=True).T
        return out

    def variance(self, features: np.ndarray) -> np.ndarray:
        """``fᵀH⁻¹f`` per row, streamed in chunks: O(n d²) time, O(n) extra memory.

        Computed as ``‖L⁻¹f‖²`` (a sum of squares), so it is never negative.
        """
        features = _as_2d("features", features, self.dim)
        out = np.empty(len(features), dtype=np.float64)
        for rows in iter_chunks(len(features), self.dim):
            block = np.asarray(features[rows], dtype=np.float64)
            z = solve_triangular(self.cholesky, block.T, lower=True)
            out[rows] = np.einsum("ij,ij->j", z, z)
        return out


def data_matrix(rows_list: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """``Σ_s R_sᵀR_s`` (no ``ς²I``) in float64 from per-structure row blocks of width ``dim``."""
    matrix = np.zeros((dim, dim))
    for s, rows in enumerate(rows_list):
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise ValueError(f"rows_list[{s}] must have shape (r, {dim}), got {rows.shape}")
        with threads_for(2.0 * rows.size * dim):
            matrix += rows.T @ rows
    return matrix


def prediction_rigidity(hessian: Hessian, features: np.ndarray) -> np.ndarray:
    """PR ``R_s = (f_sᵀH⁻¹f_s)⁻¹`` per row of structure features ``f_s = Σ_j f_j`` (METHODS §2).

    Lower means less robust. With ``ς`` fixed, adding ``f_s`` to the training set raises ``R_s`` by
    exactly 1 (000, Appendix B), so PR counts "effective training points" along ``f_s``.
    """
    return 1.0 / hessian.variance(_as_2d("features", features, hessian.dim))


def local_prediction_rigidity(hessian: Hessian, atom_features: np.ndarray) -> np.ndarray:
    """LPR ``R_j = (f_jᵀH⁻¹f_j)⁻¹`` per atom row ``f_j`` (METHODS §2, 000 §III).

    The same quadratic form as PR, on per-atom rows: the rigidity of one atom's energy contribution.
    """
    return 1.0 / hessian.variance(_as_2d("atom_features", atom_features, hessian.dim))


def component_prediction_rigidity(
    hessian: Hessian,
    features: np.ndarray,
    blocks: Sequence[tuple[str, int, int]],
) -> dict[str, np.ndarray]:
    """CPR ``R_C = (g_CᵀH⁻¹g_C)⁻¹`` per row and per block (METHODS §2).

    ``blocks`` lists ``(name, start, stop)`` column ranges of the feature vector (one MACE readout,
    one body order, ...); ``g_C`` is ``f`` zeroed outside ``[start, stop)``, so
    ``g_CᵀH⁻¹g_C = f_Cᵀ (H⁻¹)_CC f_C`` needs only the C×C block of ``H⁻¹`` (one solve per block).
    Blocks may overlap; they need not cover the vector.
    """
    features = _as_2d("features", features, hessian.dim)
    out: dict[str, np.ndarray] = {}
    for name, start, stop in blocks:
        if not 0 <= start < stop <= hessian.dim:
            raise ValueError(
                f"block {name!r} = [{start}, {stop}) is not a non-empty range within "
                f"[0, {hessian.dim})"
            )
        if name in out:
            raise ValueError(f"block name {name!r} appears twice in blocks")
        unit = np.zeros((hessian.dim, stop - start))
        unit[start:stop] = np.eye(stop - start)
        inverse_block = hessian.solve(unit)[start:stop]
        values = np.empty(len(features))
        for rows in iter_chunks(len(features), stop - start):
            part = np.asarray(features[rows, start:stop], dtype=np.float64)
            values[rows] = np.einsum("ij,jk,ik->i", part, inverse_block, part, optimize=True)
        out[name] = 1.0 / values
    return out


def calibrated_variance(hessian: Hessian, features: np.ndarray, alpha2: float) -> np.ndarray:
    """``σ² = α² fᵀH⁻¹f`` (METHODS §2), with ``α²`` from a validation set (METHODS §8, eq. 26)."""
    if alpha2 <= 0:
        raise ValueError(f"alpha2 must be > 0, got {alpha2}")
    return alpha2 * hessian.variance(_as_2d("features", features, hessian.dim))
