"""PROBE (METHODS §6): the network on ragged batches, its loss, chunked attention, the reliability
metrics against hand-made cases, the probe file, and a `probe` campaign end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alforge.uncertainty import reliability as rel
from alforge.uncertainty.probe import (
    ProbeBackboneError,
    ProbeConfig,
    ProbeNet,
    class_weights,
    load_probe,
    pad_batch,
    probe_loss,
    reliability_labels,
    train_probe,
)

TINY = {"encoder_dims": (16, 16), "heads": 4, "embedding_dim": 12, "classifier_dims": (8,)}


def _ragged(seed: int = 0, count: int = 6, dim: int = 5) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(1, 9)), dim)) for _ in range(count)], rng.normal(size=count) * 3


def _net(target: str = "energy", block: int = 1 << 24, dim: int = 5) -> ProbeNet:
    torch.manual_seed(0)
    return ProbeNet(ProbeConfig(in_dim=dim, target=target, attention_block=block, **TINY)).eval()


@pytest.mark.parametrize("target", ["energy", "forces"])
def test_padding_never_changes_the_output(target):
    feats, energies = _ragged()
    net = _net(target)
    per_atom = (target == "forces", target == "forces", True)  # logits, embedding, importance
    with torch.no_grad():
        batch = net(*pad_batch(feats, energies, "cpu"))
        for i, f in enumerate(feats):
            alone, n = net(*pad_batch([f], energies[i : i + 1], "cpu")), len(f)
            for got, want, atoms in zip(batch, alone, per_atom):
                got, want = (got[i, :n], want[0, :n]) if atoms else (got[i], want[0])
                assert torch.allclose(got, want, atol=1e-5), f"structure {i} ({n} atoms)"
            assert torch.all(batch[2][i, n:] == 0), "no importance on padding"


def test_importance_sums_to_one_and_follows_attention():
    feats, energies = _ragged(1)
    net = _net()
    with torch.no_grad():
        _, _, importance = net(*pad_batch(feats, energies, "cpu"))
    sums = importance.sum(dim=1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    # brute force for one structure: Σ_heads Σ_queries softmax(QKᵀ/√d) / (heads · n)
    f = torch.as_tensor(feats[0], dtype=torch.float32)
    with torch.no_grad():
        x = net.encoder(f)
        q, k, _ = net.attention.qkv(x).view(len(f), 3, 4, 4).permute(1, 2, 0, 3)
        a = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)
    assert torch.allclose(importance[0, : len(f)], a.sum(dim=(0, 1)) / (4 * len(f)), atol=1e-6)


@pytest.mark.parametrize("target", ["energy", "forces"])
def test_chunked_attention_equals_one_block(target):
    feats, energies = _ragged(2, count=4)
    plain, chunked = _net(target), _net(target, block=4 * 8)  # below batch × heads × n: one query a block
    chunked.load_state_dict(plain.state_dict())
    args = pad_batch(feats, energies, "cpu")
    shapes = []
    attend = chunked.attention._attend
    chunked.attention._attend = lambda q, *rest: shapes.append(q.shape) or attend(q, *rest)
    with torch.no_grad():
        for a, b in zip(plain(*args), chunked(*args)):
            assert torch.allclose(a, b, atol=1e-6)
    n_max = args[1].shape[1]
    assert [s[2] for s in shapes] == [1] * n_max, "one query per block: batch × heads × 1 × n scores at a time"
    del chunked.attention._attend
    # with gradients (checkpointed blocks) the loss and its gradient agree as well
    y = torch.tensor([0, 1, 1, 0]) if target == "energy" else torch.zeros(args[1].shape, dtype=torch.long)
    grads = []
    for net in (plain, chunked):
        net.zero_grad()
        logits, _, _ = net(*args)
        probe_loss(logits, y, args[1].sum(dim=1), torch.ones(2), args[1]).backward()
        grads.append(net.attention.qkv.weight.grad.clone())
    assert torch.allclose(*grads, atol=1e-6)


def test_loss_weighting_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    labels = torch.tensor([1, 1, 0])
    n = torch.tensor([4, 9, 1])
    w = class_weights(labels.numpy())
    assert np.allclose(w, [3 / 2, 3 / 4]), "w_c = N / (2 N_c)"
    expected = 0.0
    for (a, b), y, k in zip(logits.tolist(), labels.tolist(), n.tolist()):
        ce = -math.log(math.exp([a, b][y]) / (math.exp(a) + math.exp(b)))
        expected += w[y] * ce / math.sqrt(k)
    got = probe_loss(logits, labels, n, torch.as_tensor(w, dtype=torch.float32))
    assert got.item() == pytest.approx(expected / 3, rel=1e-6)
    # force variant: Σ_j over real atoms of each structure, / √n, mean over structures
    atom_logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [9.0, 9.0]]])
    atom_labels, mask = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[True, True], [True, False]])
    ce = -torch.log_softmax(atom_logits, dim=-1).gather(2, atom_labels[..., None])[..., 0]
    want = ((ce[0, 0] + ce[0, 1]) / math.sqrt(2) + ce[1, 0]) / 2
    got = probe_loss(atom_logits, atom_labels, mask.sum(dim=1), torch.ones(2), mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_labels_from_the_training_percentile():
    labels, q = reliability_labels(np.array([0.1, -0.4, 0.2, 0.9, 0.3]))
    assert q == pytest.approx(0.3) and labels.tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="percentile"):
        reliability_labels(np.ones(3), 100)


def _learnable(seed: int = 0, count: int = 60, dim: int = 5):
    """Structures whose error is large exactly when their first feature is high on average."""
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(int(rng.integers(2, 7)), dim)) for _ in range(count)]
    energies = rng.normal(size=count)
    errors = np.array([abs(f[:, 0].mean()) * 0.01 + (0.5 if f[:, 0].mean() > 0 else 0.0) for f in feats])
    return feats, energies, energies + errors


def test_training_learns_a_separable_signal_and_round_trips(tmp_path):
    feats, energies, ref = _learnable()
    probe = train_probe(feats, energies, ref, max_epochs=60, lr=3e-3, batch_size=16, seed=1, device="cpu",
                        backbone_sha256="a" * 64, **TINY)
    assert probe.info["n_valid"] == 6 and probe.info["reliable_fraction"] == pytest.approx(0.5)
    test_feats, test_e, test_ref = _learnable(seed=5, count=40)
    out = probe.predict(test_feats, test_e)
    labels = (np.abs(test_e - test_ref) <= probe.threshold).astype(int)
    assert rel.roc_auc(labels, out.p_reliable) > 0.8
    assert out.embedding.shape == (40, 12) and all(np.isclose(i.sum(), 1) for i in out.importance)
    path = probe.save(tmp_path / "probe.pt")
    again = load_probe(path, backbone_sha256="a" * 64)
    assert np.allclose(again.predict(test_feats, test_e).p_reliable, out.p_reliable)
    assert again.threshold == probe.threshold and again.config == probe.config
    with pytest.raises(ProbeBackboneError, match="SHA-256"):
        load_probe(path, backbone_sha256="b" * 64)
    with pytest.raises(ValueError, match="dimension 4"):
        probe.predict([np.zeros((3, 4))], [0.0])


def test_training_is_seeded():
    feats, energies, ref = _learnable(count=20)
    a, b = (train_probe(feats, energies, ref, max_epochs=3, seed=3, device="cpu", **TINY) for _ in range(2))
    assert np.array_equal(a.predict(feats, energies).p_reliable, b.predict(feats, energies).p_reliable)


def test_force_variant_labels_atoms():
    feats, energies, _ = _learnable(count=20)
    force_errors = [np.abs(f[:, 0]) for f in feats]
    probe = train_probe(feats, energies, force_errors=force_errors, target="forces", max_epochs=2, device="cpu", **TINY)
    assert probe.threshold == pytest.approx(np.median(np.concatenate(force_errors)))
    out = probe.predict(feats, energies)
    assert [len(p) for p in out.atom_p_reliable] == [len(f) for f in feats]
    assert np.allclose(out.p_reliable, [p.min() for p in out.atom_p_reliable])
    with pytest.raises(ValueError, match="force_errors of structure 0"):
        train_probe(feats, energies, force_errors=[e[:-1] for e in force_errors], target="forces", **TINY)


# ---------------------------------------------------------------------------- metrics
def test_binary_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    yhat = np.array([1, 1, 0, 0, 0, 1, 0, 1])  # tp 3, fn 1, fp 1, tn 3
    m = rel.binary_metrics(y, yhat)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["mcc"] == pytest.approx((9 - 1) / math.sqrt(4 * 4 * 4 * 4))
    assert m["f1"] == pytest.approx(6 / 8)
    assert rel.binary_metrics(y, np.ones(8, int))["mcc"] == 0.0


def test_auc_ece_brier_spearman_by_hand():
    y = np.array([0, 0, 1, 1])
    assert rel.roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert rel.roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    p = np.array([0.05, 0.15, 0.95, 0.55])
    # bins [0,.1): p .05, y 0 → .05; [.1,.2): .15 vs 0 → .15; [.9,1]: .95 vs 1 → .05; [.5,.6): .55 vs 1 → .45
    assert rel.expected_calibration_error(y, p) == pytest.approx((0.05 + 0.15 + 0.05 + 0.45) / 4)
    report = rel.reliability_report(y, p, errors=np.array([3.0, 2.0, 0.1, 1.0]))
    assert report["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert report["spearman"] == pytest.approx(1.0)  # 1 − p ranks the errors exactly
    rows = {r["cutoff"]: r for r in report["coverage_accuracy"]}
    assert rows[0.5]["coverage"] == 1 and rows[0.5]["accuracy"] == 1
    # confidence max(p, 1−p) = .95 .85 .95 .55: at 0.9 two kept, one each way
    assert rows[0.9]["coverage"] == 0.5
    assert rows[0.9]["mean_error_reliable"] == pytest.approx(0.1)
    assert rows[0.9]["mean_error_unreliable"] == pytest.approx(3.0)


def test_baselines_by_hand():
    y = np.array([1, 1, 0, 0, 1])
    assert rel.majority_baseline(y)["accuracy"] == pytest.approx(0.6)
    assert rel.majority_baseline(y)["mcc"] == 0.0
    energies = np.array([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 8.0, 8.0, 3.0]])
    n = np.array([1, 4, 4, 1, 1])
    # σ = std(ddof 1)/√n = .707, .707, 2.83, 5.66, 2.12 → median 2.12: reliable = 1 1 0 0 1
    out = rel.ensemble_std_baseline(y, energies, n, errors=np.array([0.1, 0.2, 0.9, 1.0, 0.3]))
    assert out["accuracy"] == 1.0 and out["mcc"] == pytest.approx(1.0) and out["spearman"] > 0.8
    with pytest.raises(ValueError, match="committee_energies"):
        rel.ensemble_std_baseline(y, energies[:1], n, np.zeros(5))


# ---------------------------------------------------------------------------- store, selector, MD check
def test_probe_file_in_the_store_is_tied_to_its_backbone(tmp_path):
    from alforge.storage import Store
    from alforge.storage.model_files import ModelFileError, file_sha256

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    cid = store.get_or_create_campaign("c", {})
    backbone = tmp_path / "m.model"
    backbone.write_bytes(b"weights")
    digest = file_sha256(backbone)
    mid = store.add_model(cid, store.get_or_create_iteration(cid, 1), str(backbone), [], {}, sha256=digest)
    feats, energies, ref = _learnable(count=12)
    probe = train_probe(feats, energies, ref, max_epochs=1, device="cpu", backbone_sha256=file_sha256(backbone), **TINY)
    path = probe.save(tmp_path / "m.probe.pt")
    assert store.aux_model_file(mid, "probe") is None
    stored = store.add_aux_model(mid, "probe", str(path), file_sha256(path), file_sha256(backbone), {"percentile": 50})
    assert stored == str(path)
    assert store.add_aux_model(mid, "probe", "/elsewhere.pt", "0" * 64, "0" * 64, {}) == str(path), "first one stands"
    assert store.aux_model(mid, "probe")["params"] == {"percentile": 50}
    loaded = load_probe(store.aux_model_file(mid, "probe"), backbone_sha256=store.model(mid).sha256)
    assert np.allclose(loaded.predict(feats, energies).p_reliable, probe.predict(feats, energies).p_reliable)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ModelFileError, match="SHA-256"):
        store.aux_model_file(mid, "probe")
    other = store.add_model(cid, store.get_or_create_iteration(cid, 2), str(backbone), [], {}, sha256="f" * 64)
    store.add_aux_model(other, "probe", str(path), file_sha256(path), file_sha256(backbone), {})
    with pytest.raises(ModelFileError, match="trained on a backbone"):
        store.aux_model_file(other, "probe")
    store.close()


def test_probe_selector_ranks_by_unreliability():
    from alforge.selectors import make_selector

    selector = make_selector("probe")
    p = np.array([0.9, 0.2, 0.6, 0.05, 0.45])
    importance = [np.array([1.0]), np.array([0.2, 0.8]), np.array([1.0]), np.array([0.7, 0.3]), np.array([1.0])]
    result = selector.select(np.zeros((5, 2)), 3, p_reliable=p, importance=importance)
    assert result.indices.tolist() == [3, 1, 4]
    assert np.allclose(result.scores, [0.95, 0.8, 0.55]) and result.info["top_atom"] == [0, 1, 0]
    assert selector.informative(result.scores, 0.0) == 3
    assert selector.informative(np.array([0.4, 0.6]), 0.0) == 1, "p_reliable ≥ 0.5 is not informative"
    with pytest.raises(ValueError, match="p_reliable"):
        selector.select(np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="percentile"):
        make_selector("probe", percentile=0)


def test_md_checks_chain_in_order():
    from alforge.tasks.probe import chain_checks

    calls = []

    def never(atoms):
        calls.append("never")

    def always(atoms):
        calls.append("always")
        return "stop"

    assert chain_checks(None, None) is None and chain_checks(None, never) is never
    assert chain_checks(never, always, never)(None) == "stop" and calls == ["never", "always"]


@pytest.mark.slow
def test_probe_campaign_end_to_end(tmp_path, prefect_harness):
    import json

    from alforge.config import load_config
    from alforge.flows.campaign import campaign
    from alforge.storage import Store
    from alforge.tasks.probe import ensure_probe
    from conftest import tiny_campaign

    path = tiny_campaign(
        tmp_path,
        name="sel-probe",
        selector={"name": "probe", "batch_size": 2, "params": {"max_epochs": 3, "unreliable_above": 0.0}},
        mlip={"max_epochs": 3, "finetune_epochs": 2},
        exploration={"walkers": 2, "steps": 9, "frame_interval": 3, "probe_min_reliable": 0.01},
    )
    result = campaign(str(path))
    assert not result["paused"]
    cfg = load_config(path)
    store = Store(cfg.store)
    cid = store.campaign_id("sel-probe")
    it1, it2 = store.iterations(cid)
    sel = store.selection_for_iteration(it1.id)
    assert sel["selector"] == "probe" and 1 <= len(sel["picked_ids"]) <= 2
    assert set(sel["picked_ids"]) <= set(store.labelled_ids(cid, role="candidate"))
    assert np.all(np.diff(sel["scores"]) <= 0) and np.all((sel["scores"] >= 0) & (sel["scores"] <= 1))
    assert sel["params"]["max_epochs"] == 3
    for it in (it1, it2):
        evaluation = json.loads(it.summary_json)["diagnostics"]["probe"]
        assert evaluation["probe"]["n"] == 4 and 0 <= evaluation["probe"]["accuracy"] <= 1
        assert len(evaluation["probe"]["coverage_accuracy"]) == 10 and "majority" in evaluation
    m1 = store.models(cid)[0]
    row = store.aux_model(m1.id, "probe")
    assert row["backbone_sha256"] == m1.sha256 and row["params"]["max_epochs"] == 3
    again = ensure_probe(cfg.store, m1.id, max_epochs=3)  # reused, not retrained
    assert store.aux_model(m1.id, "probe")["path"] == row["path"] and again.threshold == row["params"]["threshold"]
    assert len(list((tmp_path / "runs").rglob("*.probe-*.pt"))) == len(store.models(cid))
    # the force variant and the ensemble-std baseline on the same store: one extra committee member
    from alforge.mlip.mace_model import train_mace
    from alforge.mlip.params import MACEParams
    from alforge.storage.model_files import file_sha256
    from alforge.tasks.probe import probe_evaluation

    member = tmp_path / "member1.model"
    params = MACEParams(num_channels=8, max_L=0, mlp_irreps="8x0e", max_epochs=2, batch_size=4, seed=1)
    train_mace(store.get_labelled_atoms([int(i) for i in m1.train_ids]), params, member)
    store.add_committee_member(m1.id, 1, 1, str(member), {}, sha256=file_sha256(member))
    energy = probe_evaluation(cfg.store, cid, m1.id, {"max_epochs": 3})
    assert energy["ensemble_std"]["members"] == 2 and energy["ensemble_std"]["n"] == 4
    forces = probe_evaluation(cfg.store, cid, m1.id, {"target": "forces", "max_epochs": 2})
    test_atoms = sum(len(a) for a in store.get_atoms(store.labelled_ids(cid, role="test")))
    assert forces["target"] == "forces" and forces["probe"]["n"] == test_atoms, "scored per atom"
    assert store.aux_model(m1.id, "probe_forces")["backbone_sha256"] == m1.sha256


@pytest.mark.slow
def test_md_walker_stops_below_the_reliability_cutoff(tmp_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from alforge.exploration.md import MDSettings, run_walker
    from alforge.mlip.features import compute_features
    from alforge.mlip.mace_model import load_calculator, load_model, train_mace
    from alforge.mlip.params import MACEParams
    from alforge.tasks.probe import probe_check

    train = []
    for k in range(8):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        train.append(atoms)
    path = tmp_path / "m.model"
    train_mace(train, MACEParams(num_channels=8, max_L=0, mlp_irreps="8x0e", max_epochs=2, batch_size=4), path)
    feats = compute_features(path, train)
    probe = train_probe([f.invariant for f in feats], [f.energy for f in feats],
                        [a.get_potential_energy() for a in train], max_epochs=1, device="cpu", **TINY)
    model = load_model(path)
    p = probe.predict([feats[0].invariant], [feats[0].energy]).p_reliable[0]
    assert probe_check(model, probe, min_reliable=p * 0.999)(train[0]) is None
    assert "p_reliable" in probe_check(model, probe, min_reliable=min(p * 1.001, 0.999999))(train[0])
    settings = MDSettings(temperature_K=300, timestep_fs=1.0, steps=6, frame_interval=3,
                          friction_per_fs=0.01, min_distance=1.5, max_energy_change=10.0)
    start = train[0].copy()
    traj = run_walker(start, load_calculator(path), settings, seed=0, extra_check=probe_check(model, probe, 0.999999))
    assert traj.stop_reason.startswith("step 3: PROBE p_reliable") and traj.frames == []
