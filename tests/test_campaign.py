"""The campaign loop end to end on a tiny Cu/EMT campaign, the CLI on its store, and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from mace.calculators import MACECalculator

from alforge.cli import main
from alforge.config import load_config
from alforge.mlip.mace_model import load_calculator
from alforge.storage import Store
from alforge.storage import models as orm
from alforge.structure_hash import canonical_hash
from conftest import TESTS, tiny_campaign

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_campaign(tmp_path_factory, prefect_harness):
    from alforge.flows.campaign import campaign

    tmp = tmp_path_factory.mktemp("campaign")
    path = tiny_campaign(tmp)
    result = campaign(str(path))
    return path, result


def test_campaign_stores_every_step(finished_campaign):
    path, result = finished_campaign
    cfg = load_config(path)
    store = Store(cfg.store)
    cid = store.campaign_id("tiny")
    assert [s["selected"] for s in result["iterations"]] == [3, 0]
    assert result["stop_reason"] == "reached max_iterations = 2"
    models = store.models(cid)
    assert [m.iteration_index for m in models] == [1, 2]
    # model 2 was trained on the seeds plus exactly the structures selected in iteration 1
    it1 = store.iterations(cid)[0]
    sel = store.selection_for_iteration(it1.id)
    seeds = store.labelled_ids(cid, role="seed")
    assert sorted(models[1].train_ids) == sorted(seeds + list(sel["picked_ids"]))
    assert sorted(models[0].train_ids) == sorted(seeds)
    assert set(sel["picked_ids"]) <= set(sel["candidate_ids"])
    assert np.all(np.diff(sel["scores"]) <= 1e-12), "greedy MIG scores never increase"
    candidates = store.structure_ids(cid, role="candidate", iteration_id=it1.id)
    assert len(candidates) == len(sel["candidate_ids"]) > 0
    # features of every candidate and training structure under model 1, keyed by (structure, model)
    assert store.missing_features(models[0].id, "last_layer", candidates + seeds) == []
    assert store.missing_features(models[0].id, "invariant", candidates) == []
    for m in models:
        assert {"train_forces_rmse", "test_forces_rmse", "test_energy_rmse_per_atom"} <= set(m.metrics)
        calc = load_calculator(Path(m.path), device="cpu")
        atoms = store.get_atoms(seeds[:1])[0]
        atoms.calc = calc
        assert np.isfinite(atoms.get_potential_energy())
    assert store.label_counts(cid) == {"done": 6 + 4 + 3}
    # MD provenance: walker, step, temperature and the model that drove it
    (frame,) = store.get_atoms(candidates[:1])
    with store.session() as s:
        prov = s.get(orm.Structure, candidates[0])
    assert "walker" in prov.provenance_json and prov.parent_id in seeds
    assert frame.info["md_step"] % 3 == 0


def test_rerun_of_a_finished_campaign_recomputes_nothing(finished_campaign, prefect_harness):
    from alforge.flows.campaign import campaign

    path, _ = finished_campaign
    store = Store(load_config(path).store)
    cid = store.campaign_id("tiny")
    before = {m.id: Path(m.path).stat().st_mtime_ns for m in store.models(cid)}
    labels_before = {l.id: l.finished_at for l in store.labels(store.structure_ids(cid))}
    campaign(str(path))
    assert {m.id: Path(m.path).stat().st_mtime_ns for m in store.models(cid)} == before
    assert {l.id: l.finished_at for l in store.labels(store.structure_ids(cid))} == labels_before


def test_status_and_export(finished_campaign, tmp_path, capsys, monkeypatch):
    path, _ = finished_campaign
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "campaign tiny  [finished]" in out
    assert "6 seed" in out and "13 done" in out
    out_file, model_file = tmp_path / "train.extxyz", tmp_path / "latest.model"
    assert main(["export", "--config", str(path), "--out", str(out_file), "--model", str(model_file)]) == 0
    frames = ase.io.read(out_file, ":")
    assert len(frames) == 6 + 3
    store = Store(load_config(path).store)
    cid = store.campaign_id("tiny")
    ids = store.labelled_ids(cid, role="seed") + store.labelled_ids(cid, role="candidate")
    stored = {canonical_hash(a): a for a in store.get_labelled_atoms(ids)}
    for frame in frames:
        ref = stored[canonical_hash(frame)]
        assert frame.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-9)
        assert np.allclose(frame.get_forces(), ref.get_forces(), atol=1e-9)
    # the exported file is the latest model in mace's format: it predicts exactly what the stored one
    # does. mace unpickles it relying on the flag its import sets and alforge removes again.
    probe = frames[0].copy()
    probe.calc = load_calculator(Path(store.models(cid)[-1].path), device="cpu")
    energies = [probe.get_potential_energy()]
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    probe.calc = MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float64")
    energies.append(probe.get_potential_energy())
    assert energies[0] == energies[1]


def test_import_labelled_dataset_as_seeds(tmp_path, prefect_harness):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "si_gap18" / "Si_tiny.xyz"
    if not data.exists():
        pytest.skip(f"{data} not present")
    url = f"sqlite:///{tmp_path / 'import.db'}"
    args = ["import", str(data), "--store", url, "--campaign", "si", "--index", "0:10",
            "--energy-key", "dft_energy", "--forces-key", "dft_force"]
    assert main(args) == 0
    assert main(args) == 0  # dedup: a second import adds nothing
    store = Store(url)
    cid = store.campaign_id("si")
    ids = store.labelled_ids(cid, role="seed")
    assert len(ids) == 10
    ref = ase.io.read(data, "0:10")
    got = store.get_labelled_atoms(ids)
    assert sorted(a.get_potential_energy() for a in got) == pytest.approx(sorted(r.info["dft_energy"] for r in ref))
    assert main(["import", str(data), "--store", url, "--campaign", "si", "--index", "0:3"]) == 2  # wrong keys


def _done_labels(url: str) -> dict[int, tuple]:
    store = Store(url)
    try:
        return {l.structure_id: (l.finished_at, l.energy) for l in store.labels(store.structure_ids(1)) if l.status == "done"}
    except Exception:
        return {}


def test_sigkill_while_labelling_then_resume(tmp_path):
    """Kill -9 mid-labelling; the re-run recomputes no finished label and leaves none missing."""
    log = tmp_path / "calls.log"
    path = tiny_campaign(
        tmp_path,
        labeller={"name": "slow_emt:make", "kwargs": {"delay": 0.7, "log": str(log)}},
        stopping={"max_iterations": 1},
    )
    url = load_config(path).store
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "alforge.cli", "run", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(_done_labels(url)) < 3:
            assert proc.poll() is None, "campaign ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _done_labels(url)
    assert 3 <= len(done_before) < 10, "the kill must land mid-labelling"
    killed_pid = proc.pid

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    done_after = _done_labels(url)
    assert len(done_after) == 6 + 4, "every seed and test structure ends up labelled"
    for sid, record in done_before.items():
        assert done_after[sid] == record, f"finished label of structure {sid} was rewritten"
    store = Store(url)
    hashes = {a.info["alforge_id"]: canonical_hash(a) for a in store.get_atoms(list(done_after))}
    second_run = [h for pid, h in (line.split() for line in log.read_text().splitlines()) if int(pid) != killed_pid]
    recomputed = {sid for sid, h in hashes.items() if h in second_run and sid in done_before}
    assert not recomputed, f"finished labels recomputed after resume: {recomputed}"
    assert set(second_run) == {h for sid, h in hashes.items() if sid not in done_before}
