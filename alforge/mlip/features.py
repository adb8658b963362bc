"""Per-atom features of a MACE model (METHODS §1): last-layer features and invariant embeddings.

mace-torch 0.3.16 has no API for last-layer features, so they are read with forward pre-hooks on the
linear maps that produce the per-atom energy:

- every linear readout ``readouts[i].linear`` (all layers but the last) reads the scalar (0e) channels
  of layer i's node features;
- the final non-linear readout is ``W2 · σ(W1 · x)``; its last-layer features are the input of
  ``readouts[-1].linear_2``.

A ScaleShiftMACE computes the energy of atom j as
``E_j = E0(Z_j) + shift + scale · Σ_readouts Σ_k c_path · W_k · x_jk``, where ``c_path = 1/√fan_in`` is
e3nn's path normalisation of ``o3.Linear``. **Both the path normalisation and ``scale`` are folded
into the features**: ``f_jk = scale · c_path · x_jk``, and ``w`` is the raw readout weight vector (the
trainable parameters themselves). Hence ``E = Σ_j w · f_j + Σ_j e0_j`` with ``e0_j = E0(Z_j) + shift``
exactly, and ``∂E/∂w = Σ_j f_j = f_s`` — the Gauss–Newton row that PR/LPR/MIG need (METHODS §2–3) for
the parameters the trainer actually updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
import alforge.mlip.mace_import  # noqa: F401  # isort: skip  (before mace and e3nn: see there)
from e3nn import o3  # isort: skip
from mace.modules.blocks import LinearReadoutBlock, NonLinearReadoutBlock

from alforge.mlip.device import default_dtype, resolve_device
from alforge.mlip.mace_model import (
    check_elements,
    iterate_batches,
    load_model,
    model_dtype,
    model_z_table,
    unlabelled_config,
)

__all__ = ["AtomFeatures", "compute_features", "feature_jacobians", "last_layer_weights"]

_SCALAR = o3.Irrep("0e")


@dataclass
class AtomFeatures:
    """Features of one structure under one model (store keyed by both; METHODS §1).

    ``last_layer``: (n_atoms, d) float64, scale and path normalisation folded in, so that
    ``energy == last_layer.sum(0) @ w + e0.sum()`` with ``w`` from :func:`last_layer_weights`.
    ``invariant``: (n_atoms, c) float64, the scalar channels of the node features after the last
    product block (the embedding for PROBE, LTAU, kNN, FPS).
    ``energy``: model energy (eV). ``e0``: (n_atoms,) per-atom constants ``E0(Z_j) + shift``.
    """

    last_layer: np.ndarray
    invariant: np.ndarray
    energy: float
    e0: np.ndarray


@dataclass(frozen=True)
class _Block:
    """One slice of the last-layer feature vector: a path of one readout's energy-producing linear."""

    readout: str  # e.g. "readouts.0"
    linear: o3.Linear
    in_slice: slice  # columns of the linear's input
    path_weight: float  # e3nn's 1/√fan_in
    weight: torch.Tensor  # (mul,) raw weights of this path


def _energy_linear(name: str, readout: torch.nn.Module) -> o3.Linear:
    """The linear map of a readout whose output is the per-atom energy, validated for single-head use."""
    if isinstance(readout, NonLinearReadoutBlock):
        linear = readout.linear_2
    elif isinstance(readout, LinearReadoutBlock):
        linear = readout.linear
    else:
        raise TypeError(f"{name} is a {type(readout).__name__}; only (Non)LinearReadoutBlock is supported")
    if not isinstance(linear, o3.Linear):
        raise TypeError(f"{name} uses {type(linear).__name__}; convert cuequivariance models back to e3nn first")
    if linear.irreps_out != o3.Irreps("0e"):
        raise ValueError(f"{name} outputs {linear.irreps_out}; only single-head models (one 0e energy) are supported")
    return linear


