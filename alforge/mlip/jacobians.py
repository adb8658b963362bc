"""Label rows of the loss-consistent last-layer Gauss–Newton Hessian (METHODS §2, 000 eqs. 4–6).

With ``E_s = w · f_s + Σ_j e0_j`` (``f_s = Σ_j f_j``, :mod:`alforge.mlip.features`), every label a
structure carries is linear in the last-layer weights ``w``:

- energy per atom ``E_s / n_s``: row ``f_s / n_s``;
- force component ``F_iα = −∂E_s/∂r_iα``: row ``−J_iα`` with ``J_iα = ∂f_s/∂r_iα``;
- stress component ``σ_ab = (1/V) ∂E_s/∂ε_ab`` (mace's sign and symmetric-strain convention): row
  ``(1/V) ∂f_s/∂ε_ab``, 9 components.

The Gauss–Newton Hessian of a weighted squared loss is then ``Σ_s G_sᵀ G_s`` where ``G_s`` stacks
``√λ_E · f_s/n_s``, ``√w_F · J_sα`` (3n rows) and ``√w_σ · (1/V) ∂f_s/∂ε`` (9 rows; signs drop out of
``GᵀG``). The per-row weights ``(λ_E, w_F, w_σ)`` are a :class:`LossWeights`; how they follow from the
trained loss is documented in :mod:`alforge.uncertainty.loss_hessian`.

:func:`label_rows` returns, per structure, a compact factor ``R_s`` (``r_s × d``, ``r_s =
min(rows, d)``) with ``R_sᵀR_s = G_sᵀG_s`` exactly (QR in float64): the rows a label-level selector
adds to ``H`` when it picks ``s``. The ``d`` Jacobians ``∂f_s/∂(r, ε)`` come from vector–Jacobian
products with the ``d`` unit cotangents, ``vjp_chunk`` of them per batched backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``: the backward graph vmapped over the chunk).
On CUDA the default is all ``d`` in one pass. On the CPU the default is one per pass, because
there the batched pass was measured *slower* (``benchmarks/bench_jacobians.py``: d = 64, 63–64-atom
Si cells, float64, one thread: 61–68 s per 1,000 atoms for d single passes, 193 s for one pass
over all 64, chunks of 4–16 in between). The backward of a MACE is memory-bound elementwise work (``mul``,
``sum``, ``fill_`` of the tensor-product and symmetric-contraction backward), so vmapping only
multiplies the working set; there is no per-op overhead to amortise on the CPU.
Structures are processed one at a time and compressed at once, so memory is that of one structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms

from alforge.mlip.device import default_dtype
from alforge.mlip.features import _hooked, _prepared
from alforge.mlip.mace_model import iterate_batches, model_dtype

__all__ = ["LossWeights", "default_vjp_chunk", "has_cell", "label_rows", "structure_jacobians"]

#: A cell with less volume than this (Å³) is no cell: no stress rows.
_MIN_VOLUME = 1e-9
#: Cotangents per backward pass on the CPU (module docstring: batching was slower there).
CPU_VJP_CHUNK = 1


def default_vjp_chunk(device: str | torch.device) -> int | None:
    """Cotangents per backward pass: all (``None``) on CUDA, :data:`CPU_VJP_CHUNK` on the CPU."""
    return None if torch.device(device).type == "cuda" else CPU_VJP_CHUNK


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three kinds of Gauss–Newton rows (not the trainer's λ's themselves).

    ``energy``: weight of the row ``f_s/n_s`` (λ_E). ``forces``: weight of each force row
    ``∂f_s/∂r_iα`` (λ_F κ_F). ``stress``: weight of each of the 9 stress rows (λ_σ κ_σ); 0 means no
    stress rows.
    """

    energy: float
    forces: float
    stress: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{name} must be finite and >= 0, got {value}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossWeights:
        unknown = set(data) - {"energy", "forces", "stress"}
        if unknown:
            raise ValueError(f"LossWeights.from_dict: unknown keys {sorted(unknown)}")
        return cls(float(data["energy"]), float(data["forces"]), float(data.get("stress", 0.0)))


def has_cell(atoms: Atoms) -> bool:
    """Periodic in all three directions with a non-degenerate cell: a structure that has a stress."""
    return bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > _MIN_VOLUME


