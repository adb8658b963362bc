"""The `lpr` selector: picks equal a brute-force LPR ranking (explicit H⁻¹), one per environment."""

from __future__ import annotations

import numpy as np
import pytest

from alforge.config import ConfigError, load_config
from alforge.selectors import make_selector
from alforge.uncertainty.rigidity import Hessian
from conftest import tiny_campaign


def _brute_force(features, groups, H, budget, k, max_atoms, overlap, copies):
    """Rank rows by 1/(fᵀH⁻¹f) with an explicit inverse; skip a row whose ρ² with an earlier pick's
    row reaches ``overlap`` or whose (small) structure was already picked whole."""
    inverse = np.linalg.inv(H.matrix)
    lpr = np.array([1.0 / (f @ inverse @ f) for f in features])
    sizes = {g: int(np.sum(groups == g)) for g in np.unique(groups)}
    picked_rows, picked_whole, out, spent = [], set(), [], 0
    for row in np.argsort(lpr, kind="stable"):
        if len(out) == k:
            break
        g = groups[row]
        whole = sizes[g] <= max_atoms
        if g in picked_whole:
            continue
        f = features[row]
        if any((f @ inverse @ features[p]) ** 2 / ((f @ inverse @ f) * (features[p] @ inverse @ features[p]))
               >= overlap for p in picked_rows):
            continue
        cost = 1 if whole else copies
        if spent + cost > budget:
            continue
        atom = int(np.sum(groups[:row] == g))
        out.append((int(g), None if whole else atom, lpr[row]))
        picked_rows.append(row)
        spent += cost
        if whole:
            picked_whole.add(g)
    return out


def _as_triples(selection):
    centre_of = {c["pick"]: c["atom"] for c in selection.info["centres"]}
    return [(int(g), centre_of.get(k), s) for k, (g, s) in enumerate(zip(selection.indices, selection.scores))]


@pytest.mark.parametrize("overlap", [1.0, 0.3])
def test_picks_equal_brute_force_ranking(overlap):
    rng = np.random.default_rng(3)
    d = 5
    sizes = [3, 12, 2, 15, 9]  # structures with ≤ 4 atoms are picked whole
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    features = rng.normal(size=(len(groups), d)) * rng.uniform(0.2, 2.0, size=(len(groups), 1))
    H = Hessian(np.cov(rng.normal(size=(d, 40))) * 40 + 0.1 * np.eye(d), 0.3)
    selector = make_selector("lpr", k=6, max_atoms=4, overlap=overlap, copies=2)
    got = _as_triples(selector.select(features, 9, hessian=H, groups=groups))
    expected = _brute_force(features, groups, H, budget=9, k=6, max_atoms=4, overlap=overlap, copies=2)
    assert [(g, a) for g, a, _ in got] == [(g, a) for g, a, _ in expected]
    assert np.allclose([s for *_, s in got], [s for *_, s in expected], rtol=1e-10)
    assert len(got) >= 3 and any(a is None for _, a, _ in got) and any(a is not None for _, a, _ in got)
    scores = [s for *_, s in got]
    assert scores == sorted(scores), "ascending LPR"


def _hand_made():
    # structure 0: five atoms (large); 0 and 1 are one environment (nearly parallel rows)
    # structure 1: two atoms (small): picked whole, by its lowest atom
    features = np.array([
        [3.0, 0.0, 0.0],   # LPR 1/9: the least rigid atom
        [2.9, 0.3, 0.0],   # the same environment: ρ² ≈ 0.99, skipped
        [0.0, 0.0, 2.5],   # LPR 0.16: a second environment of structure 0
        [0.1, 0.1, 0.1],
        [0.0, 1.0, 0.0],   # parallel to structure 1's atom: covered by that pick
        [0.0, 2.8, 0.0],   # structure 1, LPR 1/7.84
        [0.1, 0.0, 0.0],
    ])
    groups = np.array([0, 0, 0, 0, 0, 1, 1])
    return features, groups, Hessian(np.eye(3), 1.0)


def test_one_pick_per_environment_hand_made():
    features, groups, H = _hand_made()
    sel = make_selector("lpr", k=3, max_atoms=2).select(features, 10, hessian=H, groups=groups)
    assert list(sel.indices) == [0, 1, 0]
    assert np.allclose(sel.scores, [1 / 9, 1 / 7.84, 1 / 6.25])
    assert sel.info["centres"] == [{"pick": 0, "atom": 0}, {"pick": 2, "atom": 2}]
    assert sel.info["whole"] == 1
    # without deduplication the neighbour of the first centre comes second
    plain = make_selector("lpr", k=3, max_atoms=2, overlap=1.0).select(features, 10, hessian=H, groups=groups)
    assert [c["atom"] for c in plain.info["centres"]][:2] == [0, 1]


def test_budget_counts_copies():
    features, groups, H = _hand_made()
    sel = make_selector("lpr", max_atoms=2, copies=3).select(features, 4, hessian=H, groups=groups)
    assert list(sel.indices) == [0, 1] and sel.info["labels_planned"] == 4
    hs = make_selector("lpr", max_atoms=2, copies=3, strategy="high_symmetry")
    sel = hs.select(features, 4, hessian=H, groups=groups)  # 3 copies + the pristine host
    assert list(sel.indices) == [0] and sel.info["labels_planned"] == 4


