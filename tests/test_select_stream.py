"""The streamed feature path: bulk feature blobs round-trip exactly through the store (SQLite and
PostgreSQL), and ``select_batch``, which reads them in chunks into one float32 array, picks what
the selectors pick from the old in-memory float64 arrays (mig, mig_label, dopt)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from alforge.storage import Store, arrays
from alforge.storage import store as store_module

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_select_path.py"


def _bench():
    """The benchmark module (its campaign builder is the one measured at 1e6 atoms)."""
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_select_path", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_db_url")


def _structures(store: Store, n: int) -> tuple[int, int, list[int]]:
    cid = store.get_or_create_campaign("c", {})
    it = store.get_or_create_iteration(cid, 0)
    cells = [Atoms("Cu", positions=[[0.1 * k, 0, 0]], cell=[5, 5, 5], pbc=True) for k in range(n)]
    sids = store.add_structures(cid, cells, role="candidate", source="pool")
    return cid, store.add_model(cid, it, "/m.model", sids[:2], {}), sids


def test_bulk_features_round_trip_exactly_in_chunks(url, monkeypatch):
    monkeypatch.setattr(store_module, "FEATURE_CHUNK", 7)  # 30 structures: 5 queries per read
    store = Store(url)
    _, mid, sids = _structures(store, 30)
    rng = np.random.default_rng(0)
    feats = {sid: rng.standard_normal((int(rng.integers(1, 6)), 9)) for sid in sids}
    energy = {sid: rng.standard_normal(1) for sid in sids}
    store.put_features(mid, {"last_layer": ({s: np.zeros((2, 9)) for s in sids}, "<f8")})
    store.put_features(mid, {"last_layer": (feats, "<f8"), "energy": (energy, "<f8")})  # replaces

    order = sids[::-1] + sids[:3]  # any order, repeats included
    expected = np.concatenate([feats[s] for s in order])
    stacked = store.get_feature_rows(mid, "last_layer", order, dtype="<f8")
    assert stacked.rows.dtype == np.float64 and np.array_equal(stacked.rows, expected)
    assert np.array_equal(stacked.sizes, [len(feats[s]) for s in order])
    assert all(np.array_equal(b, feats[s]) for b, s in zip(stacked.blocks(), order))
    assert np.array_equal(stacked.groups(), np.repeat(np.arange(len(order)), stacked.sizes))
    as32 = store.get_feature_rows(mid, "last_layer", order)
    assert as32.rows.dtype == np.float32 and np.array_equal(as32.rows, expected.astype(np.float32))

    sums = store.get_feature_sums(mid, "last_layer", order)
    assert np.array_equal(sums, np.stack([feats[s].sum(axis=0) for s in order]))
    means = store.get_feature_sums(mid, "last_layer", order, dtype="<f4", mean=True)
    assert means.dtype == np.float32
    assert np.array_equal(means, np.stack([feats[s].sum(axis=0) / len(feats[s]) for s in order]).astype(np.float32))
    # a 1-D stored array is one row
    assert np.array_equal(store.get_feature_rows(mid, "energy", sids, "<f8").rows[:, 0], [energy[s][0] for s in sids])
    assert all(np.array_equal(a, feats[s]) for a, s in zip(store.get_features(mid, "last_layer", order), order))

    for read in (store.get_feature_rows, store.get_feature_sums):
        with pytest.raises(KeyError, match="'invariant' features of model"):
            read(mid, "invariant", sids)
    assert len(store.get_feature_rows(mid, "last_layer", [])) == 0
    assert store.get_feature_sums(mid, "last_layer", []).shape == (0, 0)
    store.close()


def test_rows_of_different_widths_are_refused(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    _, mid, sids = _structures(store, 2)
    store.put_features(mid, {"last_layer": ({sids[0]: np.ones((2, 3)), sids[1]: np.ones((2, 4))}, "<f8")})
    with pytest.raises(ValueError, match="different widths"):
        store.get_feature_rows(mid, "last_layer", sids)
    with pytest.raises(ValueError, match="widths 3 and 4|widths 4 and 3"):
        store.get_feature_sums(mid, "last_layer", sids)


@pytest.mark.parametrize(
    ("offsets", "message"), [([1, 3], "starting at 0"), ([0, 2], "end at len"), ([0, 4, 3], "non-decreasing")]
)
def test_stacked_rows_check_their_offsets(offsets, message):
    with pytest.raises(ValueError, match=message):
        arrays.StackedRows(np.zeros((3, 2)), np.array(offsets))


def _in_memory_selection(name: str, url: str, campaign, candidates: list[int], budget: int):
    """What the selector picks from the old inputs: per-structure float64 arrays from
    ``get_features``, concatenated or summed in memory."""
    from alforge.config import SelectorConfig
    from alforge.tasks.hessian import ensure_hessian
    from alforge.tasks.select import _configured

    store = Store(url)
    mid = campaign.model_id
    per_atom = store.get_features(mid, "last_layer", candidates)
    if name == "dopt":
        train = store.get_features(mid, "last_layer", campaign.train_ids)
        numbers = lambda ids: np.concatenate([a.numbers for a in store.get_atoms(ids)])  # noqa: E731
        selector = _configured(SelectorConfig(name=name, batch_size=budget), 0, 1, None)
        return selector.select(
            np.concatenate(per_atom), budget, train=np.concatenate(train),
            groups=np.concatenate([np.full(len(f), k) for k, f in enumerate(per_atom)]),
            elements=numbers(candidates), train_elements=numbers(campaign.train_ids),
        )
    hessian = ensure_hessian(url, mid)
    selector = _configured(SelectorConfig(name=name, batch_size=budget), 0, 1, hessian)
    context = {"hessian": hessian}
    if name == "mig_label":
        context["label_rows"] = store.get_features(mid, "label_rows", candidates)
    return selector.select(np.stack([f.sum(axis=0) / len(f) for f in per_atom]), budget, **context)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """60 candidate cells of 8 atoms (two elements), d = 16, 6 training cells, stored label rows."""
    url = f"sqlite:///{tmp_path_factory.mktemp('stream') / 'store.db'}"
    return _bench().build_campaign(url, n_atoms=480, atoms_per_structure=8, dim=16, n_train=6, seed=3, chunk=16)


@pytest.mark.parametrize("name", ["mig", "mig_label", "dopt"])
def test_streamed_select_batch_picks_what_in_memory_selection_picks(name, campaign):
    from alforge.config import SelectorConfig, UncertaintyConfig
    from alforge.tasks.select import select_batch

    store = Store(campaign.url)
    it = store.get_or_create_iteration(campaign.campaign_id, 1 + ["mig", "mig_label", "dopt"].index(name))
    budget = 6
    result = select_batch.fn(
        campaign.url, campaign.campaign_id, it, campaign.model_id, SelectorConfig(name=name, batch_size=budget),
        "emt", "h", UncertaintyConfig(),
    )
    candidates = [int(i) for i in store.selection_for_iteration(it)["candidate_ids"]]
    assert candidates == campaign.candidate_ids
    reference = _in_memory_selection(name, campaign.url, campaign, candidates, budget)
    assert len(result["picked"]) == budget
    assert result["picked"] == [candidates[int(i)] for i in reference.indices]
    np.testing.assert_allclose(result["scores"], reference.scores, rtol=1e-4)
