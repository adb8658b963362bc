"""Tests of the MACE backend: training, evaluation, loading and last-layer features (METHODS §1).

One tiny model (8 channels, max_L 0) is trained once per module on ~10 EMT-labelled rattled Cu cells;
the slow tests share it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from alforge.mlip.features import compute_features, last_layer_weights
from alforge.mlip.mace_model import (
    TrainResult,
    evaluate,
    load_calculator,
    load_model,
    resolve_device,
    train_mace,
)
from alforge.mlip.params import MACEParams
from cu_cells import cu_cells, cu_cluster

TINY = dict(num_channels=8, max_L=0, max_ell=2, mlp_irreps="8x0e", batch_size=4, device="cpu")
#: ``on_epoch`` calls of the ``trained`` fixture's training
EPOCH_CALLS: list[tuple] = []


@pytest.fixture(scope="module")
def data() -> list[Atoms]:
    return cu_cells(10, seed=0)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlip")


@pytest.fixture(scope="module")
def trained(data: list[Atoms], tmp_dir: Path) -> TrainResult:
    params = MACEParams(**TINY, max_epochs=6, finetune_epochs=1)
    dtype_before = torch.get_default_dtype()
    result = train_mace(data, params, tmp_dir / "model.pt", on_epoch=lambda *call: EPOCH_CALLS.append(call))
    assert torch.get_default_dtype() == dtype_before, "train_mace must restore the default dtype"
    return result


@pytest.fixture(scope="module")
def untrained(data: list[Atoms], tmp_dir: Path) -> TrainResult:
    """The same architecture after one step of negligible size: effectively the initial model."""
    params = MACEParams(**TINY, max_epochs=1, lr=1e-12)
    return train_mace(data, params, tmp_dir / "untrained.pt")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_missing_labels_name_the_structure(tmp_path: Path) -> None:
    structures = cu_cells(2, seed=1)
    structures[1].calc = None
    with pytest.raises(ValueError, match="training structure 1"):
        train_mace(structures, MACEParams(**TINY, max_epochs=1), tmp_path / "m.pt")


@pytest.mark.slow
def test_training_result(trained: TrainResult) -> None:
    assert trained.model_path.is_file()
    assert trained.epochs == 6 and len(trained.history) == 6 and not trained.finetuned
    for key in ("train_energy_rmse_per_atom", "train_forces_rmse", "train_stress_rmse", "valid_forces_rmse"):
        assert np.isfinite(trained.metrics[key]), key
    assert "valid_loss" in trained.history[0]
    assert [(epoch, total) for epoch, total, _, _ in EPOCH_CALLS] == [(k, 6) for k in range(1, 7)]
    for (_, _, train_loss, valid), row in zip(EPOCH_CALLS, trained.history):
        assert train_loss == row["train_loss"]
        assert valid["loss"] == row["valid_loss"] and valid["forces_rmse"] == row["valid_forces_rmse"]


@pytest.mark.slow
def test_energy_decomposes_into_last_layer_features(trained: TrainResult, data: list[Atoms]) -> None:
    """METHODS §1: E = Σ_j w·f_j + Σ_j e0_j, for periodic cells and a non-periodic cluster."""
    w, blocks = last_layer_weights(load_model(trained.model_path, "cpu"))
    assert [b[0] for b in blocks] == ["readouts.0", "readouts.1"]
    assert blocks[0][1] == 0 and blocks[-1][2] == w.shape[0]
    structures = data[:4] + [cu_cluster()]
    features = compute_features(trained.model_path, structures, device="cpu")
    assert len(features) == len(structures)
    for atoms, feat in zip(structures, features):
        assert feat.last_layer.shape == (len(atoms), w.shape[0]) and feat.last_layer.dtype == np.float64
        assert feat.invariant.shape == (len(atoms), TINY["num_channels"])
        rebuilt = float(np.sum(feat.last_layer @ w) + np.sum(feat.e0))
        assert rebuilt == pytest.approx(feat.energy, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_exported_model_loads_in_mace_calculator(
    trained: TrainResult, data: list[Atoms], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mace.calculators import MACECalculator

    from alforge.mlip.mace_model import export_mace_model

    features = compute_features(trained.model_path, data[:3], device="cpu")
    export_mace_model(trained.model_path, tmp_path / "mace.model")
    # mace unpickles its format relying on the flag its import sets, which alforge removes again
    # (alforge.mlip.mace_import): a user trusting an exported file sets it in their own process.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    calculators = [
        MACECalculator(model_paths=str(tmp_path / "mace.model"), device="cpu", default_dtype="float64"),
        load_calculator(trained.model_path, device="cpu"),
    ]
    for calc in calculators:
        for atoms, feat in zip(data[:3], features):
            probe = atoms.copy()
            probe.calc = calc
            assert probe.get_potential_energy() == pytest.approx(feat.energy, rel=1e-9, abs=1e-9)
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.slow
def test_training_reduces_force_error(trained: TrainResult, untrained: TrainResult, data: list[Atoms]) -> None:
    before = evaluate(untrained.model_path, data, device="cpu")
    after = evaluate(trained.model_path, data, device="cpu")
    assert after["forces_rmse"] < 0.7 * before["forces_rmse"]
    assert set(after) >= {"energy_rmse_per_atom", "forces_rmse", "stress_rmse", "energy_mae_per_atom"}
    assert "stress_rmse" not in evaluate(trained.model_path, [cu_cluster()], device="cpu")


@pytest.mark.slow
def test_finetune_starts_from_previous_weights(trained: TrainResult, data: list[Atoms], tmp_dir: Path) -> None:
    params = MACEParams(**TINY, max_epochs=6, finetune_epochs=1)
    more = cu_cells(6, seed=7)
    result = train_mace(data + more, params, tmp_dir / "finetuned.pt", init_model=trained.model_path)
    assert result.finetuned and result.epochs == 1
    assert result.history[0]["train_loss"] < trained.history[0]["train_loss"]
    e0_old = load_model(trained.model_path, "cpu").atomic_energies_fn.atomic_energies
    e0_new = load_model(result.model_path, "cpu").atomic_energies_fn.atomic_energies
    assert torch.equal(e0_old, e0_new)


@pytest.mark.slow
def test_training_is_deterministic(data: list[Atoms], tmp_dir: Path) -> None:
    params = MACEParams(**TINY, max_epochs=1)
    runs = [train_mace(data, params, tmp_dir / f"seeded{i}.pt") for i in range(2)]
    first, second = (load_model(r.model_path, "cpu").state_dict() for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0].history == runs[1].history


@pytest.mark.slow
def test_batched_features_match_one_by_one(trained: TrainResult, data: list[Atoms]) -> None:
    structures = data[:5] + [cu_cluster()]
    batched = compute_features(trained.model_path, structures, device="cpu", batch_size=4)
    single = [compute_features(trained.model_path, [a], device="cpu")[0] for a in structures]
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.last_layer, s.last_layer, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b.invariant, s.invariant, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b.e0, s.e0)
        assert b.energy == pytest.approx(s.energy, rel=1e-12)


def test_feature_jacobians_match_finite_differences_and_forces(trained: TrainResult, data: list[Atoms]) -> None:
    """∂f_s/∂r by autograd: central differences agree, and −J·w reproduces the model's forces."""
    from alforge.mlip.features import feature_jacobians
    from alforge.mlip.mace_model import load_calculator, load_model

    atoms = data[0].copy()
    (jac,) = feature_jacobians(trained.model_path, [atoms])
    assert jac.shape[:2] == (len(atoms), 3)
    h = 1e-5
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[1, 2] += h
    minus.positions[1, 2] -= h
    f_plus, f_minus = (compute_features(trained.model_path, [a])[0].last_layer.sum(0) for a in (plus, minus))
    assert np.allclose(jac[1, 2], (f_plus - f_minus) / (2 * h), rtol=1e-5, atol=1e-7)
    w, _ = last_layer_weights(load_model(trained.model_path))
    atoms.calc = load_calculator(trained.model_path)
    assert np.allclose(-jac @ w, atoms.get_forces(), atol=1e-8)