def test_informative_in_lpr_units():
    selector = make_selector("lpr")
    scores = np.array([0.5, 2.0, 10.0])
    assert selector.informative(scores, None) == 3 and selector.informative(scores, 0.0) == 3
    assert selector.informative(scores, 2.0) == 2  # LPR ≤ min_score


def test_needs_hessian_and_groups():
    features, groups, H = _hand_made()
    with pytest.raises(ValueError, match="hessian"):
        make_selector("lpr").select(features, 2, groups=groups)
    with pytest.raises(ValueError, match="groups"):
        make_selector("lpr").select(features, 2, hessian=H)


def test_campaign_file_refuses_a_bad_strategy(tmp_path):
    path = tiny_campaign(tmp_path, selector={"name": "lpr", "params": {"strategy": "spherical", "k": 4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "  selector" in message and "strategy" in message and "'spherical'" in message
    good = tiny_campaign(tmp_path, selector={"name": "lpr", "params": {"strategy": "periodic", "k": 4, "copies": 2}})
    assert load_config(good).selector.params["copies"] == 2


def test_carving_stores_provenance_and_is_repeatable(tmp_path):
    """The select step's carving (tasks/carve.py) on a hand-made selection: a centre of a 108-atom Cu
    cell (two periodic copies) and a whole pick; a second run maps to the same ids."""
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    from alforge.embedding.checks import bond_contact
    from alforge.selectors.base import Selection
    from alforge.storage import Store
    from alforge.tasks.carve import carve_centres, carved_in

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    cid = store.get_or_create_campaign("carve", {})
    it = store.get_or_create_iteration(cid, 1)
    large = bulk("Cu", "fcc", 3.61, cubic=True).repeat((3, 3, 3))
    large.rattle(0.05, seed=1)
    small = bulk("Cu", "fcc", 3.61, cubic=True)
    candidates = store.add_structures(cid, [small, large], role="candidate", source="md", iteration_id=it)
    selector = make_selector("lpr", strategy="periodic", copies=2, cutoff=2.6, buffer=1.0, max_atoms=8, seed=5)
    result = Selection(np.array([1, 0]), np.array([0.1, 0.2]), info={"centres": [{"pick": 0, "atom": 7}], "whole": 1})
    picked, scores, info = carve_centres(store, cid, it, None, candidates, result, selector)
    carved = [i for i in picked if i != candidates[0]]
    assert len(carved) == 2 and picked[2] == candidates[0], "pick order: the centre's copies, then the whole pick"
    assert list(scores) == [0.1, 0.1, 0.2]
    assert carved_in(store, cid, it) == set(carved)
    records = {r["id"]: r for r in store.structure_records(cid, role="candidate")}
    for sid, copy in zip(carved, [0, 1]):
        rec = records[sid]
        assert rec["source"] == "embedding" and rec["parent_id"] == candidates[1] and rec["iteration"] == 1
        prov = rec["provenance"]
        assert prov["strategy"] == "periodic" and prov["parent_center"] == 7 and prov["parent_id"] == candidates[1]
        assert prov["copy"] == copy and prov["lpr"] == 0.1
        assert prov["cutoff"] == 2.6 and prov["buffer"] == 1.0 and prov["center"] == 0
        # no contact given: 0.85 of the Cu-Cu covalent bond, held across the periodic boundary too
        assert bond_contact(large) == pytest.approx(0.85 * 2 * 1.32)
        assert prov["parameters"]["contact"] == pytest.approx(bond_contact(large))
        (atoms,) = store.get_atoms([sid])
        assert len(atoms) < len(large) and atoms.pbc.all()
        assert neighbor_list("d", atoms, prov["parameters"]["contact"]).size == 0
    centres = info["carving"]["centres"]
    assert centres == [{"parent_id": candidates[1], "atom": 7, "lpr": 0.1, "ids": carved, "discarded": 0}]
    assert info["carving"]["discarded"] == 0 and info["whole"] == 1
    again, _, _ = carve_centres(store, cid, it, None, candidates, result, selector)
    assert again == picked and store.count_structures(cid) == 4, "a rerun carves the same structures"


def test_carving_counts_discarded_structures(tmp_path):
    """A contact distance no structure can meet: every copy is discarded and counted."""
    from ase.build import bulk

    from alforge.selectors.base import Selection
    from alforge.storage import Store
    from alforge.tasks.carve import carve_centres

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    cid = store.get_or_create_campaign("carve", {})
    it = store.get_or_create_iteration(cid, 1)
    large = bulk("Cu", "fcc", 3.61, cubic=True).repeat((3, 3, 3))
    (pid,) = store.add_structures(cid, [large], role="candidate", source="md", iteration_id=it)
    selector = make_selector("lpr", copies=2, cutoff=2.6, buffer=1.0, contact=3.0)
    result = Selection(np.array([0]), np.array([0.1]), info={"centres": [{"pick": 0, "atom": 3}]})
    picked, scores, info = carve_centres(store, cid, it, None, [pid], result, selector)
    assert picked == [] and len(scores) == 0
    assert info["carving"]["discarded"] == 2 and info["carving"]["centres"][0]["ids"] == []
