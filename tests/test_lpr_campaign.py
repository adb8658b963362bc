"""LPR-driven local active learning end to end (METHODS §5): exploration runs 108/216-atom Cu cells,
the `lpr` selector carves periodic structures around their least rigid atoms, EMT labels them, their
provenance is stored, and the next model's LPR of the carved environment rises."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from alforge.config import ConfigError, ExplorationConfig, load_config
from alforge.exploration.md import MDSettings, repeated, run_walker
from conftest import tiny_campaign

SETTINGS = MDSettings(temperature_K=300.0, timestep_fs=2.0, steps=4, frame_interval=2, friction_per_fs=0.01,
                      min_distance=1.5, max_energy_change=1.0)


def test_md_runs_a_500_atom_supercell():
    start = bulk("Cu", "fcc", 3.61, cubic=True)
    big = repeated(start, (5, 5, 5))
    assert len(big) == 500 and np.allclose(big.cell.lengths(), 5 * 3.61)
    traj = run_walker(big, EMT(), SETTINGS, seed=0, provenance={"walker": 0, "supercell": [5, 5, 5]})
    assert traj.stop_reason is None and len(traj.frames) == 2
    assert all(len(f) == 500 and f.info["supercell"] == [5, 5, 5] for f in traj.frames)
    cluster = start.copy()
    cluster.pbc = False
    assert len(repeated(cluster, (2, 2, 2))) == 4, "a non-periodic start is not repeated"
    assert repeated(start, None) is start


def test_supercell_setting_is_checked(tmp_path):
    assert ExplorationConfig(supercell=[2, 3, 4]).supercell == (2, 3, 4)
    with pytest.raises(ConfigError) as err:
        load_config(tiny_campaign(tmp_path, exploration={"supercell": [2, 0, 2]}))
    assert "exploration.supercell" in str(err.value)


@pytest.mark.slow
def test_lpr_campaign_carves_labels_and_stiffens(tmp_path, prefect_harness, monkeypatch):
    from alforge.flows.campaign import campaign
    from alforge.mlip.features import compute_features
    from alforge.storage import Store
    from alforge.tasks.featurize import LAST_LAYER, ensure_features, ensure_label_rows
    from alforge.tasks.hessian import ensure_hessian
    from alforge.uncertainty import lpr_enhancement
    from alforge.uncertainty.rigidity import local_prediction_rigidity

    params = {"strategy": "periodic", "k": 2, "copies": 2, "cutoff": 3.0, "buffer": 0.5, "max_atoms": 64}
    path = tiny_campaign(
        tmp_path,
        name="lpr-carve",
        mlip={"r_max": 3.0, "max_epochs": 3, "finetune_epochs": 2},
        exploration={"walkers": 1, "temperatures": [300], "steps": 6, "frame_interval": 3, "supercell": [3, 3, 3]},
        selector={"name": "lpr", "batch_size": 4, "params": params},
    )
    result = campaign(str(path))
    assert not result["paused"]
    cfg = load_config(path)
    url = cfg.store
    store = Store(url)
    cid = store.campaign_id("lpr-carve")
    it1, _ = store.iterations(cid)
    m1, m2 = store.models(cid)
    sel = store.selection_for_iteration(it1.id)
    assert sel["selector"] == "lpr" and sel["params"]["strategy"] == "periodic"
    frames = [int(i) for i in sel["candidate_ids"]]
    assert all(len(a) >= 108 for a in store.get_atoms(frames)), "exploration ran the 3×3×3 supercells"
    carving = sel["info"]["carving"]
    # k = 2, but near-perfect fcc atoms may all be one environment under H⁻¹ (deduplicated)
    assert 1 <= len(carving["centres"]) <= 2 and carving["discarded"] == 0
    picked = [int(i) for i in sel["picked_ids"]]
    assert len(picked) == 2 * len(carving["centres"]), "two periodic copies per centre"
    assert not set(picked) & set(frames), "the carved structures are the picks"
    assert set(picked) <= set(store.labelled_ids(cid, role="candidate")), "they were labelled"
    assert set(picked) <= set(m2.train_ids), "and trained on"
    records = {r["id"]: r for r in store.structure_records(cid, role="candidate")}
    for centre in carving["centres"]:
        for sid in centre["ids"]:
            rec = records[sid]
            assert rec["source"] == "embedding" and rec["parent_id"] == centre["parent_id"]
            assert rec["provenance"]["strategy"] == "periodic"
            assert rec["provenance"]["parent_center"] == centre["atom"]
            assert len(store.get_atoms([sid])[0]) < len(store.get_atoms([centre["parent_id"]])[0])

    # model 1: the carved structures' label rows raise the centres' LPR (no labels needed)
    h1 = ensure_hessian(url, m1.id, form="loss")
    h2 = ensure_hessian(url, m2.id, form="loss")
    for centre in carving["centres"]:
        parent, atom = centre["parent_id"], centre["atom"]
        before = store.get_features(m1.id, LAST_LAYER, [parent])[0][atom]
        assert local_prediction_rigidity(h1, before[None])[0] == pytest.approx(centre["lpr"], rel=1e-9)
        rows = ensure_label_rows(url, m1.id, centre["ids"], h1.weights)
        assert lpr_enhancement(h1, rows, before) > 0
        # the next model, trained on their labels: the environment is more rigid
        ensure_features(url, m2.id, [parent])
        after = store.get_features(m2.id, LAST_LAYER, [parent])[0][atom]
        assert local_prediction_rigidity(h2, after[None])[0] > centre["lpr"]

    # the model's features of a 500-atom cell
    (feats,) = compute_features(store.model_file(m2.id), [bulk("Cu", "fcc", 3.61, cubic=True).repeat((5, 5, 5))])
    assert feats.last_layer.shape == (500, h2.dim) and np.all(np.isfinite(feats.last_layer))

    # a select step interrupted after carving, before its selection was stored, carves nothing new
    from alforge.tasks.label import labeller_identity
    from alforge.tasks.select import select_batch

    it3 = store.get_or_create_iteration(cid, 3)
    cell = bulk("Cu", "fcc", 3.61, cubic=True).repeat((3, 3, 3))
    cell.rattle(0.1, seed=4)
    store.add_structures(cid, [cell], role="candidate", source="md", iteration_id=it3)
    ensure_features(url, m2.id, store.candidate_pool_ids(cid, it3))
    args = (url, cid, it3, m2.id, cfg.selector, *labeller_identity(cfg.labeller), cfg.uncertainty, cfg.seed)

    def crash(*_, **__):
        raise RuntimeError("killed before the selection was stored")

    with monkeypatch.context() as patched:
        patched.setattr(Store, "add_selection", crash)
        with pytest.raises(RuntimeError, match="killed"):
            select_batch.fn(*args)
    count = store.count_structures(cid, source="embedding")
    first = select_batch.fn(*args)
    assert store.count_structures(cid, source="embedding") == count, "the rerun carved the same structures"
    assert select_batch.fn(*args)["picked"] == first["picked"], "a stored selection is reused"
    assert first["n_candidates"] == 1
