"""Pool campaigns: a fixed candidate pool, the ``lookup`` labeller, energy-only test sets, the
learning curve, and resume after kill -9 — on rMD17 ethanol from shared/data, read in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml

from alforge.cli import main
from alforge.config import ConfigError, StructureSource, load_config
from alforge.labelling import FailureClass, LabelFailure, RetryPolicy, label_with_policy, make_labeller
from alforge.storage import Store
from alforge.storage import models as orm
from conftest import TESTS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ethanol_rmd17_botnet"
TRAIN, TEST = DATA / "train.xyz", DATA / "test_MD.xyz"

pytestmark = pytest.mark.skipif(not TRAIN.exists(), reason=f"{TRAIN} not present")


def _energy_only(tmp_path: Path, frames: str = "5:8") -> Path:
    """Test structures with an energy and no forces (written to tmp; the shared data is read-only)."""
    out = tmp_path / "energy_only.xyz"
    atoms = []
    for a in ase.io.read(TEST, frames):
        b = a.copy()
        b.info["ref_energy"] = a.get_potential_energy()
        atoms.append(b)
    ase.io.write(out, atoms, format="extxyz")
    return out


def test_lookup_returns_file_labels_and_fails_cleanly(tmp_path):
    lab = make_labeller("lookup", files=[str(TRAIN)])
    frame = ase.io.read(TRAIN, 7)
    got = lab.label(frame.copy())
    assert got.energy == frame.get_potential_energy()
    assert np.array_equal(got.forces, frame.get_forces())
    assert got.metadata["frame"] == 7 and got.metadata["file"].endswith("train.xyz")
    assert lab.provenance()["code"] == "lookup"

    moved = frame.copy()
    moved.positions[0, 0] += 1e-3
    with pytest.raises(LabelFailure) as exc:
        lab.label(moved)
    assert exc.value.failure_class is FailureClass.NO_LABEL
    assert "in none of train.xyz" in exc.value.message
    # the policy never retries it and quarantines at once: it will never have a label
    label, attempts = label_with_policy(lambda **kw: make_labeller("lookup", **kw), moved,
                                        RetryPolicy.for_labeller("lookup"), {"files": [str(TRAIN)]})
    assert label is None and [a.decision for a in attempts] == ["quarantine"]

    # configurable keys: energy under info['ref_energy'], no forces → a clean NO_LABEL too
    eo = _energy_only(tmp_path)
    first = ase.io.read(eo, 0)
    with pytest.raises(LabelFailure, match="no forces under 'forces'") as exc:
        make_labeller("lookup", files=[str(eo)], energy_key="ref_energy").label(first)
    assert exc.value.failure_class is FailureClass.NO_LABEL


def _pool_campaign(tmp_path: Path, **overrides) -> Path:
    cfg = {
        "name": "pool",
        "seed": 0,
        "seeds": [{"file": str(TRAIN), "index": "0:4"}],
        "test": [{"file": str(TEST), "index": "0:4"},
                 {"file": str(_energy_only(tmp_path)), "energy_key": "ref_energy"}],
        "mlip": {"num_channels": 8, "max_L": 0, "num_interactions": 1, "max_epochs": 4,
                 "finetune_epochs": 2, "mlp_irreps": "8x0e", "batch_size": 4, "r_max": 4.0},
        "exploration": {"pool": [{"file": str(TRAIN), "index": "2:26"}]},  # overlaps two seeds
        "selector": {"name": "random", "batch_size": 4},
        "labeller": {"name": "lookup"},
        "stopping": {"max_iterations": 2},
    }
    cfg.update(overrides)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_pool_config(tmp_path):
    cfg = load_config(_pool_campaign(tmp_path))
    assert cfg.exploration.walkers == 0  # a pool and no walkers setting: no MD
    assert cfg.labeller.kwargs["files"] == [str(TRAIN)]  # lookup defaults to the pool's files
    both = load_config(_pool_campaign(tmp_path, exploration={"pool": [{"file": str(TRAIN)}], "walkers": 2}))
    assert both.exploration.walkers == 2
    with pytest.raises(ConfigError, match="walkers: 0 needs a 'pool'"):
        load_config(_pool_campaign(tmp_path, exploration={"walkers": 0}))
    with pytest.raises(ConfigError, match="lookup' needs kwargs.files"):
        load_config(_pool_campaign(tmp_path, exploration={"walkers": 2}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(_pool_campaign(tmp_path, exploration={"pool": [{"file": "nope.xyz"}]}))


def test_pool_ingest_is_chunked_and_once(tmp_path, monkeypatch):
    from alforge.tasks import ingest

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    cid = store.get_or_create_campaign("p", {})
    src = StructureSource(file=TRAIN, index="3:40:3")
    n = ingest.ingest_pool.fn(url, cid, [src], str(tmp_path), chunk_size=5)
    assert n == len(range(3, 40, 3)) == 13
    with store.session() as s:
        rows = s.query(orm.Structure).order_by(orm.Structure.id).all()
    prov = [json.loads(r.provenance_json) for r in rows]
    assert [p["frame"] for p in prov] == list(range(3, 40, 3)) and {r.source for r in rows} == {"pool"}
    (a,) = store.get_atoms([rows[1].id])  # labels are stripped: the pool is unlabelled
    assert a.calc is None and "energy" not in a.info and "forces" not in a.arrays
    assert np.allclose(a.positions, ase.io.read(TRAIN, 6).positions, atol=0)

    def boom(*args, **kwargs):
        raise AssertionError("a wholly ingested pool is read again")

    monkeypatch.setattr(ingest, "iter_source_chunks", boom)
    assert ingest.ingest_pool.fn(url, cid, [src], str(tmp_path)) == 13
    monkeypatch.undo()
    for marker in (tmp_path / "pool").iterdir():  # without the marker: read again, nothing re-added
        marker.unlink()
    assert ingest.ingest_pool.fn(url, cid, [src], str(tmp_path), chunk_size=4) == 13
    assert store.count_structures(cid) == 13


def _state(url: str) -> dict:
    try:
        store = Store(url)
        cid = store.campaign_id("pool")
        sids = store.structure_ids(cid)
        return {
            "models": {m.id: (m.path, Path(m.path).stat().st_mtime_ns) for m in store.models(cid)},
            "labels": {l.structure_id: l.finished_at for l in store.labels(sids) if l.status == "done"},
            "structures": sids,
        }
    except Exception:
        return {"models": {}, "labels": {}, "structures": []}


@pytest.mark.slow
def test_pool_campaign_lookup_kill_resume_learning_curve(tmp_path, capsys):
    path = _pool_campaign(tmp_path)
    url = load_config(path).store
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "alforge.cli", "run", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:  # kill -9 once model 1 is stored: mid-iteration 1 or early in iteration 2
        while time.time() < deadline and not _state(url)["models"]:
            assert proc.poll() is None, "campaign ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _state(url)
    assert len(before["models"]) == 1, "the kill must land before model 2"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = _state(url)
    # nothing recomputed: model 1, every finished label and every structure as they were
    assert {k: after["models"][k] for k in before["models"]} == before["models"]
    assert {k: after["labels"][k] for k in before["labels"]} == before["labels"]
    assert after["structures"][: len(before["structures"])] == before["structures"]

    store = Store(url)
    cid = store.campaign_id("pool")
    pool = store.structure_ids(cid, role="candidate")
    assert len(pool) == 24 - 2  # frames 2, 3 are seeds already; no MD, nothing ingested twice
    it1, it2 = store.iterations(cid)
    sel = store.selection_for_iteration(it1.id)
    assert sorted(sel["candidate_ids"]) == pool and len(sel["picked_ids"]) == 4
    # picked pool structures carry the file's own labels, looked up by hash
    ref = {i: a for i, a in enumerate(ase.io.read(TRAIN, ":26"))}
    for atoms in store.get_labelled_atoms([int(i) for i in sel["picked_ids"]]):
        with store.session() as s:
            frame = json.loads(s.get(orm.Structure, atoms.info["alforge_id"]).provenance_json)["frame"]
        assert atoms.get_potential_energy() == ref[frame].get_potential_energy()
        assert np.array_equal(atoms.get_forces(), ref[frame].get_forces())
        assert atoms.info["label_calculator"] == "lookup"
    # the energy-only test structures were accepted and are evaluated: energy over all 7, forces over 4
    assert len(store.labelled_ids(cid, role="test")) == 7
    curve = store.learning_curve(cid)
    assert [(p["iteration"], p["n_labels"], p["n_test"]) for p in curve] == [(1, 4, 7), (2, 8, 7)]
    for p in curve:
        assert np.isfinite(p["test_energy_rmse_per_atom"]) and np.isfinite(p["test_forces_rmse"])
    from alforge.mlip.mace_model import evaluate

    test_atoms = store.get_labelled_atoms(store.labelled_ids(cid, role="test"))
    with_forces = [a for a in test_atoms if "forces" in a.calc.results]
    assert len(with_forces) == 4
    model = Path(store.models(cid)[-1].path)
    full, part = evaluate(model, test_atoms, device="cpu"), evaluate(model, with_forces, device="cpu")
    assert full["n_structures"] == 7 and full["forces_rmse"] == pytest.approx(part["forces_rmse"], rel=1e-9)
    assert full["energy_rmse_per_atom"] != pytest.approx(part["energy_rmse_per_atom"], rel=1e-9)
    assert curve[-1]["test_forces_rmse"] == pytest.approx(full["forces_rmse"], rel=1e-6)
    assert main(["status", "--config", str(path)]) == 0
    assert "learning curve" in capsys.readouterr().out
    assert main(["status", "--config", str(path), "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert status["learning_curve"] == json.loads(json.dumps(curve))
