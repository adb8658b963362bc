"""The per-sample training-error log of train_mace (METHODS §7, LTAU) and its round trip through the store.

A training with a vanishing learning rate leaves the weights where they started, so every logged
epoch must equal an independent evaluation of the saved model, atom by atom: that pins the row
order (batches are shuffled) and the error definition. A real training's errors must fall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from alforge.mlip.mace_model import TrainResult, load_calculator, train_mace
from alforge.mlip.params import MACEParams
from alforge.storage import Store
from alforge.storage.store import TrainingErrors
from alforge.uncertainty.ltau import summarize_error_log
from cu_cells import cu_cells

TINY = dict(num_channels=8, max_L=0, max_ell=2, mlp_irreps="8x0e", batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def data() -> list[Atoms]:
    return cu_cells(8, seed=3)


def _training_split(result: TrainResult, data: list[Atoms]) -> list[Atoms]:
    return [data[i] for i in result.training["train_indices"]]


@pytest.mark.slow
def test_logged_errors_are_the_models_errors_row_by_row(data: list[Atoms], tmp_path: Path) -> None:
    result = train_mace(data, MACEParams(**TINY, max_epochs=2, lr=1e-12), tmp_path / "frozen.pt")
    train = _training_split(result, data)
    log = result.errors
    assert len(train) < len(data)  # a validation split was held out and is not logged
    assert log.forces.shape == (sum(len(a) for a in train), 2) and log.forces.dtype == np.float16
    assert log.energy.shape == (len(train), 2) and log.energy.dtype == np.float16
    assert log.atom_counts.tolist() == [len(a) for a in train]
    calc = load_calculator(result.model_path, device="cpu")
    force_err, energy_err = [], []
    for atoms in train:
        ref_f, ref_e = atoms.calc.results["forces"], atoms.calc.results["energy"]
        probe = atoms.copy()
        probe.calc = calc
        force_err.append(np.linalg.norm(ref_f - probe.get_forces(), axis=1))
        energy_err.append(abs(ref_e - probe.get_potential_energy()))
    for epoch in range(2):
        np.testing.assert_allclose(log.forces[:, epoch], np.concatenate(force_err), rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(log.energy[:, epoch], energy_err, rtol=2e-3, atol=1e-3)


@pytest.mark.slow
def test_errors_fall_over_epochs_and_finetuning_logs_its_own(data: list[Atoms], tmp_path: Path) -> None:
    params = MACEParams(**TINY, max_epochs=8, finetune_epochs=2)
    result = train_mace(data, params, tmp_path / "model.pt")
    log = result.errors
    assert log.forces.shape[1] == 8 and np.all(np.isfinite(log.forces)) and np.all(np.isfinite(log.energy))
    assert np.all(log.forces >= 0) and np.all(log.energy >= 0)
    assert log.forces[:, -2:].mean() < 0.8 * log.forces[:, :2].mean()
    finetuned = train_mace(data + cu_cells(3, seed=9), params, tmp_path / "ft.pt", init_model=result.model_path)
    assert finetuned.finetuned and finetuned.errors.forces.shape == (
        sum(len(a) for a in _training_split(finetuned, data + cu_cells(3, seed=9))), 2
    )


def test_quantile_summary_keeps_every_epoch_count_within_half_a_column() -> None:
    rng = np.random.default_rng(0)
    log = rng.gamma(2.0, 0.05, size=(50, 300)).astype(np.float16)
    short, form = summarize_error_log(log[:, :40])
    assert form == "epochs" and np.array_equal(short, log[:, :40])
    summary, form = summarize_error_log(log, max_columns=16)
    assert form == "quantiles" and summary.shape == (50, 16) and summary.dtype == np.float16
    for tol in (0.02, 0.05, 0.1, 0.3):
        exact = (log <= np.float16(tol)).mean(axis=1)
        approx = (summary <= np.float16(tol)).mean(axis=1)
        assert np.max(np.abs(exact - approx)) <= 1 / 32 + 1e-9, tol
    with pytest.raises(ValueError, match="n_samples, n_epochs"):
        summarize_error_log(log[0])


def test_store_round_trip_and_shape_checks(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    cid = store.get_or_create_campaign("tiny", {})
    mid = store.add_model(cid, store.get_or_create_iteration(cid, 0), "/m.model", [], {})
    assert store.training_errors(mid) is None
    rng = np.random.default_rng(1)
    forces = rng.random((7, 5)).astype(np.float16)
    energy = rng.random((2, 5)).astype(np.float16)
    errors = TrainingErrors(
        structure_ids=np.array([11, 4]), atom_counts=np.array([3, 4]), forces=forces, energy=energy,
        forces_last=forces[:, -1], energy_last=energy[:, -1], n_epochs=5, form="epochs",
    )
    store.put_training_errors(mid, errors)
    back = store.training_errors(mid)
    assert back.form == "epochs" and back.n_epochs == 5
    for name in ("structure_ids", "atom_counts", "forces", "energy", "forces_last", "energy_last"):
        np.testing.assert_array_equal(getattr(back, name), getattr(errors, name), err_msg=name)
    assert back.forces.dtype == np.float16
    store.put_training_errors(mid, TrainingErrors(**{**errors.__dict__, "forces": forces[:, :2], "form": "quantiles"}))
    assert store.training_errors(mid).forces.shape == (7, 2)  # replaced, not duplicated
    with pytest.raises(ValueError, match="forces has shape \\(6, 5\\)"):
        store.put_training_errors(mid, TrainingErrors(**{**errors.__dict__, "forces": forces[:6]}))
