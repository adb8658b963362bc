"""LTAU (METHODS §7): p_i on a hand-made error log, the kNN lookup against numpy brute force, HNSW
recall, per-element indices, the calibration curve; and an ``ltau`` campaign end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alforge.uncertainty.ltau import LTAU, calibration_curve, exceedance

#: 4 training atoms × 5 epochs; with atol = 0.1 the counts of epochs ≤ atol are 5, 3, 1, 0.
LOG = np.array([
    [0.05, 0.04, 0.03, 0.02, 0.01],
    [0.30, 0.20, 0.10, 0.09, 0.08],
    [0.50, 0.40, 0.30, 0.20, 0.10],
    [0.90, 0.80, 0.70, 0.60, 0.50],
])  # fmt: skip
P_HAND = np.array([0.0, 0.4, 0.8, 1.0])


def _brute_knn(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((queries[:, None, :].astype(np.float64) - train[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, order, axis=1), order


def test_p_i_on_a_hand_made_log() -> None:
    assert np.allclose(exceedance(LOG, 0.1), P_HAND)
    embeddings = np.eye(4)
    ltau = LTAU(atol=0.1, k=1).fit(embeddings, LOG)
    assert np.allclose(ltau.train_p_, P_HAND)
    assert np.allclose(ltau.predict(embeddings + 0.01), P_HAND)  # k=1: each query is its own training atom
    # k=2 on a query between atoms 0 and 1, far from 2 and 3
    assert LTAU(atol=0.1, k=2).fit(embeddings, LOG).predict([[0.5, 0.5, 0, 0]])[0] == pytest.approx(0.2)
    # atol=None: the final-epoch MAE, mean(0.01, 0.08, 0.10, 0.50) = 0.1725 → counts 5, 3, 1, 0 again
    default = LTAU(k=1).fit(embeddings, LOG)
    assert default.atol_ == pytest.approx(0.1725)
    assert np.allclose(default.train_p_, P_HAND)
    assert np.allclose(LTAU(atol=0.35, k=1).fit(embeddings, LOG).train_p_, [0.0, 0.0, 0.4, 1.0])
    # rtol: atom 3 (|F_ref| = 10) gets 0.1 + 0.05·10 = 0.6 → 2 epochs of 5 within
    rel = LTAU(atol=0.1, rtol=0.05, k=1).fit(embeddings, LOG, reference_norms=np.array([0, 0, 0, 10.0]))
    assert np.allclose(rel.train_p_, [0.0, 0.4, 0.8, 0.6])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="error_log must be"):
        LTAU().fit(np.eye(4), LOG[:3])
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        LTAU().fit(np.eye(4), np.where(np.arange(4)[:, None] == 1, np.nan, LOG))
    with pytest.raises(ValueError, match="reference_norms"):
        LTAU(atol=0.1, rtol=0.1).fit(np.eye(4), LOG)
    with pytest.raises(ValueError, match="index must be"):
        LTAU(index="ivf")
    ltau = LTAU(atol=0.1, k=2).fit(np.eye(4), LOG, elements=[1, 1, 8, 8])
    with pytest.raises(ValueError, match="needs elements"):
        ltau.predict(np.eye(4))
    with pytest.raises(ValueError, match="element 6 has no training atoms"):
        ltau.predict(np.eye(4)[:1], elements=[6])
    with pytest.raises(ValueError, match="dimension 3"):
        ltau.predict(np.ones((1, 3)), elements=[1])


def test_flat_knn_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 12)).astype(np.float32)
    queries = rng.normal(size=(60, 12)).astype(np.float32)
    log = rng.gamma(2.0, 0.05, size=(500, 20))
    ltau = LTAU(k=7, index="flat").fit(train, log)
    distances, neighbours = ltau.kneighbors(queries)
    ref_d, ref_i = _brute_knn(train, queries, 7)
    assert np.array_equal(neighbours, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ltau.predict(queries), ltau.train_p_[ref_i].mean(axis=1), atol=1e-12)


def test_hnsw_recall_at_k() -> None:
    """Unclustered Gaussian vectors are HNSW's hard case (no structure for its graph to exploit)."""
    rng = np.random.default_rng(1)
    n, dim, k = 10_000, 32, 10
    train = rng.normal(size=(n, dim)).astype(np.float32)
    queries = rng.normal(size=(300, dim)).astype(np.float32)
    _, approx = LTAU(k=k, index="hnsw").fit(train, np.full((n, 1), 0.1)).kneighbors(queries)
    _, exact = _brute_knn(train, queries, k)
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
    print(f"HNSW (M=32, efSearch=128) recall@{k} on {n} Gaussian {dim}-d vectors: {recall:.4f}")
    assert recall >= 0.95


