"""The loss-consistent last-layer Hessian (METHODS §2): batched Jacobians, label rows, the training
sidecar, ς, storage.

One tiny float64 MACE (8 channels, max_L 0) is trained with energy, forces and stress on rattled,
strained fcc Cu cells plus a non-periodic cluster (no stress), once per module. The reference for
``H`` is an independent Gauss–Newton: autograd of the model's own energy-per-atom, force and
stress outputs with respect to the readout weight tensors themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from alforge.mlip.params import MACEParams
from cu_cells import cu_cells, cu_cluster

pytestmark = pytest.mark.slow

TINY = dict(num_channels=8, max_L=0, max_ell=2, mlp_irreps="8x0e", batch_size=3, device="cpu", dtype="float64")
WEIGHTS = dict(energy_weight=10.0, forces_weight=100.0, stress_weight=50.0)


@pytest.fixture(scope="module")
def train_set() -> list[Atoms]:
    return cu_cells(5, seed=0) + [cu_cluster()]


@pytest.fixture(scope="module")
def validation() -> list[Atoms]:
    return cu_cells(4, seed=7)


@pytest.fixture(scope="module")
def model_path(train_set: list[Atoms], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alforge.mlip.mace_model import train_mace

    path = tmp_path_factory.mktemp("loss_hessian") / "model.pt"
    params = MACEParams(**TINY, **WEIGHTS, max_epochs=3, valid_fraction=0.0)
    train_mace(train_set, params, path)
    return path


def _brute_force(model_path: Path, structures: list[Atoms], weights) -> np.ndarray:
    """``Σ_s Σ_rows weight · ∇_w(row)ᵀ∇_w(row)`` with ``w`` the readout weight tensors themselves."""
    from alforge.mlip.device import default_dtype
    from alforge.mlip.features import _blocks, last_layer_weights
    from alforge.mlip.mace_model import iterate_batches, load_model, model_z_table, unlabelled_config

    model = load_model(model_path, "cpu")
    linears = list({id(b.linear): b.linear for b in _blocks(model)}.values())
    params = [linear.weight for linear in linears]
    w, _ = last_layer_weights(model)
    assert np.array_equal(torch.cat([p.detach().reshape(-1) for p in params]).numpy(), w)
    for p in params:
        p.requires_grad_(True)

    def row(value: torch.Tensor) -> np.ndarray:
        grads = torch.autograd.grad(value, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads]).numpy()

    total = np.zeros((len(w), len(w)))
    with default_dtype(torch.float64):
        for atoms in structures:
            (batch,) = iterate_batches([unlabelled_config(atoms)], model_z_table(model), float(model.r_max), 1)
            with_stress = "stress" in atoms.calc.results
            out = model(batch.to_dict(), training=True, compute_force=True, compute_stress=with_stress)
            energy = row(out["energy"][0] / len(atoms))[None]
            forces = np.stack([row(out["forces"][i, a]) for i in range(len(atoms)) for a in range(3)])
            total += weights.energy * energy.T @ energy + weights.forces * forces.T @ forces
            if with_stress:
                stress = np.stack([row(out["stress"][0, a, b]) for a in range(3) for b in range(3)])
                total += weights.stress * stress.T @ stress
    return total


def _loop_jacobians(model_path: Path, atoms: Atoms) -> np.ndarray:
    """The former reference: one backward pass per feature, ``(n, 3, d)``."""
    from alforge.mlip.device import default_dtype
    from alforge.mlip.features import _hooked
    from alforge.mlip.mace_model import iterate_batches, load_model, model_z_table, unlabelled_config

    model = load_model(model_path, "cpu")
    with _hooked(model) as read, default_dtype(torch.float64), torch.enable_grad():
        (batch,) = iterate_batches([unlabelled_config(atoms)], model_z_table(model), float(model.r_max), 1)
        data = batch.to_dict()
        model(data, training=False, compute_force=False)
        f_s = read()[0].sum(dim=0)
        rows = [
            torch.autograd.grad(f_s[k], data["positions"], retain_graph=k + 1 < len(f_s))[0] for k in range(len(f_s))
        ]
    return torch.stack(rows, dim=-1).numpy()


def test_training_settings_sidecar(model_path: Path, train_set: list[Atoms], tmp_path: Path) -> None:
    from alforge.mlip.mace_model import read_training_settings, training_settings_path

    settings = read_training_settings(model_path)
    assert settings["stress_trained"] is True
    assert (settings["energy_weight"], settings["forces_weight"], settings["stress_weight"]) == (10.0, 100.0, 50.0)
    assert settings["n_structures"] == len(train_set)
    assert settings["n_atoms"] == sum(len(a) for a in train_set)
    assert settings["n_stress_structures"] == len(train_set) - 1
    assert settings["readout_weight_decay"] == 0.0 and settings["batch_size"] == 3
    assert settings["train_indices"] == list(range(len(train_set))) and settings["valid_indices"] == []
    with pytest.raises(FileNotFoundError, match="missing.pt.training.json"):
        read_training_settings(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    training_settings_path(bad).write_text("{not json")
    with pytest.raises(ValueError, match="bad.pt.training.json"):
        read_training_settings(bad)
    training_settings_path(bad).write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match="lack"):
        read_training_settings(bad)


def test_weights_default_to_the_trained_loss(model_path: Path, train_set: list[Atoms]) -> None:
    from alforge.mlip.loss_weights import LossWeights
    from alforge.uncertainty import loss_hessian

    hessian = loss_hessian(model_path, train_set, regularizer=0.1, device="cpu")
    n_atoms = sum(len(a) for a in train_set)
    expected = LossWeights(10.0, 100.0 * len(train_set) / (3 * n_atoms), 50.0 / 9)
    assert hessian.weights == expected
    assert LossWeights.from_dict(expected.to_dict()) == expected
    assert hessian.form == "loss" and hessian.regularizer == 0.1 and hessian.regularizer_method == "given"
    override = loss_hessian(model_path, train_set, regularizer=0.1, force_weight=1.0, stress_weight=0.0, device="cpu")
    assert override.weights == LossWeights(10.0, len(train_set) / (3 * n_atoms), 0.0)


def test_loss_hessian_equals_brute_force_gauss_newton(model_path: Path, train_set: list[Atoms]) -> None:
    from alforge.uncertainty import loss_hessian

    regularizer = 0.05
    hessian = loss_hessian(model_path, train_set, regularizer=regularizer, device="cpu")
    data = hessian.matrix - regularizer**2 * np.eye(hessian.dim)
    reference = _brute_force(model_path, train_set, hessian.weights)
    assert np.linalg.norm(data - reference) <= 1e-8 * np.linalg.norm(reference)
    # the stress rows on their own (small here: 1/V² with V ≈ 47-94 Å³) agree as well
    no_stress = loss_hessian(model_path, train_set, regularizer=regularizer, stress_weight=0.0, device="cpu")
    stress_part = hessian.matrix - no_stress.matrix
    reference_stress = reference - _brute_force(model_path, train_set, no_stress.weights)
    assert np.linalg.norm(reference_stress) > 1e-6 * np.linalg.norm(reference)
    assert np.linalg.norm(stress_part - reference_stress) <= 1e-6 * np.linalg.norm(reference_stress)


def test_batched_jacobians_equal_the_per_feature_loop(model_path: Path, train_set: list[Atoms]) -> None:
    from alforge.mlip.features import feature_jacobians
    from alforge.mlip.jacobians import label_rows
    from alforge.mlip.loss_weights import LossWeights

    for atoms in (train_set[1], train_set[-1]):
        loop = _loop_jacobians(model_path, atoms)
        for chunk in (None, 5, 1, "auto"):  # all d in one pass, chunks of 5, one by one, the default
            (batched,) = feature_jacobians(model_path, [atoms], device="cpu", vjp_chunk=chunk)
            assert batched.shape == loop.shape == (len(atoms), 3, loop.shape[2])
            assert np.abs(batched - loop).max() <= 1e-10 * max(np.abs(loop).max(), 1.0)
    # label rows with stress: one pass over all d equals the default chunking
    one_pass = label_rows(model_path, train_set[:2], LossWeights(1.0, 1.0, 1.0), device="cpu", vjp_chunk=None)
    default = label_rows(model_path, train_set[:2], LossWeights(1.0, 1.0, 1.0), device="cpu")
    for a, b in zip(one_pass, default):
        assert np.allclose(a.T @ a, b.T @ b, rtol=0, atol=1e-12 * np.abs(b.T @ b).max())


def test_label_rows_are_a_compact_factor(model_path: Path, train_set: list[Atoms]) -> None:
    from alforge.mlip.features import compute_features, feature_jacobians
    from alforge.mlip.jacobians import label_rows
    from alforge.mlip.loss_weights import LossWeights

    weights = LossWeights(energy=2.0, forces=0.3)
    structures = [train_set[0], train_set[1]]  # 4 and 8 atoms
    rows = label_rows(model_path, structures, weights, device="cpu")
    jacobians = feature_jacobians(model_path, structures, device="cpu")
    features = compute_features(model_path, structures, device="cpu")
    d = features[0].last_layer.shape[1]
    for atoms, r, jac, feat in zip(structures, rows, jacobians, features):
        n = len(atoms)
        g = np.concatenate(
            [np.sqrt(2.0) * feat.last_layer.sum(0)[None] / n, np.sqrt(0.3) * jac.reshape(-1, d)]
        )
        assert r.shape == (min(1 + 3 * n, d), d) and r.dtype == np.float64
        assert np.allclose(r.T @ r, g.T @ g, rtol=0, atol=1e-12 * np.abs(g.T @ g).max())
    with_stress = label_rows(model_path, structures, LossWeights(2.0, 0.3, 1.0), device="cpu")
    assert [r.shape[0] for r in with_stress] == [min(1 + 3 * len(a) + 9, d) for a in structures]


def test_adding_a_structure_raises_its_pr_by_its_weight(model_path: Path, train_set, validation) -> None:
    from alforge.mlip.features import compute_features
    from alforge.mlip.jacobians import label_rows
    from alforge.uncertainty import loss_hessian
    from alforge.uncertainty.rigidity import data_matrix, prediction_rigidity

    hessian = loss_hessian(model_path, train_set, regularizer=0.1, form="energy", device="cpu")
    assert hessian.form == "energy" and hessian.weights.forces == 0 and hessian.weights.stress == 0
    for atoms in (validation[0], validation[1]):
        f_s = compute_features(model_path, [atoms], device="cpu")[0].last_layer.sum(0)[None]
        (rows,) = label_rows(model_path, [atoms], hessian.weights, device="cpu")
        before = prediction_rigidity(hessian, f_s)[0]
        after = prediction_rigidity(hessian.updated(rows), f_s)[0]
        assert after - before == pytest.approx(hessian.weights.energy / len(atoms) ** 2, rel=1e-8)
    rebuilt = data_matrix(label_rows(model_path, train_set, hessian.weights, device="cpu"), hessian.dim)
    rebuilt[np.diag_indices(hessian.dim)] += 0.1**2
    assert np.allclose(rebuilt, hessian.matrix, rtol=1e-13, atol=0)


def test_choose_regularizer(model_path: Path, train_set: list[Atoms], validation: list[Atoms]) -> None:
    from alforge.uncertainty import choose_regularizer, loss_hessian

    chosen = loss_hessian(model_path, train_set, validation=validation, device="cpu")
    assert np.isfinite(chosen.regularizer) and chosen.regularizer > 0
    n_components = 3 * sum(len(a) for a in validation)
    assert chosen.regularizer_method.startswith(
        f"profile likelihood of 4 held-out energies and {n_components} held-out force components"
    )
    energy_only = loss_hessian(model_path, train_set, validation=validation, form="energy", device="cpu")
    assert "force components" not in energy_only.regularizer_method
    default = loss_hessian(model_path, train_set, device="cpu")
    assert default.regularizer > 0 and "no validation data" in default.regularizer_method
    data = default.matrix - default.regularizer**2 * np.eye(default.dim)
    value, method = choose_regularizer(data, n_structures=10, readout_weight_decay=0.02)
    assert value == pytest.approx(np.sqrt(10 * 0.02 / 2)) and "weight decay" in method
    # the profile likelihood recovers the prior behind synthetic data
    rng = np.random.default_rng(0)
    d, true_prior = 6, 0.3
    train = rng.normal(size=(8, d)) * np.array([3, 2, 1, 0.3, 0.1, 0.03])
    held = rng.normal(size=(3000, d))
    # one model per held-out point: w ~ N(0, I/ς²), labels y = Fw + N(0, 1), posterior mean w̄
    w = rng.normal(size=(len(held), d)) / np.sqrt(true_prior)
    y = w @ train.T + rng.normal(size=(len(held), len(train)))
    w_mean = np.linalg.solve(train.T @ train + true_prior * np.eye(d), train.T @ y.T).T
    residuals = np.einsum("ij,ij->i", held, w_mean - w)  # ~ N(0, f_iᵀ(FᵀF + ς²I)⁻¹f_i)
    value, method = choose_regularizer(train.T @ train, n_structures=8, validation_features=held,
                                       validation_residuals=residuals)  # fmt: skip
    assert "profile likelihood" in method
    assert 0.3 * true_prior < value**2 < 3 * true_prior
    # a second kind of residual with its own noise scale (α² = 4) is fitted with its own α²
    few = slice(0, 5)
    value, method = choose_regularizer(train.T @ train, n_structures=8, validation_features=held[few],
                                       validation_residuals=residuals[few], validation_force_rows=held[5:],
                                       validation_force_residuals=2.0 * residuals[5:])  # fmt: skip
    assert "and 2995 held-out force components" in method and "α²(force) = " in method
    assert 0.3 * true_prior < value**2 < 3 * true_prior


def test_validation_force_residuals_are_the_model_forces(model_path: Path, validation: list[Atoms]) -> None:
    from alforge.mlip.mace_model import load_calculator, load_model
    from alforge.uncertainty.gauss_newton import _validation_forces

    rows, residuals = _validation_forces(load_model(model_path, "cpu"), validation, "cpu")
    calc = load_calculator(model_path, "cpu")
    expected = []
    for atoms in validation:
        work = atoms.copy()
        work.calc = calc
        expected.append((work.get_forces() - atoms.calc.results["forces"]).ravel())
    assert rows.shape == (len(residuals), rows.shape[1])
    np.testing.assert_allclose(residuals, np.concatenate(expected), atol=1e-10)


def test_hessian_is_stored_once_per_model(model_path: Path, train_set: list[Atoms], tmp_path: Path) -> None:
    from alforge.mlip.mace_model import read_training_settings
    from alforge.storage import Store
    from alforge.storage.model_files import file_sha256
    from alforge.storage.store import LabelRecord
    from alforge.tasks import hessian as hessian_task

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    cid = store.get_or_create_campaign("t", {})
    sids = store.add_structures(cid, train_set, role="seed", source="t")
    store.request_labels(sids, "emt", "h")
    for lid, sid in store.unfinished_labels(cid):
        atoms = train_set[sids.index(sid)]
        results = atoms.calc.results
        store.start_label(lid)
        store.finish_label(lid, LabelRecord(status="done", energy=results["energy"], forces=results["forces"],
                                            stress=voigt_6_to_full_3x3_stress(results["stress"])
                                            if "stress" in results else None))  # fmt: skip
    it = store.get_or_create_iteration(cid, 0)
    mid = store.add_model(cid, it, str(model_path), sids, {}, sha256=file_sha256(model_path))
    assert store.get_hessian(mid, "loss") is None
    first = hessian_task.ensure_hessian(url, mid)
    stored = store.get_hessian(mid, "loss")
    assert stored is not None and stored["n_structures"] == len(train_set)
    assert np.array_equal(stored["matrix"], first.matrix) and stored["regularizer"] == first.regularizer
    assert stored["weights"] == first.weights.to_dict()
    assert read_training_settings(model_path)["valid_indices"] == []
    assert "no validation data" in first.regularizer_method
    again = hessian_task.ensure_hessian(url, mid)  # from the store, not recomputed
    assert np.array_equal(again.matrix, first.matrix) and again.regularizer_method == first.regularizer_method
    # reading a stored H back is on every select path: it must not import torch or mace
    code = (
        "import sys; from alforge.tasks.hessian import ensure_hessian; "
        f"h = ensure_hessian({url!r}, {mid}); "
        "print(h.dim, sorted(m for m in ('torch', 'mace') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.split() == [str(first.dim), "[]"], out.stdout + out.stderr
    shifted = hessian_task.ensure_hessian(url, mid, regularizer=0.5)
    assert np.allclose(shifted.matrix - first.matrix, (0.25 - first.regularizer**2) * np.eye(first.dim))
    assert store.get_hessian(mid, "loss")["regularizer"] == first.regularizer
    store.put_hessian(mid, "loss", np.eye(2), 1.0, "given", {"energy": 1.0, "forces": 0.0, "stress": 0.0}, 1)
    assert np.array_equal(store.get_hessian(mid, "loss")["matrix"], np.eye(2))  # replaced, not duplicated
