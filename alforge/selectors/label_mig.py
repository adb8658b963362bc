"""Label-level maximum information gain, ``mig_label`` (METHODS §2–3; 002 §3.5).

A DFT label of candidate ``c`` observes its energy and its 3n force components (and stress) at
once; with ``G_c`` those rows, weighted as the model is trained, the label adds ``G_cᵀG_c`` to the
loss-consistent Hessian ``H``. The information it brings about the last-layer weights is

    ΔI_c = ½ log det(I + R_c H⁻¹ R_cᵀ) = ½ log det(H + R_cᵀR_c) − ½ log det H,

with ``R_c`` (r_c × d, ``R_cᵀR_c = G_cᵀG_c``) the compact factor passed as ``label_rows[c]``. A
batch is built greedily: pick the largest gain, add the whole block (``H ← H + R_cᵀR_c``), re-score.
This is greedy MaxDet of ``det H`` over label blocks; per-atom-energy rows (never observed) are not
used.

How it stays exact and fast:

* ``H_t`` is refactored after each pick (one d × d Cholesky, O(d³); d is at most a few hundred).
* Every candidate starts with Hadamard's bound ``½ Σ_i log(1 + ‖z_i‖²)`` (``z_i`` the whitened rows
  ``L⁻¹ r_i``; ``det(I + M) ≤ Π (1 + M_ii)`` for PSD ``M``), which is tighter than both
  ``½ r log(1 + tr M / r)`` and ``½ tr M`` and costs one streamed triangular solve over all rows.
* Exact gains (a small r_c × r_c Cholesky of ``I + Z_c Z_cᵀ`` after whitening under the current
  ``L_t``) are computed only for candidates that reach the top, by the lazy greedy loop of
  :mod:`alforge.selectors._greedy`: log det is submodular, so gains only decrease as ``H`` grows and
  a stale exact gain, like the initial bound, is an upper bound. The picks are exactly those of the
  plain greedy loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.linalg import cholesky, solve_triangular

from alforge.selectors import register
from alforge.selectors._greedy import lazy_greedy
from alforge.selectors.base import Selection, Selector, check_budget, check_features
from alforge.selectors.mig import resolve_hessian
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, chunk_rows


def check_label_rows(label_rows: Any, n: int | None, dim: int | None) -> list[np.ndarray]:
    """``label_rows``: N finite 2-D (r_c, d) arrays; returns them as a list (no copies)."""
    if label_rows is None:
        raise ValueError(
            "label_rows= is required: one (r_c, d) array per candidate, the compact factor R_c of "
            "its weighted energy + force rows (R_cᵀR_c = G_cᵀG_c)"
        )
    blocks = list(label_rows)
    if n is not None and len(blocks) != n:
        raise ValueError(f"label_rows has {len(blocks)} blocks, expected one per candidate ({n})")
    out = []
    for c, block in enumerate(blocks):
        block = np.asarray(block)
        if block.ndim != 2:
            raise ValueError(f"label_rows[{c}] must be a 2-D (r_c, d) array, got shape {block.shape}")
        if dim is None:
            dim = block.shape[1]
        if block.shape[1] != dim:
            raise ValueError(f"label_rows[{c}] has dimension {block.shape[1]}, expected {dim}")
        if not np.all(np.isfinite(block)):
            raise ValueError(f"label_rows[{c}] contains non-finite values")
        out.append(block)
    return out


def _row_chunks(sizes: np.ndarray, idx: np.ndarray, dim: int) -> list[np.ndarray]:
    """Split ``idx`` into runs whose stacked rows stay near 32 MB (at least one candidate each)."""
    limit = chunk_rows(dim)
    chunks, start, rows = [], 0, 0
    for k, c in enumerate(idx):
        if rows and rows + sizes[c] > limit:
            chunks.append(idx[start:k])
            start, rows = k, 0
        rows += sizes[c]
    chunks.append(idx[start:])
    return [c for c in chunks if c.size]


def _whitened(blocks: Sequence[np.ndarray], chunk: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """``L⁻¹ [R_c1; R_c2; ...]ᵀ`` (d, Σ r_c) for the candidates of ``chunk``."""
    stacked = np.vstack([np.asarray(blocks[c], dtype=np.float64) for c in chunk])
    return solve_triangular(chol, stacked.T, lower=True, check_finite=False)


def hadamard_bounds(blocks: Sequence[np.ndarray], chol: np.ndarray) -> np.ndarray:
    """``½ Σ_i log(1 + r_i H⁻¹ r_iᵀ)`` per candidate: an upper bound of its exact gain."""
    sizes = np.array([len(b) for b in blocks], dtype=np.int64)
    out = np.zeros(len(blocks))
    for chunk in _row_chunks(sizes, np.arange(len(blocks)), chol.shape[0]):
        chunk = chunk[sizes[chunk] > 0]
        if not chunk.size:
            continue
        z = _whitened(blocks, chunk, chol)
        per_row = np.log1p(np.einsum("ij,ij->j", z, z))
        owner = np.repeat(np.arange(chunk.size), sizes[chunk])
        out[chunk] = 0.5 * np.bincount(owner, weights=per_row, minlength=chunk.size)
    return out


def exact_gains(blocks: Sequence[np.ndarray], idx: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """``½ log det(I + R_c H⁻¹ R_cᵀ)`` for the candidates ``idx`` under ``H = L Lᵀ``."""
    sizes = np.array([len(blocks[c]) for c in idx], dtype=np.int64)
    out = np.zeros(len(idx))
    positions = np.arange(len(idx))
    for part in _row_chunks(sizes, positions[sizes > 0], chol.shape[0]):
        z = _whitened(blocks, idx[part], chol)
        offset = 0
        for p in part:
            zc = z[:, offset : offset + sizes[p]]
            offset += sizes[p]
            # I + ZᵀZ (r × r) or I + ZZᵀ (d × d): the same determinant, the smaller matrix.
            gram = zc.T @ zc if zc.shape[1] <= zc.shape[0] else zc @ zc.T
            gram[np.diag_indices_from(gram)] += 1.0
            out[p] = np.log(np.diag(cholesky(gram, lower=True, check_finite=False))).sum()
    return out


@register
class LabelMaxInformationGain(Selector):
    """``mig_label``: greedy ``½ log det(I + R_c H⁻¹ R_cᵀ)`` over whole label blocks (METHODS §3).

    ``select(candidates, budget, train=None, label_rows=[R_0, ..., R_{N-1}], hessian=H)``:
    ``label_rows[c]`` is candidate ``c``'s compact factor (r_c, d) of its weighted energy + force
    rows; ``hessian`` the loss-consistent Hessian (without it, ``H = ς² I + trainᵀtrain`` from
    ``train`` rows that are already weighted, and ``regularizer = ς``). ``candidates`` (N, d) is only
    checked for its shape and may be ``None``. ``indices`` are candidate rows in pick order;
    ``scores`` the exact gains in nats when picked (non-increasing).
    """

    name = "mig_label"
    uses_hessian = True
    label_rows = "required"

    def __init__(self, regularizer: float = DEFAULT_REGULARIZER) -> None:
        self.regularizer = regularizer

    def select(
        self,
        candidates: np.ndarray | None,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        candidates = check_features("candidates", candidates)
        n = None if candidates is None else len(candidates)
        dim = None if candidates is None else candidates.shape[1]
        if dim is None and context.get("hessian") is not None:
            dim = context["hessian"].dim
        blocks = check_label_rows(context.get("label_rows"), n, dim)
        if dim is None:
            train_dim = None if train is None else np.asarray(train).shape[-1]
            dim = blocks[0].shape[1] if blocks else train_dim
        if dim is None:
            raise ValueError("mig_label cannot tell the feature dimension: no candidates, rows or H")
        train = check_features("train", train, dim=dim)
        b = check_budget(budget, len(blocks))
        hessian = resolve_hessian(context, train, dim, self.regularizer, 1.0)
        if b == 0:
            return Selection(np.empty(0, dtype=np.int64), np.empty(0))
        # H_t is refactored after each pick; the caller's Hessian is never modified.
        state = {"matrix": np.array(hessian.matrix, dtype=np.float64), "chol": hessian.cholesky}

        def refresh(idx: np.ndarray, stale: np.ndarray, fresh_at: np.ndarray) -> np.ndarray:
            return exact_gains(blocks, idx, state["chol"])

        def commit(c: int) -> None:
            block = np.asarray(blocks[c], dtype=np.float64)
            state["matrix"] = state["matrix"] + block.T @ block
            state["chol"] = cholesky(state["matrix"], lower=True, check_finite=False)

        bounds = hadamard_bounds(blocks, state["chol"])
        picks, gains, n_refreshed = lazy_greedy(bounds, b, refresh, commit, exact_initial=False)
        return Selection(picks, gains, info={"n_rescored": n_refreshed})
