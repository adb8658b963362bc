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
trained loss is documented in :mod:`alforge.uncertainty.gauss_newton`.

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
What does amortise the passes is batching *structures*: graphs in a batch share no edges, so one
backward pass per feature gives that feature's Jacobian for every structure of the batch
(:func:`structure_jacobians`). Structures go in batches of about :data:`ATOMS_PER_BATCH` atoms and
each is compressed at once, so memory is that of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from alforge.mlip.device import default_dtype
from alforge.mlip.features import _hooked, _prepared
from alforge.mlip.loss_weights import LossWeights
from alforge.mlip.mace_model import iterate_batches, model_dtype

__all__ = ["default_vjp_chunk", "has_cell", "label_rows", "structure_jacobians"]

#: A cell with less volume than this (Å³) is no cell: no stress rows.
_MIN_VOLUME = 1e-9
#: Cotangents per backward pass on the CPU (module docstring: batching was slower there).
CPU_VJP_CHUNK = 1


def default_vjp_chunk(device: str | torch.device) -> int | None:
    """Cotangents per backward pass: all (``None``) on CUDA, :data:`CPU_VJP_CHUNK` on the CPU."""
    return None if torch.device(device).type == "cuda" else CPU_VJP_CHUNK


def has_cell(atoms: Atoms) -> bool:
    """Periodic in all three directions with a non-degenerate cell: a structure that has a stress."""
    return bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > _MIN_VOLUME


def structure_jacobians(
    model: torch.nn.Module, read, batch, device: str, with_stress: bool, vjp_chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(f, ∂f/∂r, ∂f/∂ε)`` of a batch of ``G`` graphs: shapes ``(G, d)``, ``(d, n_atoms, 3)``,
    ``(d, G, 3, 3)``.

    Graphs in a batch share no edges, so the gradient of ``Σ_s f_s[k]`` with respect to all
    positions holds ``∂f_s[k]/∂r_j`` for every atom ``j`` of every structure ``s`` at once: one
    backward pass per feature serves the whole batch (that, not vmapping cotangents, is what
    amortises the per-pass overhead on the CPU). ``read`` is the reader yielded by
    :func:`alforge.mlip.features._hooked` on ``model``. The strain derivative (``None`` unless
    ``with_stress``) is taken with respect to mace's per-graph displacement tensor, which mace
    symmetrises and applies to positions and cell, so ``w · (1/V) ∂f_s/∂ε`` is the model's stress.
    ``vjp_chunk`` features per vmapped backward pass (``None``: all ``d`` in one).
    """
    data = batch.to(device).to_dict()
    positions = data["positions"]
    positions.requires_grad_(True)
    inputs = [positions]
    n_graphs = int(batch.num_graphs)
    if with_stress:
        displacement = torch.zeros(
            (n_graphs, 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True
        )
        data["displacement"] = displacement
        inputs.append(displacement)
    model(data, training=False, compute_force=False, compute_displacement=with_stress)
    per_atom = read()[0]
    f = torch.zeros((n_graphs, per_atom.shape[1]), dtype=per_atom.dtype, device=per_atom.device)
    f = f.index_add(0, data["batch"], per_atom)
    total = f.sum(dim=0)  # (d,): Σ_s f_s, whose gradient separates by structure
    d = total.numel()
    chunk = d if vjp_chunk is None else max(1, min(int(vjp_chunk), d))
    eye = torch.eye(d, dtype=total.dtype, device=total.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, d, chunk):
        stop = min(start + chunk, d)
        cotangents = eye[start] if chunk == 1 else eye[start:stop]
        grads = torch.autograd.grad(
            total, inputs, grad_outputs=cotangents, is_grads_batched=chunk > 1, retain_graph=stop < d
        )
        parts.append(tuple(g.unsqueeze(0) if chunk == 1 else g for g in grads))
    grads = [torch.cat([p[i] for p in parts]) for i in range(len(inputs))]
    return f.detach(), grads[0], (grads[1] if with_stress else None)


#: Atoms per batch in :func:`label_rows`: enough graphs to amortise each backward pass, few enough
#: that one batch's backward graph stays small (about 100 MB for a 16-channel MACE).
ATOMS_PER_BATCH = 256


def atom_batches(
    sizes: Sequence[int], atoms_per_batch: int = ATOMS_PER_BATCH, max_structures: int | None = None
) -> list[range]:
    """Consecutive structure ranges of at most ``atoms_per_batch`` atoms (one structure at least)
    and, if given, at most ``max_structures`` structures.

    Batching by atoms rather than by structures keeps the work (and memory) per batch about
    constant whatever the structure sizes: a pool of small molecules and one of large cells both
    give batches of the size the device handles best."""
    out, start, count = [], 0, 0
    for k, n in enumerate(sizes):
        full = max_structures is not None and k - start >= max_structures
        if k > start and (full or count + n > atoms_per_batch):
            out.append(range(start, k))
            start, count = k, 0
        count += n
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


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
    r_max = float(module.r_max)
    with _hooked(module) as read, default_dtype(model_dtype(module)), grad:
        for group in atom_batches([len(a) for a in structures]):
            members = list(group)
            for k in members:
                if weights.stress > 0 and flags[k] and not has_cell(structures[k]):
                    atoms = structures[k]
                    raise ValueError(
                        f"structure {k} ({atoms.get_chemical_formula()}, {len(atoms)} atoms) has no 3-D "
                        "periodic cell for stress rows"
                    )
            with_stress = weights.stress > 0 and any(flags[k] for k in members)
            (batch,) = iterate_batches([configs[k] for k in members], z_table, r_max, len(members))
            if need_jacobian:
                f, d_pos, d_strain = structure_jacobians(module, read, batch, resolved, with_stress, chunk)
                d_pos = d_pos.double().cpu().numpy()  # (d, atoms of the batch, 3)
            else:
                data = batch.to(resolved).to_dict()
                module(data, training=False, compute_force=False)
                per_atom = read()[0]
                f = torch.zeros((len(members), per_atom.shape[1]), dtype=per_atom.dtype, device=per_atom.device)
                f = f.index_add(0, data["batch"], per_atom)
                d_pos = d_strain = None
            f = f.double().cpu().numpy()
            ptr = batch.ptr.cpu().numpy()
            for g, k in enumerate(members):
                atoms, n = structures[k], len(structures[k])
                blocks = [np.sqrt(weights.energy) * f[g][None, :] / n]
                if weights.forces > 0 and force_flags[k]:
                    jac = d_pos[:, ptr[g] : ptr[g + 1]]  # (d, n, 3)
                    blocks.append(np.sqrt(weights.forces) * jac.reshape(len(jac), -1).T)
                if weights.stress > 0 and flags[k]:
                    strain = d_strain[:, g].double().cpu().numpy()  # (d, 3, 3)
                    blocks.append(
                        np.sqrt(weights.stress) / abs(atoms.cell.volume) * strain.reshape(len(strain), 9).T
                    )
                out.append(_compress(np.concatenate(blocks, axis=0)))
    return out
