"""Langevin MD with the current model; frames become candidate structures.

A trajectory driven by an immature model can run into unphysical regions. It is stopped at the
first sign (two atoms closer than ``min_distance``, a non-finite energy, or a per-atom energy drift
beyond ``max_energy_change``) and only the frames recorded *before* that step are kept, so a bad
walker costs its tail, never the campaign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.neighborlist import neighbor_list


@dataclass(frozen=True)
class MDSettings:
    temperature_K: float
    timestep_fs: float
    steps: int
    frame_interval: int
    friction_per_fs: float
    min_distance: float
    max_energy_change: float


@dataclass
class Trajectory:
    """Frames kept (copies without a calculator, with provenance in ``info``) and why it stopped."""

    frames: list[Atoms] = field(default_factory=list)
    steps_run: int = 0
    stop_reason: str | None = None


def unphysical(atoms: Atoms, energy: float, start_energy: float, settings: MDSettings) -> str | None:
    """Why this geometry must not be trusted, or None if it is sane."""
    if not np.isfinite(energy) or not np.all(np.isfinite(atoms.positions)):
        return "non-finite energy or positions"
    drift = abs(energy - start_energy) / len(atoms)
    if drift > settings.max_energy_change:
        return f"energy changed by {drift:.3g} eV/atom (> {settings.max_energy_change:g})"
    if len(atoms) > 1:
        d = neighbor_list("d", atoms, settings.min_distance)
        if len(d):
            return f"atoms {d.min():.3f} Å apart (< {settings.min_distance:g} Å)"
    return None


def repeated(atoms: Atoms, supercell: tuple[int, int, int] | None) -> Atoms:
    """``atoms`` repeated ``n1 × n2 × n3`` (a large cell for local active learning: METHODS §5).

    Only a 3-D periodic structure is repeated; a cluster or slab has no images to repeat along every
    axis and is returned as it is (so are all structures when ``supercell`` is None).
    """
    if supercell is None or not atoms.pbc.all():
        return atoms
    return atoms.repeat(tuple(int(n) for n in supercell))


def run_walker(
    start: Atoms,
    calculator: Calculator,
    settings: MDSettings,
    seed: int,
    provenance: dict | None = None,
    extra_check: Callable[[Atoms], str | None] | None = None,
) -> Trajectory:
    """One Langevin trajectory from ``start``.

    ``extra_check`` (e.g. an extrapolation grade, which costs a model evaluation) may stop it too; it
    runs at the steps where a frame would be recorded, so a rejected geometry is never kept.
    """
    atoms = start.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, settings.temperature_K, rng=rng)
    dyn = Langevin(
        atoms,
        timestep=settings.timestep_fs * units.fs,
        temperature_K=settings.temperature_K,
        friction=settings.friction_per_fs / units.fs,
        fixcm=False,  # ASE ≥ 3.28 deprecates fixcm=True (biased NVT sampling in small cells)
        rng=rng,
    )
    traj = Trajectory()
    start_energy = float(atoms.get_potential_energy())
    reason = unphysical(atoms, start_energy, start_energy, settings)
    if reason:
        traj.stop_reason = f"start structure: {reason}"
        return traj
    for step in range(1, settings.steps + 1):
        dyn.run(1)
        traj.steps_run = step
        energy = float(atoms.get_potential_energy())
        reason = unphysical(atoms, energy, start_energy, settings)
        frame_step = step % settings.frame_interval == 0
        if reason is None and extra_check is not None and frame_step:
            reason = extra_check(atoms)
        if reason:
            traj.stop_reason = f"step {step}: {reason}"
            break
        if frame_step:
            frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            frame.info.update(provenance or {})
            frame.info.update({"md_step": step, "temperature_K": settings.temperature_K, "md_energy": energy})
            traj.frames.append(frame)
    return traj
