"""Train, evaluate and load MACE models on plain ``ase.Atoms`` (mace-torch 0.3.16).

Training uses mace's building blocks (``mace.data``, ``mace.modules``, mace's torch_geometric
``DataLoader``, ``WeightedEnergyForcesStressLoss``, EMA via ``torch_ema``) in a small loop of our own
rather than the ``mace_run_train`` CLI, which takes seconds to start, parses argv and writes files into
the current directory. The recipe follows mace's defaults for ``--model ScaleShiftMACE`` (residual
interaction blocks, SiLU gate, radial MLP [64, 64, 64], ``rms_forces_scaling``, E0s by least squares,
AMSGrad Adam, gradient clipping at 10, EMA) with the small hyperparameters of ``MACEParams``.

Reference labels are read from ``atoms.calc.results`` (``'energy'``, ``'forces'`` and optionally
``'stress'``, as ASE's ``SinglePointCalculator`` stores them); a structure without stress simply gets
no stress loss.

A model file holds no pickled code: it is a dict of plain values and tensors — the constructor
settings of the ScaleShiftMACE (``architecture``) and its ``state_dict`` — written with ``torch.save``
and read with ``torch.load(..., weights_only=True)``, so a planted or corrupted file can at worst
fail to load. mace's own format (the pickled module) cannot be read that way: its
``SymmetricContraction`` holds ``torch.fx`` graph modules, which unpickle by executing Python source
stored in the file. :func:`export_mace_model` writes that format for ``MACECalculator(model_paths=...)``
and mace's tools.

Beside every saved model, ``<model path>.training.json`` records the loss it was trained with (the
λ's, whether stress was trained, batch size, readout weight decay, dtype) and the exact training
split (sizes and indices into the ``train`` list), so the loss-consistent Hessian
(:mod:`alforge.uncertainty.gauss_newton`) can be rebuilt from the model alone; read it with
:func:`read_training_settings`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.stress import voigt_6_to_full_3x3_stress
import alforge.mlip.mace_import  # noqa: F401  # isort: skip  (before mace and e3nn: see there)
from e3nn import o3
from mace import data as mace_data
from mace import modules
from mace.calculators import MACECalculator
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric import DataLoader
from mace.tools.torch_geometric.batch import Batch
from torch_ema import ExponentialMovingAverage

from alforge.mlip.device import default_dtype, dtype_name, resolve_device, torch_dtype
from alforge.mlip.params import MACEParams

__all__ = [
    "EpochCallback",
    "TrainResult",
    "TrainingErrorLog",
    "evaluate",
    "export_mace_model",
    "load_calculator",
    "load_model",
    "read_training_settings",
    "resolve_device",
    "train_mace",
    "training_settings_path",
]

log = logging.getLogger(__name__)

HEADS = ["Default"]
# mace's ``--clip_grad`` default; large-force outliers in early epochs otherwise blow up Adam.
MAX_GRAD_NORM = 10.0
# Fewer structures than this: no validation split (one structure would be a noisy stopping signal
# and costs a fifth of the data).
MIN_STRUCTURES_FOR_SPLIT = 5
#: Version of the ``<model>.training.json`` layout.
TRAINING_SETTINGS_FORMAT = 1
#: ``format`` of a model file (module docstring).
MODEL_FORMAT = "alforge.mace-state/1"
#: Weight decay on the readout weights: mace's recipe puts readouts in a parameter group with
#: weight_decay 0 and our Adam has none at all, so the readouts are trained without a prior.
READOUT_WEIGHT_DECAY = 0.0
#: ``on_epoch(epoch, total, train_loss, valid)`` of :func:`train_mace`
EpochCallback = Callable[[int, int, float, dict[str, float]], None]


@dataclass
class TrainResult:
    """Outcome of :func:`train_mace`.

    ``metrics`` holds errors of the saved (best-validation EMA) weights, prefixed ``train_``/``valid_``:
    ``*_energy_rmse_per_atom`` and ``*_energy_mae_per_atom`` (eV/atom), ``*_forces_rmse``/``_mae``
    (eV/Å, per Cartesian component), ``*_stress_rmse``/``_mae`` (eV/Å³, per 3×3 component, only for
    structures with reference stress), plus ``best_epoch`` and ``wall_time_s``.
    ``history`` has one small dict per epoch: ``epoch``, ``train_loss`` (mean over the epoch's
    batches, current weights) and, with a validation set, ``valid_loss`` and the validation errors of
    the EMA weights.
    """

    model_path: Path
    metrics: dict[str, float]
    epochs: int
    history: list[dict[str, float]]
    finetuned: bool = field(default=False)
    #: what was written to ``<model path>.training.json`` (:func:`read_training_settings`)
    training: dict = field(default_factory=dict)
    #: the training errors of every epoch (:class:`TrainingErrorLog`), None only for results made
    #: without training
    errors: TrainingErrorLog | None = None


#: Largest value a float16 holds; a larger error (a diverging first epoch) is stored as this.
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class TrainingErrorLog:
    """The error of every training sample in every epoch, as seen by that epoch's training pass.

    Rows follow the training split in order (``training["train_indices"]`` of the result: atoms of
    the first training structure first); column ``t`` is epoch ``t + 1``. ``forces[i, t] =
    ‖F_ref,i − F̂_i‖₂`` (eV/Å) of atom ``i``, NaN for atoms of a structure without reference forces;
    ``energy[s, t] = |E_ref,s − Ê_s|`` (eV, the whole structure's energy). The prediction is the one
    the optimiser step of that batch used (current weights, not the EMA), i.e. the loss trajectory
    LTAU (METHODS §7) integrates; a fine-tuning logs its own epochs only.

    float16, so 2 bytes per atom-epoch and per structure-epoch: a few hundred epochs of 1e5 atoms
    is tens of MB in memory, which is fine here; what the store keeps is summarised
    (:func:`alforge.uncertainty.ltau.summarize_error_log`). Errors above float16's range are clipped
    to :data:`FLOAT16_MAX`.
    """

    forces: np.ndarray
    energy: np.ndarray
    #: atoms of each training structure, in row order (so force rows can be split per structure)
    atom_counts: np.ndarray


# --------------------------------------------------------------------------- data conversion


def _describe(atoms: Atoms, index: int, what: str) -> str:
    """Name a structure in error messages: its position in the caller's list and its formula."""
    return f"{what} structure {index} ({atoms.get_chemical_formula()}, {len(atoms)} atoms)"


def _reference_config(atoms: Atoms, index: int, what: str) -> mace_data.Configuration:
    """Convert a labelled ``Atoms`` (labels in ``atoms.calc.results``) into a mace ``Configuration``.

    Missing stress gives the structure a zero stress weight (mace's own convention), so periodic and
    non-periodic structures can be trained together; missing forces (energy-only test structures)
    likewise give zero forces with a zero forces weight, and :func:`evaluate` leaves them out of the
    force errors.
    """
    name = _describe(atoms, index, what)
    results = atoms.calc.results if atoms.calc is not None else {}
    if "energy" not in results:
        raise ValueError(f"{name} has no reference 'energy' in atoms.calc.results")
    energy = float(results["energy"])
    has_forces = results.get("forces") is not None
    forces = np.asarray(results["forces"], dtype=float) if has_forces else np.zeros((len(atoms), 3))
    if forces.shape != (len(atoms), 3):
        raise ValueError(f"{name}: reference forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = results.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        if stress.shape == (6,):
            stress = voigt_6_to_full_3x3_stress(stress)
        elif stress.shape != (3, 3):
            raise ValueError(f"{name}: reference stress has shape {stress.shape}, expected (6,) or (3, 3)")
        if abs(atoms.cell.volume) < 1e-9:
            raise ValueError(f"{name}: reference stress given for a structure without a cell volume")
    values = [energy, forces] + ([stress] if stress is not None else [])
    if not all(np.all(np.isfinite(v)) for v in values):
        raise ValueError(f"{name} has non-finite reference labels")
    return mace_data.Configuration(
        atomic_numbers=atoms.get_atomic_numbers().copy(),
        positions=atoms.get_positions(),
        properties={"energy": energy, "forces": forces, "stress": stress},
        property_weights={"energy": 1.0, "forces": 1.0 if has_forces else 0.0, "stress": 0.0 if stress is None else 1.0},
        cell=np.array(atoms.get_cell()),
        pbc=tuple(bool(p) for p in atoms.pbc),
    )


def unlabelled_config(atoms: Atoms) -> mace_data.Configuration:
    """A mace ``Configuration`` carrying only geometry (for prediction and feature extraction)."""
    return mace_data.Configuration(
        atomic_numbers=atoms.get_atomic_numbers().copy(),
        positions=atoms.get_positions(),
        properties={},
        property_weights={},
        cell=np.array(atoms.get_cell()),
        pbc=tuple(bool(p) for p in atoms.pbc),
    )


def check_elements(atoms_list: Sequence[Atoms], z_table: AtomicNumberTable, what: str, model_name: str) -> None:
    """Raise naming the first structure that has an element the model was not built for."""
    known = set(z_table.zs)
    for i, atoms in enumerate(atoms_list):
        unknown = set(atoms.get_atomic_numbers().tolist()) - known
        if unknown:
            raise ValueError(
                f"{_describe(atoms, i, what)} contains atomic numbers {sorted(unknown)} unknown to "
                f"{model_name} (elements {z_table.zs})"
            )


class LazyGraphs(torch.utils.data.Dataset):
    """Builds mace ``AtomicData`` graphs on demand, so only one batch of graphs exists at a time.

    Must be iterated inside :func:`default_dtype` of the model's dtype (mace builds its tensors with
    ``torch.get_default_dtype()``).
    """

    def __init__(self, configs: Sequence[mace_data.Configuration], z_table: AtomicNumberTable, r_max: float):
        self.configs = configs
        self.z_table = z_table
        self.r_max = r_max

    def __len__(self) -> int:
        return len(self.configs)

    def __getitem__(self, index: int) -> mace_data.AtomicData:
        return mace_data.AtomicData.from_config(
            self.configs[index], z_table=self.z_table, cutoff=self.r_max, heads=HEADS
        )


def iterate_batches(
    configs: Sequence[mace_data.Configuration], z_table: AtomicNumberTable, r_max: float, batch_size: int
) -> Iterator[Batch]:
    """Batches in input order through mace's DataLoader, graphs built lazily per batch."""
    loader = DataLoader(LazyGraphs(configs, z_table, r_max), batch_size=batch_size, shuffle=False)
    yield from loader


# --------------------------------------------------------------------------- model I/O


def model_z_table(model: torch.nn.Module) -> AtomicNumberTable:
    """The element table in the model's one-hot order (the ``atomic_numbers`` buffer)."""
    return AtomicNumberTable([int(z) for z in model.atomic_numbers])


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters."""
    return next(model.parameters()).dtype


class ModelFormatError(ValueError):
    """A model file that is not an alforge model file (a pickled module, a planted file, garbage)."""


def _architecture(kwargs: dict) -> dict:
    """The ScaleShiftMACE constructor arguments as plain values (names for classes and functions)."""
    arch = dict(kwargs)
    for key in ("interaction_cls", "interaction_cls_first"):
        arch[key] = next(name for name, cls in modules.interaction_classes.items() if cls is arch[key])
    arch["gate"] = next(name for name, fn in modules.gate_dict.items() if fn is arch["gate"])
    arch["hidden_irreps"] = str(arch["hidden_irreps"])
    arch["MLP_irreps"] = str(arch["MLP_irreps"])
    arch["atomic_energies"] = [float(e) for e in arch["atomic_energies"]]
    arch["atomic_numbers"] = [int(z) for z in arch["atomic_numbers"]]
    return arch


def _construct(arch: dict) -> torch.nn.Module:
    """A ScaleShiftMACE from :func:`_architecture`'s record; class and gate names are looked up in
    mace's registries, never imported by name."""
    kwargs = dict(arch)
    for key in ("interaction_cls", "interaction_cls_first"):
        kwargs[key] = modules.interaction_classes[kwargs[key]]
    kwargs["gate"] = modules.gate_dict[kwargs["gate"]]
    kwargs["hidden_irreps"] = o3.Irreps(kwargs["hidden_irreps"])
    kwargs["MLP_irreps"] = o3.Irreps(kwargs["MLP_irreps"])
    kwargs["atomic_energies"] = np.array(kwargs["atomic_energies"])
    return modules.ScaleShiftMACE(**kwargs)


def _read(model_path: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """(model in train mode, architecture) from a file written by :func:`_save_model`, unpickling
    nothing but plain values and tensors."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"MACE model file {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # built on the CPU, then moved
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError):  # torch's weights-only unpickler refused it
            needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            raise ModelFormatError(
                f"{path} is not an alforge model file and was not loaded: it pickles objects beyond "
                f"weights and settings{f' (it needs {needs.group(1)})' if needs else ''}, as mace's "
                "format or a planted file does, and unpickling it could run code"
            ) from None
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelFormatError(f"{path} is not an alforge model file and was not loaded "
                               f"({type(exc).__name__}: {first_line})") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ModelFormatError(f"{path} is not an alforge model file (format {found!r}, expected {MODEL_FORMAT!r})")
    arch = saved["architecture"]
    try:
        with default_dtype(torch_dtype(saved["dtype"])):
            model = _construct(arch)
        model.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{path}: its architecture and weights do not make a MACE model: {exc}") from None
    return model.to(device), arch


def load_model(model_path: Path, device: str = "auto") -> torch.nn.Module:
    """Load a model saved by :func:`train_mace` onto ``device`` in eval mode, parameters frozen."""
    model, _ = _read(model_path, resolve_device(device))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_calculator(model_path: Path, device: str = "auto") -> Calculator:
    """An ASE ``MACECalculator`` for the model, in the dtype the model was trained in."""
    resolved = resolve_device(device)
    model = load_model(model_path, resolved)
    return MACECalculator(models=model, device=resolved, default_dtype=dtype_name(model_dtype(model)))


def export_mace_model(model_path: Path, out_path: Path) -> None:
    """Write the model in mace's own format (the pickled module, on CPU) for
    ``MACECalculator(model_paths=...)`` and mace's tools; alforge itself never reads that format."""
    torch.save(load_model(model_path, "cpu"), out_path)


def _save_model(model: torch.nn.Module, arch: dict, out_path: Path) -> None:
    """``torch.save`` the architecture and the CPU weights (module docstring), via a temporary file
    so a crash never leaves a truncated model behind."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    state = {key: value.detach().to("cpu") for key, value in model.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "dtype": dtype_name(model_dtype(model)), "architecture": arch,
                "state_dict": state}, tmp)
    os.replace(tmp, out_path)


def training_settings_path(model_path: Path) -> Path:
    """``<model path>.training.json``: the training settings written beside a model."""
    return Path(f"{model_path}.training.json")


_SETTINGS_KEYS = (
    "energy_weight", "forces_weight", "stress_weight", "stress_trained", "batch_size",
    "readout_weight_decay", "n_structures", "n_atoms", "n_stress_structures", "dtype",
)  # fmt: skip


def read_training_settings(model_path: Path) -> dict:
    """The settings :func:`train_mace` recorded beside ``model_path`` (module docstring).

    Keys: ``loss`` (mace's loss class), ``energy_weight``/``forces_weight``/``stress_weight`` (λ's of
    that loss), ``stress_trained``, ``batch_size``, ``readout_weight_decay``, ``weight_decay``,
    ``n_structures``/``n_atoms``/``n_stress_structures`` (the training split actually fitted),
    ``train_indices``/``valid_indices`` (into the ``train`` list given to :func:`train_mace`; the
    validation indices are empty when a separate ``valid`` list was passed), ``dtype``, ``epochs``,
    ``finetuned``. Raises naming the file when it is missing or invalid.
    """
    path = training_settings_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"training settings {path} of model {model_path} do not exist (models trained before they "
            "were recorded: pass the loss weights explicitly)"
        )
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"training settings {path} are not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"training settings {path} must hold a JSON object")
    missing = [k for k in _SETTINGS_KEYS if k not in settings]
    if missing:
        raise ValueError(f"training settings {path} lack {missing}")
    if settings.get("format") != TRAINING_SETTINGS_FORMAT:
        raise ValueError(f"training settings {path} have format {settings.get('format')!r}, "
                         f"expected {TRAINING_SETTINGS_FORMAT}")
    return settings


def _write_training_settings(model_path: Path, settings: dict) -> None:
    path = training_settings_path(model_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- errors


class _ErrorAccumulator:
    """Running sums for energy-per-atom, force and stress RMSE/MAE over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {"energy": [0.0, 0.0, 0], "forces": [0.0, 0.0, 0], "stress": [0.0, 0.0, 0]}

    def _add(self, key: str, delta: torch.Tensor) -> None:
        entry = self.sums[key]
        entry[0] += float(torch.sum(delta**2))
        entry[1] += float(torch.sum(torch.abs(delta)))
        entry[2] += delta.numel()

    def add(self, batch: Batch, output: dict[str, torch.Tensor | None]) -> None:
        num_atoms = batch.ptr[1:] - batch.ptr[:-1]
        self._add("energy", (output["energy"].detach() - batch.energy) / num_atoms)
        has_forces = (batch.forces_weight > 0)[batch.batch]  # per atom: its structure has reference forces
        self._add("forces", output["forces"].detach()[has_forces] - batch.forces[has_forces])
        if output.get("stress") is not None:
            has_stress = batch.stress_weight > 0
            self._add("stress", output["stress"].detach()[has_stress] - batch.stress[has_stress])

    def metrics(self) -> dict[str, float]:
        names = {"energy": "energy_{}_per_atom", "forces": "forces_{}", "stress": "stress_{}"}
        out: dict[str, float] = {}
        for key, (sq, ab, n) in self.sums.items():
            if n:
                out[names[key].format("rmse")] = math.sqrt(sq / n)
                out[names[key].format("mae")] = ab / n
        return out


def _model_errors(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    device: str,
    compute_stress: bool,
    loss_fn: torch.nn.Module | None = None,
) -> tuple[dict[str, float], float]:
    """Errors of ``model`` over ``batches`` (and the mean loss when ``loss_fn`` is given).

    Forces and stress need autograd with respect to positions, so this runs with grad enabled; the
    model's parameters need not require grad.
    """
    accumulator = _ErrorAccumulator()
    loss_sum, n_graphs = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        output = model(batch.to_dict(), training=False, compute_force=True, compute_stress=compute_stress)
        accumulator.add(batch, output)
        if loss_fn is not None:
            loss_sum += loss_fn(pred=output, ref=batch).item() * batch.num_graphs
            n_graphs += batch.num_graphs
    return accumulator.metrics(), (loss_sum / n_graphs if n_graphs else float("nan"))


def evaluate(model_path: Path, atoms_list: list[Atoms], device: str = "auto", batch_size: int = 16) -> dict[str, float]:
    """Errors of a saved model against the reference labels in ``atoms.calc.results``.

    Returns ``energy_rmse_per_atom``/``energy_mae_per_atom`` (eV/atom), ``forces_rmse``/``forces_mae``
    (eV/Å, per Cartesian component, over the structures with reference forces only; absent if none
    has any) and, when any structure has reference stress,
    ``stress_rmse``/``stress_mae`` (eV/Å³, per 3×3 component, over those structures only), plus
    ``n_structures`` and ``n_atoms``.
    """
    if not atoms_list:
        raise ValueError("evaluate() needs at least one structure")
    resolved = resolve_device(device)
    model = load_model(model_path, resolved)
    z_table = model_z_table(model)
    check_elements(atoms_list, z_table, "evaluation", str(model_path))
    configs = [_reference_config(atoms, i, "evaluation") for i, atoms in enumerate(atoms_list)]
    compute_stress = any(c.properties["stress"] is not None for c in configs)
    with default_dtype(model_dtype(model)):
        batches = iterate_batches(configs, z_table, float(model.r_max), batch_size)
        metrics, _ = _model_errors(model, batches, resolved, compute_stress)
    metrics["n_structures"] = float(len(atoms_list))
    metrics["n_atoms"] = float(sum(len(a) for a in atoms_list))
    return metrics


# --------------------------------------------------------------------------- training


def _split(n: int, params: MACEParams) -> tuple[list[int], list[int]]:
    """Random train/validation indices: ``valid_fraction`` of ``n`` (≥ 1 when ``n`` ≥ 5), seeded."""
    if n < MIN_STRUCTURES_FOR_SPLIT or params.valid_fraction == 0:
        return list(range(n)), []
    n_valid = max(1, int(round(params.valid_fraction * n)))
    order = np.random.default_rng(params.seed).permutation(n)
    return sorted(order[n_valid:].tolist()), sorted(order[:n_valid].tolist())


def _hidden_irreps(params: MACEParams) -> o3.Irreps:
    """``num_channels`` copies of each L ≤ ``max_L`` (mace's ``--num_channels/--max_L`` rule)."""
    return o3.Irreps((params.num_channels * o3.Irreps.spherical_harmonics(params.max_L)).sort().irreps.simplify())


def _build_model(
    params: MACEParams, train_configs: list[mace_data.Configuration], z_table: AtomicNumberTable, train_data: list
) -> tuple[torch.nn.Module, dict]:
    """A fresh ScaleShiftMACE with E0s by least squares ("average") and mace's rms_forces_scaling,
    and its architecture record (saved with it)."""
    e0s = mace_data.compute_average_E0s(train_configs, z_table)
    atomic_energies = np.array([e0s[z] for z in z_table.zs])
    stats_loader = DataLoader(train_data, batch_size=params.batch_size, shuffle=False)
    avg_num_neighbors = modules.compute_avg_num_neighbors(stats_loader)
    mean, rms = modules.compute_mean_rms_energy_forces(stats_loader, atomic_energies)
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    kwargs = dict(
        r_max=params.r_max,
        num_bessel=params.num_radial_basis,
        num_polynomial_cutoff=params.num_cutoff_basis,
        max_ell=params.max_ell,
        interaction_cls=interaction,
        interaction_cls_first=interaction,
        num_interactions=params.num_interactions,
        num_elements=len(z_table),
        hidden_irreps=_hidden_irreps(params),
        MLP_irreps=o3.Irreps(params.mlp_irreps),
        atomic_energies=atomic_energies,
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=z_table.zs,
        correlation=params.correlation,
        gate=modules.gate_dict["silu"],
        radial_MLP=[64, 64, 64],
        heads=HEADS,
        atomic_inter_scale=float(np.ravel(rms)[0]),
        atomic_inter_shift=float(np.ravel(mean)[0]),
    )
    return modules.ScaleShiftMACE(**kwargs), _architecture(kwargs)


def _initial_model(
    init_model: Path | None, zs_needed: set[int], out_path: Path
) -> tuple[torch.nn.Module, dict] | None:
    """The model to continue from and its architecture, or ``None`` when there is none or it lacks
    needed elements."""
    if init_model is None:
        return None
    model, arch = _read(Path(init_model), "cpu")
    missing = zs_needed - set(model_z_table(model).zs)
    if missing:
        log.info("init_model %s lacks atomic numbers %s: training %s from scratch", init_model, sorted(missing), out_path)
        return None
    return model, arch


def train_mace(
    train: list[Atoms],
    params: MACEParams,
    out_path: Path,
    init_model: Path | None = None,
    valid: list[Atoms] | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train a ScaleShiftMACE on labelled structures and save the best-validation EMA weights.

    With ``init_model`` whose elements cover ``train`` (and ``valid``), training continues from its
    weights (its E0s, scale, shift, cutoff and architecture are kept) for ``params.finetune_epochs``;
    otherwise a new model is built from ``params`` and trained for ``params.max_epochs``. Without
    ``valid``, ``params.valid_fraction`` of ``train`` (at least one structure when there are ≥ 5) is
    held out with ``params.seed``; with no validation set at all the final EMA weights are saved.

    ``on_epoch(epoch, total, train_loss, valid)`` is called after every epoch (``epoch`` counts
    from 1 to ``total``; ``valid`` holds ``loss``, ``energy_rmse_per_atom``, ``forces_rmse``, ... of
    the EMA weights on the validation split, empty without one), so a caller can log and store a
    training that runs for minutes while it runs.

    Deterministic for a given ``params.seed`` on CPU (CUDA scatter-adds are not bitwise
    reproducible). The global torch RNG is forked and the default dtype restored, so the caller's
    state is unchanged.
    """
    if not train:
        raise ValueError("train_mace() needs at least one training structure")
    started = time.perf_counter()
    out_path = Path(out_path)
    device = resolve_device(params.device)
    dtype = torch_dtype(params.dtype)

    train_configs = [_reference_config(atoms, i, "training") for i, atoms in enumerate(train)]
    if valid is None:
        train_idx, valid_idx = _split(len(train), params)
        valid_configs = [train_configs[i] for i in valid_idx]
        train_configs = [train_configs[i] for i in train_idx]
        valid_atoms = [train[i] for i in valid_idx]
    else:
        train_idx, valid_idx = list(range(len(train))), []
        valid_configs = [_reference_config(atoms, i, "validation") for i, atoms in enumerate(valid)]
        valid_atoms = list(valid)

    rng_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with default_dtype(dtype), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(params.seed)
        zs_needed = {int(z) for c in train_configs + valid_configs for z in c.atomic_numbers}
        initial = _initial_model(init_model, zs_needed, out_path)
        finetuned = initial is not None
        model: torch.nn.Module | None = None
        if initial is not None:
            model, arch = initial
            model = model.to(dtype)
            z_table = model_z_table(model)
            r_max = float(model.r_max)
            epochs = params.finetune_epochs
        else:
            z_table = AtomicNumberTable(sorted({int(z) for c in train_configs for z in c.atomic_numbers}))
            r_max = params.r_max
            epochs = params.max_epochs
        check_elements(valid_atoms, z_table, "validation", "the training set")
        train_data = [
            mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=r_max, heads=HEADS) for c in train_configs
        ]
        valid_data = [
            mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=r_max, heads=HEADS) for c in valid_configs
        ]
        if model is None:
            model, arch = _build_model(params, train_configs, z_table, train_data)
        model = model.to(device)
        for parameter in model.parameters():
            parameter.requires_grad_(True)

        compute_stress = params.stress_weight > 0 and any(
            c.properties["stress"] is not None for c in train_configs + valid_configs
        )
        loss_fn = (
            modules.WeightedEnergyForcesStressLoss(params.energy_weight, params.forces_weight, params.stress_weight)
            if compute_stress
            else modules.WeightedEnergyForcesLoss(params.energy_weight, params.forces_weight)
        ).to(device)
        history, best_epoch, error_log = _fit(
            model, train_data, valid_data, loss_fn, params, epochs, device, compute_stress, on_epoch
        )

        metrics = {"best_epoch": float(best_epoch)}
        for prefix, data in (("train", train_data), ("valid", valid_data)):
            if data:
                loader = DataLoader(data, batch_size=params.batch_size, shuffle=False)
                errors, _ = _model_errors(model, iter(loader), device, compute_stress)
                metrics.update({f"{prefix}_{k}": v for k, v in errors.items()})
        model.eval()
        _save_model(model, arch, out_path)
    settings = {
        "format": TRAINING_SETTINGS_FORMAT,
        "loss": type(loss_fn).__name__,
        "energy_weight": float(params.energy_weight),
        "forces_weight": float(params.forces_weight),
        "stress_weight": float(params.stress_weight) if compute_stress else 0.0,
        "stress_trained": bool(compute_stress),
        "batch_size": int(params.batch_size),
        "readout_weight_decay": READOUT_WEIGHT_DECAY,
        "weight_decay": 0.0,
        "n_structures": len(train_configs),
        "n_atoms": int(sum(len(c.atomic_numbers) for c in train_configs)),
        "n_stress_structures": int(sum(c.properties["stress"] is not None for c in train_configs)),
        "train_indices": [int(i) for i in train_idx],
        "valid_indices": [int(i) for i in valid_idx],
        "dtype": params.dtype,
        "epochs": int(epochs),
        "finetuned": bool(finetuned),
    }
    _write_training_settings(out_path, settings)
    metrics["wall_time_s"] = time.perf_counter() - started
    log.info("trained %s (%s, %d epochs): %s", out_path, "finetune" if finetuned else "scratch", epochs, metrics)
    return TrainResult(
        model_path=out_path, metrics=metrics, epochs=epochs, history=history, finetuned=finetuned, training=settings,
        errors=error_log,
    )


def _fit(
    model: torch.nn.Module,
    train_data: list,
    valid_data: list,
    loss_fn: torch.nn.Module,
    params: MACEParams,
    epochs: int,
    device: str,
    compute_stress: bool,
    on_epoch: EpochCallback | None = None,
) -> tuple[list[dict[str, float]], int, TrainingErrorLog]:
    """The training loop (mace's ``take_step``: AMSGrad Adam, grad clipping, EMA update per step).

    Leaves ``model`` holding the EMA weights of the epoch with the lowest validation loss (the last
    epoch without validation data); returns the per-epoch history, that epoch's index and the
    per-sample training errors of every epoch. Batches are drawn as mace's shuffled ``DataLoader``
    draws them (the same sampler and generator), but as index lists, so each error lands on its
    sample's row.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, amsgrad=True)
    ema = ExponentialMovingAverage(model.parameters(), decay=params.ema_decay)
    generator = torch.Generator().manual_seed(params.seed)
    index_loader = torch.utils.data.DataLoader(
        range(len(train_data)), batch_size=params.batch_size, shuffle=True, generator=generator, collate_fn=list
    )
    counts = np.array([int(d.positions.shape[0]) for d in train_data], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    error_log = TrainingErrorLog(
        forces=np.empty((int(offsets[-1]), epochs), dtype=np.float16),
        energy=np.empty((len(train_data), epochs), dtype=np.float16),
        atom_counts=counts,
    )
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state = math.inf, epochs - 1, None
    for epoch in range(epochs):
        model.train()
        losses = []
        for indices in index_loader:
            batch = Batch.from_data_list([train_data[i] for i in indices], follow_batch=[None], exclude_keys=[None])
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            output = model(batch.to_dict(), training=True, compute_force=True, compute_stress=compute_stress)
            loss = loss_fn(pred=output, ref=batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
            optimizer.step()
            ema.update()
            losses.append(loss.item())
            _log_errors(error_log, epoch, indices, offsets, batch, output)
        row = {"epoch": float(epoch), "train_loss": float(np.mean(losses))}
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"training loss became {row['train_loss']} at epoch {epoch}")
        if valid_data:
            model.eval()
            with ema.average_parameters():
                loader = DataLoader(valid_data, batch_size=params.batch_size, shuffle=False)
                errors, valid_loss = _model_errors(model, iter(loader), device, compute_stress, loss_fn)
                if valid_loss < best_loss:
                    best_loss, best_epoch = valid_loss, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            row["valid_loss"] = valid_loss
            row.update({f"valid_{k}": v for k, v in errors.items()})
        history.append(row)
        if on_epoch is not None:
            valid = {k.removeprefix("valid_"): v for k, v in row.items() if k.startswith("valid_")}
            on_epoch(epoch + 1, epochs, row["train_loss"], valid)
    if best_state is None:
        ema.copy_to(model.parameters())
    else:
        model.load_state_dict(best_state)
    return history, best_epoch, error_log


def _log_errors(
    errors: TrainingErrorLog, epoch: int, indices: list[int], offsets: np.ndarray, batch: Batch, output: dict
) -> None:
    """Write one training batch's per-atom force-error norms and per-structure energy errors into
    column ``epoch`` of ``errors`` (rows of the samples ``indices``; ``offsets``: first atom row of
    each training structure)."""
    with torch.no_grad():
        force_err = torch.linalg.vector_norm(output["forces"].detach() - batch.forces, dim=1)
        force_err[~(batch.forces_weight > 0)[batch.batch]] = math.nan
        energy_err = torch.abs(output["energy"].detach() - batch.energy)
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices])
    errors.forces[rows, epoch] = np.minimum(force_err.cpu().numpy(), FLOAT16_MAX)
    errors.energy[indices, epoch] = np.minimum(energy_err.cpu().numpy(), FLOAT16_MAX)
