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
from e3nn.nn import FullyConnectedNet  # isort: skip
from mace.data.neighborhood import get_neighborhood
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

__all__ = ["FEATURE_ATOMS_PER_BATCH", "AtomFeatures", "compute_features", "feature_jacobians", "last_layer_weights"]

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


def _loaded(model_path: Path | torch.nn.Module, atoms_list: Sequence[Atoms], device: str):
    """The resolved device, the model on it and its element table, every structure's elements checked."""
    resolved = resolve_device(device)
    model = model_path if isinstance(model_path, torch.nn.Module) else load_model(model_path, resolved)
    z_table = model_z_table(model)
    check_elements(atoms_list, z_table, "feature", str(model_path))
    return resolved, model, z_table


def _prepared(model_path: Path | torch.nn.Module, atoms_list: Sequence[Atoms], device: str):
    """:func:`_loaded` plus a mace ``Configuration`` per structure (for mace's own graph batching)."""
    resolved, model, z_table = _loaded(model_path, atoms_list, device)
    return resolved, model, z_table, [unlabelled_config(atoms) for atoms in atoms_list]


#: Atoms per forward pass of :func:`compute_features`, by device type. On the CPU the edge tensors
#: of a batch (about 40 edges per atom in a metal at r_max 4.5 Å, hundreds of channels per edge
#: in the tensor product) must stay in cache: 64–256 atoms per batch ran 1.3–2× faster than 32
#: or ≥ 512 (``benchmarks/bench_features.py --sweep``, 32-atom Cu cells). On CUDA large batches
#: amortise the kernel launches (not yet measured: no GPU was lent).
FEATURE_ATOMS_PER_BATCH = {"cpu": 128, "cuda": 4096}
_DEFAULT_ATOMS = FEATURE_ATOMS_PER_BATCH["cpu"]  # other device types (mps, xpu): untuned
_Pairs = tuple[torch.Tensor, torch.Tensor]  # (first, inverse) of _edge_pairs, on the device


def _graph(
    atoms_list: Sequence[Atoms], species: Sequence[np.ndarray], n_elements: int, r_max: float, device: str
) -> tuple[dict[str, torch.Tensor], _Pairs | None]:
    """The input dict mace's model reads for a batch of structures, built directly.

    Equal, tensor by tensor, to ``Batch.from_data_list([AtomicData.from_config(...)]).to_dict()``
    for the keys the forward pass reads (the test compares them), without building the dozens of
    label and weight tensors of each ``AtomicData`` and collating them in Python. The neighbour list
    is mace's own :func:`get_neighborhood` (matscipy), so edges, their order and the shifts are
    mace's. Tensors are made in the default dtype (the caller's :func:`default_dtype`). Also
    returns the edges' pairs (:func:`_edge_pairs`) on ``device``.
    """
    dtype = torch.get_default_dtype()
    positions, cells, edges, shifts, unit_shifts, counts = [], [], [], [], [], []
    offset = 0
    for atoms in atoms_list:
        pbc = tuple(bool(p) for p in atoms.pbc)
        # a copy of the cell: mace overwrites the non-periodic directions' rows in place
        edge_index, shift, unit_shift, cell = get_neighborhood(
            positions=atoms.positions, cutoff=r_max, pbc=pbc, cell=np.array(atoms.cell)
        )
        positions.append(atoms.positions)
        cells.append(cell)
        edges.append(edge_index + offset)
        shifts.append(shift)
        unit_shifts.append(unit_shift)
        counts.append(len(atoms))
        offset += len(atoms)
    edge_index, unit_shifts = np.concatenate(edges, axis=1), np.concatenate(unit_shifts)
    pairs = _edge_pairs(edge_index, unit_shifts)
    index = torch.from_numpy(np.concatenate(species))
    n_graphs = len(atoms_list)
    graph = {
        "positions": torch.from_numpy(np.concatenate(positions)).to(dtype),
        "node_attrs": torch.nn.functional.one_hot(index, n_elements).to(dtype),
        "edge_index": torch.from_numpy(edge_index).long(),
        "shifts": torch.from_numpy(np.concatenate(shifts)).to(dtype),
        "unit_shifts": torch.from_numpy(unit_shifts).to(dtype),
        "cell": torch.from_numpy(np.concatenate(cells)).to(dtype),
        "batch": torch.repeat_interleave(torch.arange(n_graphs), torch.tensor(counts)),
        "ptr": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])).long(),
        "head": torch.zeros(n_graphs, dtype=torch.long),
    }
    on_device = None if pairs is None else tuple(torch.from_numpy(p).to(device) for p in pairs)
    return {key: value.to(device) for key, value in graph.items()}, on_device