def _blocks(model: torch.nn.Module) -> list[_Block]:
    """All weight paths that produce energy, in readout order."""
    if getattr(model, "pair_repulsion", False) or hasattr(model, "joint_embedding"):
        raise ValueError("models with pair repulsion or extra embeddings add energy outside the readouts")
    blocks = []
    for i, readout in enumerate(model.readouts):
        name = f"readouts.{i}"
        linear = _energy_linear(name, readout)
        slices = linear.irreps_in.slices()
        for _, instruction, weight in linear.weight_views(yield_instruction=True):
            if instruction.i_in < 0:
                raise ValueError(f"{name} has a bias; the decomposition E = Σ w·f + Σ e0 assumes none")
            mul, irrep = linear.irreps_in[instruction.i_in]
            if irrep != _SCALAR:
                raise ValueError(f"{name}: energy path fed by {irrep} channels, expected 0e")
            blocks.append(
                _Block(name, linear, slices[instruction.i_in], float(instruction.path_weight), weight.reshape(mul))
            )
    return blocks


def _scale_shift(model: torch.nn.Module) -> tuple[float, float]:
    """ScaleShiftMACE's (scale, shift); (1, 0) for a plain MACE."""
    block = getattr(model, "scale_shift", None)
    if block is None:
        return 1.0, 0.0
    scale, shift = torch.atleast_1d(block.scale), torch.atleast_1d(block.shift)
    if scale.numel() != 1 or shift.numel() != 1:
        raise ValueError("only single-head models are supported")
    return float(scale[0]), float(shift[0])


def last_layer_weights(model: torch.nn.Module) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """The raw readout weights ``w`` (d,) and the blocks ``(readout name, start, stop)`` for CPR.

    ``w`` is unscaled; the ScaleShift ``scale`` and e3nn's path normalisation live in the features
    (module docstring), so ``E = Σ_j w · f_j + Σ_j e0_j`` with features from :func:`compute_features`.
    """
    blocks = _blocks(model)
    w = np.concatenate([b.weight.detach().cpu().double().numpy() for b in blocks])
    spans: list[tuple[str, int, int]] = []
    start = 0
    for b in blocks:
        stop = start + b.weight.numel()
        if spans and spans[-1][0] == b.readout:
            spans[-1] = (b.readout, spans[-1][1], stop)
        else:
            spans.append((b.readout, start, stop))
        start = stop
    return w, spans


def _scalar_columns(irreps: o3.Irreps) -> list[slice]:
    """Column slices of the scalar (0e) channels in a feature tensor laid out as ``irreps``."""
    return [s for (_, irrep), s in zip(irreps, irreps.slices()) if irrep == _SCALAR]


