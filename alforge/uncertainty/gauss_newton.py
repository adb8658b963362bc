"""The Gauss–Newton Hessian of the loss the MACE model was trained with (METHODS §2, 000 eqs. 4–6).

**The loss.** mace-torch 0.3.16's ``WeightedEnergyForcesLoss`` / ``WeightedEnergyForcesStressLoss``
(what :func:`alforge.mlip.mace_model.train_mace` uses) is, per batch of ``B`` structures,

    λ_E · mean_s ((E_s − Ê_s)/n_s)²  +  λ_F · mean over the 3·n_atoms force components (F − F̂)²
    [+ λ_σ · mean over the 9·B stress components (σ − σ̂)²]

where the stress mean runs over *all* ``B`` structures of the batch: a structure without a
reference stress enters with weight 0 but still counts in the denominator (mace's
``weighted_mean_squared_stress`` averages the whole ``[B, 3, 3]`` tensor). Averaged over an epoch
and with the mean of batch means replaced by the dataset mean (exact for equal batches), the
dataset loss is

    L = λ_E/N_s Σ_s (Δe_s/n_s)²  +  λ_F/(3 N_atoms) Σ_sα ΔF_sα²
        +  λ_σ/(9 N_s) Σ_{s with stress} Σ_ab Δσ_sab².

**The convention.** ``H`` is ``(N_s/2) ∇²_w L`` in its Gauss–Newton form (the labels are linear in
the last-layer weights ``w``, :mod:`alforge.mlip.jacobians`), i.e. the loss scaled so that its energy
term is a plain sum over structures:

    H = λ_E Σ_s (f_s/n_s)(f_s/n_s)ᵀ + λ_F κ_F Σ_s Σ_α J_sα J_sαᵀ
        + λ_σ κ_σ Σ_s Σ_ab S_sab S_sabᵀ + ς² I

with ``J_sα = ∂f_s/∂r_α`` (only for structures with reference forces; mace counts every atom in
the force mean, so ``N_atoms`` counts all of them), ``S_sab = (1/V_s) ∂f_s/∂ε_ab`` (only for
structures trained with stress),
``κ_F = N_s / (3 N_atoms)`` and ``κ_σ = N_s / (9 N_s) = 1/9``, ``N_s`` and ``N_atoms`` counted on the
training split the model was actually fitted to (from ``<model>.training.json``). So the relative
weights of energy, force and stress rows are those of the trained loss, and one energy row of a
structure counts ``λ_E/n_s²`` "effective observations" of ``f_s``: adding structure ``s`` to the
energy-only form raises its PR ``(f_sᵀH⁻¹f_s)⁻¹`` by exactly ``λ_E/n_s²``. The trainer's λ's (its
``energy_weight``, ``forces_weight``, ``stress_weight``) can be overridden; ``κ`` always comes from the
training counts. ``form="energy"`` keeps only the energy rows (an explicit option, METHODS §2).

**The prior ς².** A weight decay ``wd`` on the readouts (Adam's ``weight_decay`` adds ``wd·w`` to the
gradient, i.e. ``(wd/2)‖w‖²`` to ``L``) becomes ``ς² = N_s·wd/2`` in this convention. mace's recipe
and our trainer apply none to the readouts, so normally :func:`choose_regularizer` picks ``ς`` on
held-out data instead: with ``u_i(ς) = f_iᵀ(H_data + ς²I)⁻¹f_i`` for held-out structures and their
energy residuals ``r_i``, the calibrated model ``r_i ~ N(0, α² u_i)`` has the closed-form MLE
``α̂² = mean(r_i²/u_i)``; ``ς`` maximises the resulting profile likelihood
``−½ Σ_i [log(2π α̂² u_i) + 1]`` over a log grid (one eigendecomposition of ``H_data``, then O(m d)
per grid point). For the loss form the held-out force components join in the same way (rows
``∂f_s/∂r_iα``, residuals ``F̂ − F``, their own α̂²), so 8 held-out molecules give 8 + 3n·8
residuals rather than 8. Without held-out data the default is ``ς² = 1e-6 · tr(H_data)/d`` (a relative jitter
that keeps ``H`` positive definite without acting as a prior), and ``regularizer_method`` says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from alforge.mlip.features import compute_features, feature_jacobians, last_layer_weights
from alforge.mlip.jacobians import has_cell, label_rows
from alforge.mlip.loss_weights import LossWeights
from alforge.mlip.mace_model import load_model, read_training_settings
from alforge.uncertainty.rigidity import DEFAULT_REGULARIZER, Hessian, data_matrix

__all__ = ["FORMS", "choose_regularizer", "loss_hessian", "loss_weights"]

log = logging.getLogger(__name__)

FORMS = ("loss", "energy")
#: ``ς² = DEFAULT_RELATIVE_PRIOR · tr(H_data)/d`` when there is neither weight decay nor held-out data.
DEFAULT_RELATIVE_PRIOR = 1e-6
#: The profile-likelihood grid: ς² / (tr(H_data)/d) from 1e-12 to 1e2, four points per decade.
GRID_RELATIVE = 10.0 ** np.arange(-12.0, 2.0 + 1e-9, 0.25)
#: Fewest held-out residuals for the profile likelihood (one residual fits any ς equally well).
MIN_VALIDATION = 3


def _has_stress_label(atoms: Atoms) -> bool:
    """Trained with stress: a labelled structure with a reference stress, else one with a cell."""
    if atoms.calc is not None and getattr(atoms.calc, "results", None):
        return "stress" in atoms.calc.results and has_cell(atoms)
    return has_cell(atoms)


def _has_force_label(atoms: Atoms) -> bool:
    """Trained with forces: a labelled structure with reference forces (unlabelled: assume so)."""
    if atoms.calc is not None and getattr(atoms.calc, "results", None):
        return atoms.calc.results.get("forces") is not None
    return True


def loss_weights(
    settings: dict | None,
    structures: Sequence[Atoms],
    energy_weight: float | None = None,
    force_weight: float | None = None,
    stress_weight: float | None = None,
) -> LossWeights:
    """Row weights ``(λ_E, λ_F κ_F, λ_σ κ_σ)`` (module docstring).

    ``None`` for a λ means "as trained" (from ``settings``, the dict of
    :func:`alforge.mlip.mace_model.read_training_settings`); without settings every λ must be given
    except ``stress_weight`` (default 0) and ``κ_F`` is counted on ``structures``.
    """
    if settings is None:
        missing = [n for n, v in (("energy_weight", energy_weight), ("force_weight", force_weight)) if v is None]
        if missing:
            raise ValueError(f"no training settings: pass {' and '.join(missing)} explicitly")
        n_structures = len(structures)
        n_atoms = sum(len(a) for a in structures)
        stress_weight = 0.0 if stress_weight is None else stress_weight
    else:
        n_structures, n_atoms = int(settings["n_structures"]), int(settings["n_atoms"])
        energy_weight = settings["energy_weight"] if energy_weight is None else energy_weight
        force_weight = settings["forces_weight"] if force_weight is None else force_weight
        if stress_weight is None:
            stress_weight = settings["stress_weight"] if settings["stress_trained"] else 0.0
    if n_atoms == 0:
        raise ValueError("loss_weights: the training set has no atoms")
    kappa_f = n_structures / (3.0 * n_atoms)
    kappa_s = 1.0 / 9.0  # N_s / (9 N_s): mace averages stress over all structures of a batch
    return LossWeights(float(energy_weight), float(force_weight) * kappa_f, float(stress_weight) * kappa_s)


def choose_regularizer(
    data: np.ndarray,
    *,
    n_structures: int,
    readout_weight_decay: float = 0.0,
    validation_features: np.ndarray | None = None,
    validation_residuals: np.ndarray | None = None,
    validation_force_rows: np.ndarray | None = None,
    validation_force_residuals: np.ndarray | None = None,
) -> tuple[float, str]:
    """``(ς, method)`` for ``H = data + ς² I`` (module docstring, "The prior ς²").

    ``data``: ``H_data`` (d × d, no ``ς²I``). Weight decay > 0 wins (the prior the model was trained
    under); else the profile likelihood of ``validation_residuals`` (model − reference energies,
    eV) with ``validation_features`` (rows ``f_s``) and, when given, of the held-out force
    components ``validation_force_residuals`` (model − reference, eV/Å) with their rows
    ``validation_force_rows`` (``∂f_s/∂r_iα``, one per component; each kind has its own α²); else
    the documented default. A handful of held-out energies alone leaves ς poorly determined
    (seen in ``benchmarks/study_yield.py --diagnose``: 8 energies put it anywhere across twelve
    decades); their 3n force components each pin it far better.
    """
    data = np.asarray(data, dtype=np.float64)
    dim = data.shape[0]
    scale = float(np.trace(data)) / dim if dim else 0.0
    if not scale > 0:
        scale = DEFAULT_REGULARIZER**2
    if readout_weight_decay > 0:
        value = n_structures * readout_weight_decay / 2.0
        return math.sqrt(value), f"readout weight decay {readout_weight_decay:g}: ς² = N_s·wd/2 = {value:.4g}"
    if validation_features is not None and validation_residuals is not None:
        features, residuals = _paired("features", validation_features, validation_residuals, dim)
        if len(residuals) >= MIN_VALIDATION and np.any(residuals != 0):
            kinds = [("energies", features, residuals)]
            if validation_force_rows is not None and validation_force_residuals is not None:
                rows, force_res = _paired("force rows", validation_force_rows, validation_force_residuals, dim)
                if len(force_res) >= MIN_VALIDATION and np.any(force_res != 0):
                    kinds.append(("force components", rows, force_res))
            return _profile_likelihood(data, scale, kinds)
        reason = f"only {len(residuals)} held-out residuals" if len(residuals) < MIN_VALIDATION else "zero residuals"
    else:
        reason = "no validation data"
    value = DEFAULT_RELATIVE_PRIOR * scale
    return math.sqrt(value), f"default ς² = {DEFAULT_RELATIVE_PRIOR:g}·tr(H_data)/d = {value:.4g} ({reason})"


def _paired(what: str, rows: np.ndarray, residuals: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows as ``(m, d)`` float64 and their ``m`` residuals, or an error naming the mismatch."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, dim)
    residuals = np.asarray(residuals, dtype=np.float64).ravel()
    if len(rows) != len(residuals):
        raise ValueError(f"{len(rows)} validation {what} but {len(residuals)} residuals")
    return rows, residuals


def _profile_likelihood(
    data: np.ndarray, scale: float, kinds: list[tuple[str, np.ndarray, np.ndarray]]
) -> tuple[float, str]:
    """Maximise ``Σ_kinds −½ Σ_i [log(2π α̂²_k u_i) + 1]`` over the ς grid, ``α̂²_k`` per kind."""
    eigenvalues, vectors = np.linalg.eigh(data)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    projected = [((rows @ vectors) ** 2, residuals**2) for _, rows, residuals in kinds]
    best = (math.inf, -1, [])
    for k, relative in enumerate(GRID_RELATIVE):
        inverse = 1.0 / (eigenvalues + relative * scale)
        nll, alphas = 0.0, []
        for proj, r2 in projected:
            u = proj @ inverse
            if not np.all(u > 0):
                nll = math.inf
                break
            alpha2 = float(np.mean(r2 / u))
            alphas.append(alpha2)
            nll += 0.5 * float(np.sum(np.log(2 * math.pi * alpha2 * u) + 1.0))
        if math.isfinite(nll) and (best[1] < 0 or nll < best[0] - 1e-12 * abs(best[0])):
            best = (nll, k, alphas)
    nll, k, alphas = best
    if k < 0:
        raise ValueError("choose_regularizer: validation features are all zero")
    value = GRID_RELATIVE[k] * scale
    edge = ", at the grid edge" if k in (0, len(GRID_RELATIVE) - 1) else ""
    what = " and ".join(f"{len(res)} held-out {name}" for name, _, res in kinds)
    alpha_text = ", ".join(f"α²({name.split()[0]}) = {a:.4g}" for (name, _, _), a in zip(kinds, alphas))
    return math.sqrt(value), (
        f"profile likelihood of {what}: ς² = {GRID_RELATIVE[k]:.3g}·tr(H_data)/d "
        f"= {value:.4g}, {alpha_text}, NLL = {nll:.4g}{edge}"
    )


def _validation_forces(
    module: torch.nn.Module, structures: Sequence[Atoms], device: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Force rows ``∂f_s/∂r_iα`` and residuals ``F̂ − F`` (``F̂ = −J·w``, exact) of the held-out
    structures that have reference forces; ``(None, None)`` when none has."""
    labelled = [a for a in structures if _has_force_label(a)]
    if not labelled:
        return None, None
    w, _ = last_layer_weights(module)
    jacobians = feature_jacobians(module, labelled, device=device)  # (n, 3, d) each
    rows = np.concatenate([j.reshape(-1, j.shape[-1]) for j in jacobians])
    predicted = -(rows @ w)
    reference = np.concatenate([np.asarray(a.calc.results["forces"], dtype=np.float64).ravel() for a in labelled])
    return rows, predicted - reference