def test_per_element_indices_only_compare_like_atoms() -> None:
    rng = np.random.default_rng(2)
    train = rng.normal(size=(300, 6)).astype(np.float32)
    elements = rng.choice([1, 6, 8], size=300)
    log = rng.gamma(2.0, 0.05, size=(300, 10))
    ltau = LTAU(atol=0.1, k=5).fit(train, log, elements=elements)
    queries = rng.normal(size=(40, 6)).astype(np.float32)
    q_elements = rng.choice([1, 6, 8], size=40)
    _, neighbours = ltau.kneighbors(queries, elements=q_elements)
    expected = np.empty(40)
    for j in range(40):
        rows = np.flatnonzero(elements == q_elements[j])
        _, order = _brute_knn(train[rows], queries[j : j + 1], 5)
        assert set(neighbours[j]) == set(rows[order[0]])
        expected[j] = ltau.train_p_[rows[order[0]]].mean()
    np.testing.assert_allclose(ltau.predict(queries, elements=q_elements), expected, atol=1e-12)
    # an element with fewer training atoms than k averages all of them
    small = LTAU(atol=0.1, k=5).fit(np.eye(4), LOG, elements=[1, 1, 8, 8])
    assert small.predict(np.eye(4)[:1], elements=[8])[0] == pytest.approx(0.9)


def test_calibration_curve_by_hand() -> None:
    p = np.array([0.05, 0.05, 0.05, 0.05, 0.95, 0.95])  # confidences 0.95 ×4, 0.05 ×2
    errors = np.array([0.01, 0.02, 0.03, 0.5, 0.5, 0.01])  # within 0.1: 3 of 4, 1 of 2
    curve = calibration_curve(p, errors, atol=0.1, bins=10)
    assert curve.counts[9] == 4 and curve.counts[0] == 2 and curve.counts.sum() == 6
    assert curve.observed[9] == pytest.approx(0.75) and curve.observed[0] == pytest.approx(0.5)
    assert np.isnan(curve.observed[5])
    assert curve.ece == pytest.approx((4 * 0.20 + 2 * 0.45) / 6)
    loose = calibration_curve(p, errors, atol=0.1, s=10.0)
    assert loose.tolerance == pytest.approx(1.0) and loose.observed[9] == 1.0
    with pytest.raises(ValueError, match="same non-zero length"):
        calibration_curve(p, errors[:3], atol=0.1)


def test_ltau_selector_reduces_per_structure_and_ranks() -> None:
    from alforge.selectors import make_selector

    atom_p = np.array([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.0])
    groups = np.array([0, 0, 1, 1, 1, 2, 2])  # max: 0.9, 0.4, 0.5; mean: 0.5, 0.3, 0.25
    by_max = make_selector("ltau").select(np.zeros((3, 1)), 2, atom_p=atom_p, groups=groups, train_scores=[0.2, 0.6])
    assert by_max.indices.tolist() == [0, 2] and np.allclose(by_max.scores, [0.9, 0.5])
    assert by_max.info["train_score_quantiles"]["0.5"] == pytest.approx(0.4)
    by_mean = make_selector("ltau", reduce="mean").select(np.zeros((3, 1)), 3, atom_p=atom_p, groups=groups)
    assert by_mean.indices.tolist() == [0, 1, 2] and np.allclose(by_mean.scores, [0.5, 0.3, 0.25])
    selector = make_selector("ltau", uncertain_above=0.4)
    assert selector.informative(np.array([0.9, 0.5, 0.4]), None) == 2
    assert selector.informative(np.array([0.9, 0.5, 0.4]), 0.45) == 2
    assert selector.informative(np.array([0.9, 0.5, 0.4]), 0.95) == 0
    with pytest.raises(ValueError, match="needs atom_p"):
        selector.select(np.zeros((3, 1)), 1)
    with pytest.raises(ValueError, match="at least one atom"):
        selector.select(np.zeros((4, 1)), 1, atom_p=atom_p, groups=groups)
    with pytest.raises(ValueError, match="reduce must be"):
        make_selector("ltau", reduce="sum")