def structure_jacobians(
    model: torch.nn.Module, read, batch, device: str, with_stress: bool, vjp_chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(f_s, ∂f_s/∂r, ∂f_s/∂ε)`` of a one-structure batch: shapes ``(d,)``, ``(d, n, 3)``, ``(d, 3, 3)``.

    ``read`` is the reader yielded by :func:`alforge.mlip.features._hooked` on ``model``. The strain
    derivative (``None`` unless ``with_stress``) is taken with respect to mace's displacement
    tensor, which mace symmetrises and applies to positions and cell, so ``w · (1/V) ∂f_s/∂ε`` is
    the model's stress. ``vjp_chunk`` features per batched backward pass (``None``: all ``d`` in one).
    """
    data = batch.to(device).to_dict()
    positions = data["positions"]
    positions.requires_grad_(True)
    inputs = [positions]
    if with_stress:
        displacement = torch.zeros((1, 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True)
        data["displacement"] = displacement
        inputs.append(displacement)
    model(data, training=False, compute_force=False, compute_displacement=with_stress)
    f_s = read()[0].sum(dim=0)
    d = f_s.numel()
    chunk = d if vjp_chunk is None else max(1, min(int(vjp_chunk), d))
    eye = torch.eye(d, dtype=f_s.dtype, device=f_s.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, d, chunk):
        stop = min(start + chunk, d)
        cotangents = eye[start] if chunk == 1 else eye[start:stop]
        grads = torch.autograd.grad(
            f_s, inputs, grad_outputs=cotangents, is_grads_batched=chunk > 1, retain_graph=stop < d
        )
        parts.append(tuple(g.unsqueeze(0) if chunk == 1 else g for g in grads))
    grads = [torch.cat([p[i] for p in parts]) for i in range(len(inputs))]
    return f_s.detach(), grads[0], (grads[1][:, 0] if with_stress else None)


def _compress(rows: np.ndarray) -> np.ndarray:
    """``R`` with ``RᵀR = GᵀG`` and ``min(rows, d)`` rows (QR's triangle when ``G`` is tall)."""
    if rows.shape[0] <= rows.shape[1]:
        return rows
    return np.linalg.qr(rows, mode="r")


def label_rows(
    model: Path | torch.nn.Module,
    structures: Sequence[Atoms],
    weights: LossWeights,
    device: str = "auto",
    stress: Sequence[bool] | None = None,
    forces: Sequence[bool] | None = None,
    vjp_chunk: int | None | str = "auto",
) -> list[np.ndarray]:
    """Per structure, a float64 factor ``R_s`` (``r_s × d``) with ``R_sᵀR_s = G_sᵀG_s`` (module docstring).

    ``model``: a model file or a model loaded with :func:`alforge.mlip.mace_model.load_model` (on
    ``device``). ``stress``: per structure, whether it gets stress rows (default: when it
    :func:`has_cell`); ignored when ``weights.stress`` is 0. ``forces``: per structure, whether it
    gets force rows (default: all). With ``weights.forces`` and ``weights.stress`` both 0 no Jacobian
    is computed and each ``R_s`` is the single energy row. ``vjp_chunk``: cotangents per backward
    pass (``"auto"``: :func:`default_vjp_chunk`; ``None``: all ``d`` in one pass).
    """
    if not structures:
        return []
    for name, given in (("stress", stress), ("forces", forces)):
        if given is not None and len(given) != len(structures):
            raise ValueError(f"{name} has {len(given)} entries for {len(structures)} structures")
    resolved, module, z_table, configs = _prepared(model, structures, device)
    flags = [has_cell(a) for a in structures] if stress is None else [bool(s) for s in stress]
    force_flags = [True] * len(structures) if forces is None else [bool(f) for f in forces]
    need_jacobian = weights.forces > 0 or weights.stress > 0
    chunk = default_vjp_chunk(resolved) if vjp_chunk == "auto" else vjp_chunk
    out: list[np.ndarray] = []
    grad = torch.enable_grad() if need_jacobian else torch.no_grad()
    with _hooked(module) as read, default_dtype(model_dtype(module)), grad:
        for atoms, flag, force_flag, batch in zip(
            structures, flags, force_flags, iterate_batches(configs, z_table, float(module.r_max), 1), strict=True
        ):
            n = len(atoms)
            with_stress = weights.stress > 0 and flag
            if with_stress and not has_cell(atoms):
                raise ValueError(
                    f"structure {atoms.get_chemical_formula()} ({n} atoms) has no 3-D periodic cell for stress rows"
                )
            if need_jacobian:
                f_s, d_pos, d_strain = structure_jacobians(module, read, batch, resolved, with_stress, chunk)
            else:
                module(batch.to(resolved).to_dict(), training=False, compute_force=False)
                f_s, d_pos, d_strain = read()[0].sum(dim=0), None, None
            blocks = [np.sqrt(weights.energy) * f_s.double().cpu().numpy()[None, :] / n]
            if weights.forces > 0 and force_flag:
                jac = d_pos.double().cpu().numpy()  # (d, n, 3)
                blocks.append(np.sqrt(weights.forces) * jac.reshape(len(jac), -1).T)
            if with_stress:
                strain = d_strain.double().cpu().numpy()  # (d, 3, 3)
                blocks.append(np.sqrt(weights.stress) / abs(atoms.cell.volume) * strain.reshape(len(strain), 9).T)
            out.append(_compress(np.concatenate(blocks, axis=0)))
    return out