def _reference_energies(structures: Sequence[Atoms]) -> np.ndarray:
    out = []
    for i, atoms in enumerate(structures):
        results = getattr(atoms.calc, "results", None) or {}
        if "energy" not in results:
            raise ValueError(f"validation structure {i} ({atoms.get_chemical_formula()}) has no reference energy")
        out.append(float(results["energy"]))
    return np.array(out)


def loss_hessian(
    model: Path | str | torch.nn.Module,
    structures: Sequence[Atoms],
    *,
    regularizer: float | None = None,
    energy_weight: float | None = None,
    force_weight: float | None = None,
    stress_weight: float | None = None,
    form: str = "loss",
    device: str = "auto",
    validation: Sequence[Atoms] | None = None,
    settings: dict | None = None,
) -> Hessian:
    """The loss-consistent last-layer Hessian of ``model`` over its training ``structures``.

    ``model``: a model file (its training settings are read from ``<model>.training.json``) or a
    loaded model (then pass ``settings=`` from :func:`read_training_settings`, or every λ
    explicitly; see :func:`loss_weights`). ``structures``: the training structures (labelled
    Atoms; labels are not used except to tell which were trained with stress). ``None`` for a
    weight: as trained. ``form``: ``"loss"`` (energy + forces + stress rows) or ``"energy"`` (the
    energy rows only). ``regularizer`` (ς): ``None`` chooses it with :func:`choose_regularizer`,
    from the recorded readout weight decay or else the held-out energies of ``validation``.
    The result records ``weights``, ``form``, ``regularizer`` and ``regularizer_method``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not structures:
        raise ValueError("loss_hessian needs at least one training structure")
    if isinstance(model, torch.nn.Module):
        module = model
    else:
        if settings is None:
            settings = read_training_settings(Path(model))
        module = load_model(Path(model), device)
    if settings is not None and len(structures) != int(settings["n_structures"]):
        log.warning(
            "loss_hessian: %d structures given but the model was fitted to %d (κ_F uses the latter)",
            len(structures),
            int(settings["n_structures"]),
        )
    weights = loss_weights(settings, structures, energy_weight, force_weight, stress_weight)
    if form == "energy":
        weights = LossWeights(weights.energy, 0.0, 0.0)
    stress = [_has_stress_label(a) for a in structures]
    forces = [_has_force_label(a) for a in structures]
    rows = label_rows(module, structures, weights, device=device, stress=stress, forces=forces)
    dim = rows[0].shape[1]
    data = data_matrix(rows, dim)
    if regularizer is not None:
        if not regularizer > 0:
            raise ValueError(f"regularizer (ς) must be > 0, got {regularizer}")
        method = "given"
    else:
        features = residuals = force_rows = force_residuals = None
        if validation:
            computed = compute_features(module, validation, device=device)
            features = np.stack([c.last_layer.sum(axis=0) for c in computed])
            residuals = np.array([c.energy for c in computed]) - _reference_energies(validation)
            if weights.forces > 0:
                force_rows, force_residuals = _validation_forces(module, validation, device)
        n_structures = int(settings["n_structures"]) if settings else len(structures)
        decay = float(settings.get("readout_weight_decay", 0.0)) if settings else 0.0
        regularizer, method = choose_regularizer(
            data,
            n_structures=n_structures,
            readout_weight_decay=decay,
            validation_features=features,
            validation_residuals=residuals,
            validation_force_rows=force_rows,
            validation_force_residuals=force_residuals,
        )
    data[np.diag_indices(dim)] += regularizer**2
    return Hessian(data, regularizer, weights=weights, form=form, regularizer_method=method)
