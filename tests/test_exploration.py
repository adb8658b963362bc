"""MD exploration: frames and provenance, stopping rules, and the extrapolation-grade stop."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from alforge.exploration.md import MDSettings, run_walker, unphysical

SETTINGS = MDSettings(temperature_K=500, timestep_fs=2.0, steps=12, frame_interval=3,
                      friction_per_fs=0.01, min_distance=1.8, max_energy_change=1.0)


def _cu(rattle: float = 0.03, seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    atoms.rattle(rattle, seed=seed)
    return atoms


def test_frames_every_interval_with_provenance():
    traj = run_walker(_cu(), EMT(), SETTINGS, seed=1, provenance={"walker": 3})
    assert traj.stop_reason is None and traj.steps_run == 12
    assert [f.info["md_step"] for f in traj.frames] == [3, 6, 9, 12]
    assert all(f.info["walker"] == 3 and f.info["temperature_K"] == 500 for f in traj.frames)
    assert all(f.calc is None for f in traj.frames)
    again = run_walker(_cu(), EMT(), SETTINGS, seed=1)
    assert np.array_equal(again.frames[-1].positions, traj.frames[-1].positions), "seeded MD is reproducible"


def test_a_stopped_trajectory_keeps_the_frames_before_it():
    calls = []

    def reject_second(atoms):
        calls.append(1)
        return "rejected" if len(calls) == 2 else None

    traj = run_walker(_cu(), EMT(), SETTINGS, seed=1, extra_check=reject_second)
    assert traj.stop_reason == "step 6: rejected"
    assert [f.info["md_step"] for f in traj.frames] == [3]


def test_unphysical_geometries_are_named():
    atoms = _cu()
    assert unphysical(atoms, -1.0, -1.0, SETTINGS) is None
    close = atoms.copy()
    close.positions[1] = close.positions[0] + [0.5, 0, 0]
    assert "apart" in unphysical(close, -1.0, -1.0, SETTINGS)
    assert "non-finite" in unphysical(atoms, float("nan"), -1.0, SETTINGS)
    assert "eV/atom" in unphysical(atoms, -1.0 + 2.0 * len(atoms), -1.0, SETTINGS)
    start = close.copy()
    assert run_walker(start, EMT(), SETTINGS, seed=0).stop_reason.startswith("start structure")


@pytest.mark.slow
def test_extrapolation_grade_stop(tmp_path):
    from alforge.exploration.extrapolation import gamma_check, structure_grade
    from alforge.mlip.features import compute_features
    from alforge.mlip.mace_model import load_model, train_mace
    from alforge.mlip.params import MACEParams
    from alforge.selectors.dopt import active_sets

    train = []
    for k in range(8):
        atoms = _cu(0.05, seed=k)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        train.append(atoms)
    params = MACEParams(num_channels=8, max_L=0, mlp_irreps="8x0e", max_epochs=2, batch_size=4)
    path = tmp_path / "m.model"
    train_mace(train, params, path)
    feats = compute_features(path, train)
    rows = np.concatenate([f.last_layer for f in feats])
    numbers = np.concatenate([a.numbers for a in train])
    inverses = active_sets(rows, numbers)
    assert set(inverses) == {29}
    few = active_sets(rows[:3], numbers[:3])  # rank-deficient: still a finite grade
    assert np.isfinite(structure_grade(few, np.array([29]), rows[5:6]))
    for atoms, f in zip(train, feats):
        assert structure_grade(inverses, atoms.numbers, f.last_layer) <= 1.01 + 1e-9, "training atoms interpolate"
    far = _cu(0.35, seed=99)
    (f_far,) = compute_features(path, [far])
    assert structure_grade(inverses, far.numbers, f_far.last_layer) > 1.01
    assert structure_grade({}, far.numbers, f_far.last_layer) == float("inf")
    model = load_model(path)
    assert gamma_check(model, inverses, gamma_hi=1e9)(far) is None
    assert "γ_hi" in gamma_check(model, inverses, gamma_hi=1.01)(far)