@contextmanager
def _hooked(model: torch.nn.Module) -> Iterator[Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """Forward hooks on the readouts' energy-producing linears and the last product block.

    Yields a function that, after a forward pass, returns ``(last_layer, invariant)`` per atom: the
    last-layer features with the ScaleShift scale and the path normalisation folded in (so
    ``E = Σ_j w·f_j + Σ_j e0_j`` with ``w`` the raw readout weights), and the scalar channels after
    the last product block.
    """
    blocks = _blocks(model)
    scale, _ = _scale_shift(model)
    invariant_columns = _scalar_columns(model.products[-1].linear.irreps_out)
    captured: dict[str, torch.Tensor] = {}

    def capture_input(key: str):
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[key] = args[0]

        return hook

    def capture_output(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        captured["invariant"] = output

    linears = {id(b.linear): b.linear for b in blocks}
    handles = [linear.register_forward_pre_hook(capture_input(str(key))) for key, linear in linears.items()]
    handles.append(model.products[-1].register_forward_hook(capture_output))

    def read() -> tuple[torch.Tensor, torch.Tensor]:
        last_layer = torch.cat(
            [scale * b.path_weight * captured[str(id(b.linear))][:, b.in_slice] for b in blocks], dim=1
        )
        invariant = torch.cat([captured["invariant"][:, s] for s in invariant_columns], dim=1)
        return last_layer, invariant

    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()


def _prepared(model_path: Path | torch.nn.Module, atoms_list: Sequence[Atoms], device: str):
    resolved = resolve_device(device)
    model = model_path if isinstance(model_path, torch.nn.Module) else load_model(model_path, resolved)
    z_table = model_z_table(model)
    check_elements(atoms_list, z_table, "feature", str(model_path))
    return resolved, model, z_table, [unlabelled_config(atoms) for atoms in atoms_list]


def compute_features(
    model_path: Path | torch.nn.Module, atoms_list: Sequence[Atoms], device: str = "auto", batch_size: int = 16
) -> list[AtomFeatures]:
    """Last-layer and invariant features of every structure, one :class:`AtomFeatures` each, in order.

    ``model_path`` may also be a model already loaded with :func:`load_model` (on ``device``), so a
    caller that featurizes repeatedly (an MD run grading every frame) loads it once.
    Batched through mace's DataLoader with graphs built per batch (so memory stays bounded for large
    candidate pools), under ``torch.no_grad()`` with ``compute_force=False``, on ``device`` (``'auto'``:
    the GPU when there is one).
    """
    if not atoms_list:
        return []
    resolved, model, z_table, configs = _prepared(model_path, atoms_list, device)
    _, shift = _scale_shift(model)
    atomic_energies = torch.atleast_2d(model.atomic_energies_fn.atomic_energies).T[:, 0].double().cpu().numpy()
    results: list[AtomFeatures] = []
    with _hooked(model) as read, default_dtype(model_dtype(model)), torch.no_grad():
        for batch in iterate_batches(configs, z_table, float(model.r_max), batch_size):
            batch = batch.to(resolved)
            output = model(batch.to_dict(), training=False, compute_force=False)
            last_layer, invariant = (t.double().cpu().numpy() for t in read())
            energies = output["energy"].double().cpu().numpy()
            species = batch.node_attrs.argmax(dim=1).cpu().numpy()
            ptr = batch.ptr.cpu().numpy()
            for g in range(len(ptr) - 1):
                atoms_slice = slice(ptr[g], ptr[g + 1])
                results.append(
                    AtomFeatures(
                        last_layer=last_layer[atoms_slice],
                        invariant=invariant[atoms_slice],
                        energy=float(energies[g]),
                        e0=atomic_energies[species[atoms_slice]] + shift,
                    )
                )
    return results


def feature_jacobians(
    model_path: Path | torch.nn.Module,
    atoms_list: Sequence[Atoms],
    device: str = "auto",
    vjp_chunk: int | None | str = "auto",
) -> list[np.ndarray]:
    """``∂f_s/∂r`` per structure as an ``(n_atoms, 3, d)`` array (the force term of the Hessian,
    METHODS §2): ``−J·w`` are the model's forces. Vector–Jacobian products, ``vjp_chunk`` features
    per batched backward pass (:func:`alforge.mlip.jacobians.structure_jacobians`; ``"auto"``: all
    ``d`` in one pass on CUDA, one per pass on the CPU where batching was measured slower). The
    compact, weighted rows of the loss Hessian are :func:`alforge.mlip.jacobians.label_rows`."""
    from alforge.mlip.jacobians import atom_batches, default_vjp_chunk, structure_jacobians

    if not atoms_list:
        return []
    resolved, model, z_table, configs = _prepared(model_path, atoms_list, device)
    chunk = default_vjp_chunk(resolved) if vjp_chunk == "auto" else vjp_chunk
    out: list[np.ndarray] = []
    with _hooked(model) as read, default_dtype(model_dtype(model)), torch.enable_grad():
        for group in atom_batches([len(a) for a in atoms_list]):
            members = [configs[k] for k in group]
            (batch,) = iterate_batches(members, z_table, float(model.r_max), len(members))
            _, d_pos, _ = structure_jacobians(model, read, batch, resolved, False, chunk)
            d_pos = d_pos.permute(1, 2, 0).double().cpu().numpy()  # (atoms of the batch, 3, d)
            ptr = batch.ptr.cpu().numpy()
            out.extend(d_pos[ptr[g] : ptr[g + 1]] for g in range(len(members)))
    return out