def _edge_pairs(edge_index: np.ndarray, unit_shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each edge's undirected pair: ``(first, inverse)`` with ``first`` one edge per pair and
    ``inverse`` the pair of every edge, so ``x[first][inverse]`` repeats a per-pair value per edge.

    Edge ``(i, j, S)`` and its reverse ``(j, i, −S)`` have bitwise the same length (IEEE negation
    is exact), so the radial MLP gives both the same weights (:func:`_shared_radial_mlp`). The
    pair key is a mixed-radix integer of ``(i, j, S)`` and its reverse, whichever is smaller;
    ``None`` when that key would overflow int64 (then nothing is shared).
    """
    if edge_index.shape[1] == 0:
        return None
    reach = int(np.abs(unit_shifts).max()) if unit_shifts.size else 0
    radix, n_nodes = 2 * reach + 1, int(edge_index.max()) + 1
    if n_nodes * n_nodes * radix**3 >= 2**62:
        return None
    shifts = unit_shifts.astype(np.int64) + reach
    sender, receiver = edge_index.astype(np.int64)

    def key(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
        return (((a * n_nodes + b) * radix + s[:, 0]) * radix + s[:, 1]) * radix + s[:, 2]

    pair = np.minimum(key(sender, receiver, shifts), key(receiver, sender, 2 * reach - shifts))
    _, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
    return first, inverse


@contextmanager
def _shared_radial_mlp(model: torch.nn.Module) -> Iterator[Callable[[_Pairs | None], None]]:
    """Evaluate each interaction's radial MLP (``conv_tp_weights``) once per undirected edge pair.

    The MLP maps each edge's radial features row by row, and an edge and its reverse have the same
    length, so half the rows suffice: about a fifth of a CPU forward pass saved. A forward pre-hook
    feeds the MLP the pairs' rows and a forward hook spreads its output back to every edge. Yields
    ``set_pairs((first, inverse))``, to call before each forward pass (``None``: nothing shared).
    The pre-hook checks that the rows of each pair are identical (as they are for mace's radial
    embeddings, which depend on the length and on the two elements symmetrically); where they are
    not, that MLP runs on every edge as usual, so the output is never changed.
    """
    state: dict[str, object] = {"pairs": None, "shared": False}

    def before(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        pairs, (edge_feats, *rest) = state["pairs"], args
        state["shared"] = False
        if pairs is None or rest or edge_feats.shape[0] != pairs[1].shape[0]:
            return None
        first, inverse = pairs
        reduced = edge_feats[first]
        if not torch.equal(reduced[inverse], edge_feats):
            return None
        state["shared"] = True
        return (reduced,)

    def after(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return output[state["pairs"][1]] if state["shared"] else None

    handles = []
    for interaction in model.interactions:
        mlp = getattr(interaction, "conv_tp_weights", None)
        if isinstance(mlp, FullyConnectedNet):  # row-wise by construction
            handles += [mlp.register_forward_pre_hook(before), mlp.register_forward_hook(after)]

    def set_pairs(pairs: _Pairs | None) -> None:
        state["pairs"] = pairs

    try:
        yield set_pairs
    finally:
        for handle in handles:
            handle.remove()


def _species(atoms_list: Sequence[Atoms], z_table) -> list[np.ndarray]:
    """Per structure, each atom's row in the model's element table (the one-hot index)."""
    lookup = np.full(max(z_table.zs) + 1, -1, dtype=np.int64)
    lookup[list(z_table.zs)] = np.arange(len(z_table.zs))
    return [lookup[atoms.numbers] for atoms in atoms_list]


def compute_features(
    model_path: Path | torch.nn.Module,
    atoms_list: Sequence[Atoms],
    device: str = "auto",
    batch_size: int | None = None,
    atoms_per_batch: int | None = None,
) -> list[AtomFeatures]:
    """Last-layer and invariant features of every structure, one :class:`AtomFeatures` each, in order.

    ``model_path`` may also be a model already loaded with :func:`load_model` (on ``device``), so a
    caller that featurizes repeatedly (an MD run grading every frame) loads it once.
    Structures go through the model in consecutive batches of at most ``atoms_per_batch`` atoms
    (default :data:`FEATURE_ATOMS_PER_BATCH` for the device; a larger structure goes alone) and,
    if given, at most ``batch_size`` structures; graphs are built per batch, so memory stays
    bounded for large candidate pools. Under ``torch.no_grad()`` with ``compute_force=False``, on
    ``device`` (``'auto'``: the GPU when there is one). The batching changes nothing but rounding.
    """
    from alforge.mlip.jacobians import atom_batches

    for name, value in (("batch_size", batch_size), ("atoms_per_batch", atoms_per_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if not atoms_list:
        return []
    resolved, model, z_table = _loaded(model_path, atoms_list, device)
    budget = atoms_per_batch or FEATURE_ATOMS_PER_BATCH.get(torch.device(resolved).type, _DEFAULT_ATOMS)
    _, shift = _scale_shift(model)
    atomic_energies = torch.atleast_2d(model.atomic_energies_fn.atomic_energies).T[:, 0].double().cpu().numpy()
    species = _species(atoms_list, z_table)
    r_max = float(model.r_max)
    results: list[AtomFeatures] = []
    with (
        _hooked(model) as read,
        _shared_radial_mlp(model) as set_pairs,
        default_dtype(model_dtype(model)),
        torch.no_grad(),
    ):
        for group in atom_batches([len(a) for a in atoms_list], budget, batch_size):
            members = [atoms_list[k] for k in group]
            graph, pairs = _graph(members, [species[k] for k in group], len(z_table), r_max, resolved)
            set_pairs(pairs)
            output = model(graph, training=False, compute_force=False)
            # to the host first, then to float64: half the transfer for a float32 model on a GPU
            last_layer, invariant, energies = (t.cpu().double().numpy() for t in (*read(), output["energy"]))
            e0 = atomic_energies[np.concatenate([species[k] for k in group])] + shift
            ptr = graph["ptr"].cpu().numpy()
            for g in range(len(members)):
                atoms_slice = slice(ptr[g], ptr[g + 1])
                results.append(
                    AtomFeatures(
                        last_layer=last_layer[atoms_slice],
                        invariant=invariant[atoms_slice],
                        energy=float(energies[g]),
                        e0=e0[atoms_slice],
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