@pytest.mark.slow
def test_ltau_campaign_end_to_end(tmp_path, prefect_harness):
    """A campaign selecting with ``ltau`` and stopping walkers on it; then the stored pieces it used
    (training-error log, features) reproduce a walker's check and the selection's scores."""
    from alforge.config import load_config
    from alforge.flows.campaign import campaign
    from alforge.mlip.features import compute_features
    from alforge.mlip.mace_model import load_model
    from alforge.storage import Store
    from alforge.tasks.featurize import INVARIANT
    from alforge.tasks.ltau import campaign_ltau_settings, campaign_uses_ltau, fitted_ltau, ltau_check, ltau_evaluation
    from conftest import tiny_campaign

    path = tiny_campaign(
        tmp_path,
        name="sel-ltau",
        selector={"name": "ltau", "batch_size": 2, "params": {"k": 3, "reduce": "max"}},
        mlip={"max_epochs": 3, "finetune_epochs": 2},
        exploration={"walkers": 2, "steps": 9, "frame_interval": 3, "ltau_max": 0.999},
    )
    result = campaign(str(path))
    assert not result["paused"]
    store = Store(load_config(path).store)
    cid = store.campaign_id("sel-ltau")
    it1, _ = store.iterations(cid)
    m1, m2 = store.models(cid)
    for model, epochs in ((m1, 3), (m2, 2)):  # the fine-tuned model logs its own 2 epochs
        errors = store.training_errors(model.id)
        assert errors.form == "epochs" and errors.n_epochs == epochs and errors.forces.shape[1] == epochs
        assert set(errors.structure_ids.tolist()) <= set(model.train_ids.tolist())
    sel = store.selection_for_iteration(it1.id)
    assert sel["selector"] == "ltau" and 1 <= len(sel["picked_ids"]) <= 2
    assert set(sel["picked_ids"]) <= set(store.labelled_ids(cid, role="candidate"))
    assert np.all(np.diff(sel["scores"]) <= 0) and np.all((sel["scores"] >= 0) & (sel["scores"] <= 1))
    # the selection's scores again, from the stored log and features alone (brute-force kNN)
    errors = store.training_errors(m1.id)
    train = np.concatenate(store.get_features(m1.id, INVARIANT, errors.structure_ids.tolist()))
    train_z = np.concatenate([a.numbers for a in store.get_atoms(errors.structure_ids.tolist())])
    p_i = exceedance(errors.forces, errors.forces_last.astype(np.float64).mean())
    picked = sel["picked_ids"].tolist()
    for sid, score in zip(picked, sel["scores"]):
        (query,) = store.get_features(m1.id, INVARIANT, [sid])
        _, order = _brute_knn(train, query.astype(np.float32), 3)  # one element (Cu): one index
        assert score == pytest.approx(p_i[order].mean(axis=1).max(), abs=1e-6)
    assert set(train_z.tolist()) == {29}
    # a walker's frame check agrees with the fitted LTAU
    fitted = fitted_ltau(store, m1.id, campaign_ltau_settings(store, cid))
    (frame,) = store.get_atoms(picked[:1])
    p = fitted.predict(compute_features(store.model_file(m1.id), [frame], device="cpu")[0].invariant, frame.numbers)
    model = load_model(store.model_file(m1.id), "cpu")
    assert ltau_check(model, fitted, 0.999, device="cpu")(frame) is None or p.max() > 0.999
    assert ltau_check(model, fitted, float(p.max()) * 0.5, device="cpu")(frame).startswith("LTAU p = ")
    # the per-iteration evaluation on the 4 labelled test cells
    assert campaign_uses_ltau(store, cid)
    evaluation = ltau_evaluation(load_config(path).store, cid, m1.id, campaign_ltau_settings(store, cid))
    assert evaluation["n_atoms"] == sum(len(a) for a in store.get_atoms(store.labelled_ids(cid, role="test")))
    assert 0 <= evaluation["ece"] <= 1 and sum(evaluation["curve"]["counts"]) == evaluation["n_atoms"]
    assert evaluation["atol"] == pytest.approx(float(errors.forces_last.astype(np.float64).mean()))
    json.dumps(evaluation, allow_nan=False)
    stored = json.loads(it1.summary_json)["diagnostics"]["ltau"]  # recorded with the iteration
    assert stored["n_atoms"] == evaluation["n_atoms"] and stored["ece"] == pytest.approx(evaluation["ece"])
