"""LPR enhancement: how much adding structures to the training set would stiffen one atom (METHODS §5).

``(R_after − R_before) / R_before`` for the local prediction rigidity ``R_j = (f_jᵀH⁻¹f_j)⁻¹`` of an
atom row ``f_j``, before and after the structures' rows join ``H``. Only the rows enter, never the
labels (``H`` of a squared loss does not depend on the targets), so the enhancement of a candidate
structure is known before anyone computes it: it is the diagnostic by which the embedding strategies
(whole cell, cluster, periodic, high-symmetry) are compared.

**Which rows.** A structure's rows are those its label adds to the loss Hessian: under the model's
loss ``H`` (``form="loss"``) that is its energy row and its force (+ stress) rows, weighted as
trained — exactly the compact factor ``R_s`` of :func:`alforge.mlip.jacobians.label_rows` under the
``weights`` of that ``H``; under an energy-only ``H`` it is the single row ``√λ_E · f_s/n_s``. Pass
the same kind of rows the ``H`` was built from, or the result mixes two quadratic forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alforge.uncertainty.rigidity import Hessian, data_matrix


def _blocks(structures_features: Sequence[np.ndarray] | np.ndarray, dim: int) -> list[np.ndarray]:
    """Per-structure row blocks as (r, dim) float64 arrays, checked (a 1-D entry is one row)."""
    if isinstance(structures_features, np.ndarray):
        if structures_features.ndim != 2:
            raise ValueError(
                f"structures_features as one array must be 2-D (rows, {dim}), got shape {structures_features.shape}"
            )
        structures_features = [structures_features]
    out = []
    for s, block in enumerate(structures_features):
        block = np.asarray(block, dtype=np.float64)
        if block.ndim == 1:
            block = block[None, :]
        if block.ndim != 2 or block.shape[1] != dim:
            raise ValueError(f"structures_features[{s}] must have shape (r, {dim}), got {block.shape}")
        if not np.all(np.isfinite(block)):
            raise ValueError(f"structures_features[{s}] contains non-finite values")
        out.append(block)
    return out


def lpr_enhancement(
    H: Hessian,
    structures_features: Sequence[np.ndarray] | np.ndarray,
    atom_feature: np.ndarray,
) -> float | np.ndarray:
    """``(R_after − R_before) / R_before`` of ``atom_feature``'s LPR when the structures join ``H``.

    ``H``: the model's Hessian (:func:`alforge.uncertainty.loss_hessian`). ``structures_features``:
    one row block ``(r_s, d)`` per added structure (module docstring: its label rows under ``H``'s
    weights; a 1-D entry is a single row), or one 2-D array of rows; blocks are summed,
    ``H_after = H + Σ_s R_sᵀR_s``. ``atom_feature``: one atom row ``(d,)`` → a float, or several
    ``(n, d)`` → an array of n. Since ``R = 1/v`` with ``v = fᵀH⁻¹f``, the enhancement is
    ``v_before / v_after − 1 ≥ 0``: adding rows never makes an atom less rigid.
    """
    f = np.asarray(atom_feature, dtype=np.float64)
    single = f.ndim == 1
    rows = f[None, :] if single else f
    if rows.ndim != 2 or rows.shape[1] != H.dim:
        raise ValueError(f"atom_feature must have shape ({H.dim},) or (n, {H.dim}), got {f.shape}")
    if not np.all(np.isfinite(rows)):
        raise ValueError("atom_feature contains non-finite values")
    added = data_matrix(_blocks(structures_features, H.dim), H.dim)
    after = Hessian(
        H.matrix + added, H.regularizer, weights=H.weights, form=H.form, regularizer_method=H.regularizer_method
    )
    out = H.variance(rows) / after.variance(rows) - 1.0
    return float(out[0]) if single else out
