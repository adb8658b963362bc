"""Settings that would fail only after DFT work are refused when the campaign file is read, before
any store exists: non-finite numbers, unparseable irreps, absent devices, unknown calculator kwargs,
duplicate YAML keys, unsafe file names, and bad structures in input files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from alforge.cli import main
from alforge.config import ConfigError, StructureSource, load_config
from alforge.labelling.external import ExternalLabeller
from alforge.sources import SourceError
from alforge.storage import Store
from alforge.tasks.ingest import ingest_pool, ingest_sources
from conftest import tiny_campaign

NAN, INF = float("nan"), float("inf")


def _error(path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    "override, field",
    [
        ({"exploration": {"temperatures": [300.0, NAN]}}, "exploration.temperatures.1"),
        ({"exploration": {"timestep_fs": INF}}, "exploration.timestep_fs"),
        ({"mlip": {"lr": INF}}, "mlip.lr"),
        ({"mlip": {"r_max": INF}}, "mlip.r_max"),
        ({"uncertainty": {"regularizer": INF}}, "uncertainty.regularizer"),
        ({"stopping": {"min_score": NAN}}, "stopping.min_score"),
        ({"labeller": {"max_force": -INF}}, "labeller.max_force"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, override, field):
    message = _error(tiny_campaign(tmp_path, **override))
    assert f"  {field}: Input should be a finite number" in message


def test_non_finite_numbers_in_free_form_kwargs(tmp_path):
    message = _error(tiny_campaign(tmp_path, labeller={"name": "lj", "kwargs": {"sigma": NAN}}))
    assert "labeller.kwargs" in message and "kwargs.sigma = nan" in message
    message = _error(tiny_campaign(tmp_path, selector={"name": "random", "params": {"weights": [1.0, INF]}}))
    assert "selector.params" in message and "params.weights.1 = inf" in message


@pytest.mark.parametrize("irreps", ["garbage", "16x1o", "8x0e+8x0o", "0x0e", ""])
def test_mlp_irreps_are_parsed(tmp_path, irreps):
    message = _error(tiny_campaign(tmp_path, mlip={"mlp_irreps": irreps}))
    assert "  mlip.mlp_irreps:" in message
    assert "Nx0e" in message or "e3nn irreps" in message


def test_devices_must_exist(tmp_path):
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = _error(tiny_campaign(tmp_path, mlip={"device": f"cuda:{n_gpu + 98}"}))
    assert "  mlip.device:" in message and "is not available" in message
    assert "  mlip.device:" in _error(tiny_campaign(tmp_path, mlip={"device": "tpu"}))
    for device in ("auto", "cpu"):
        assert load_config(tiny_campaign(tmp_path, mlip={"device": device})).mlip.device == device
    # Read-only commands may run on a login node without the campaign's GPU.
    far = tiny_campaign(tmp_path, mlip={"device": f"cuda:{n_gpu + 98}"})
    assert load_config(far, check_device=False).mlip.device == f"cuda:{n_gpu + 98}"


def test_unknown_ase_calculator_kwargs_name_the_accepted_ones(tmp_path):
    message = _error(tiny_campaign(tmp_path, labeller={"name": "emt", "kwargs": {"asap_cutof": True}}))
    assert "unknown kwarg(s) asap_cutof" in message and "asap_cutoff" in message
    message = _error(tiny_campaign(tmp_path, labeller={"name": "lj", "kwargs": {"sigmaa": 2.0}}))
    assert "sigmaa" in message and "sigma" in message and "epsilon" in message
    cfg = load_config(tiny_campaign(tmp_path, labeller={"name": "lj", "kwargs": {"sigma": 2.0, "rc": 5.0}}))
    assert cfg.labeller.kwargs == {"sigma": 2.0, "rc": 5.0}


def test_duplicate_yaml_keys_name_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nseeds:\n  - generate: {element: Cu}\nmlip:\n  lr: 0.01\n  r_max: 4.0\n  lr: 0.1\n")
    message = _error(path)
    assert "key(s) given twice: mlip.lr (line 5 and line 7)" in message
    path.write_text("name: a\nseeds:\n  - generate: {element: Cu, count: 2, count: 3}\nname: b\n")
    assert "seeds.0.generate.count (line 3 and line 3); name (line 1 and line 4)" in _error(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "name: a\nseeds:\n  - generate: &cu {element: Cu, count: 3}\n"
        "test:\n  - generate:\n      <<: *cu\n      count: 2\n"
    )
    assert load_config(path).test[0].generate.count == 2


@pytest.mark.parametrize("field", ["input_file", "stdout_file", "output_file", "name"])
@pytest.mark.parametrize("bad", [".", "..", "/etc/passwd", "sub/file", "a\\b"])
def test_external_labeller_refuses_unsafe_names(field, bad):
    with pytest.raises(ValueError, match="must"):
        ExternalLabeller(["true"], output_format="extxyz", input_format="extxyz", **{field: bad})


def test_external_labeller_in_a_campaign_file(tmp_path):
    kwargs = {"command": ["true"], "output_format": "extxyz", "input_format": "extxyz", "output_file": ".."}
    message = _error(tiny_campaign(tmp_path, labeller={"name": "external", "kwargs": kwargs}))
    assert "output_file '..' must be a plain file name" in message


def test_bad_settings_fail_before_any_store_exists(tmp_path, capsys):
    path = tiny_campaign(tmp_path, exploration={"temperatures": [NAN]})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "exploration.temperatures.0" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ structures in input files
def _labelled(n: int, bad_frame: int | None = None) -> list[Atoms]:
    frames = []
    for i in range(n):
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3 + 0.01 * i, 1.3, 0]], cell=[3.6] * 3, pbc=True)
        if i == bad_frame:
            atoms.positions[1, 0] = math.nan
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 * i, forces=np.zeros((2, 3)))
        frames.append(atoms)
    return frames


def test_ingest_checks_every_source_before_writing(tmp_path):
    write(tmp_path / "good.extxyz", _labelled(3))
    write(tmp_path / "bad.extxyz", _labelled(3, bad_frame=2))
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    cid = store.get_or_create_campaign("c", {})
    sources = [StructureSource(file=tmp_path / "good.extxyz"), StructureSource(file=tmp_path / "bad.extxyz")]
    with pytest.raises(SourceError, match=r"bad.extxyz frame 2: positions or cell are not finite"):
        ingest_sources.fn(store.url, cid, sources, "seed", None, None)
    assert store.count_structures(cid, role="seed") == 0
    with pytest.raises(SourceError, match=r"bad.extxyz frame 2"):
        ingest_pool.fn(store.url, cid, sources, str(tmp_path / "work"), chunk_size=2)
    assert store.count_structures(cid, role="candidate") == 0
    assert not (tmp_path / "work" / "pool").exists()


def test_import_of_a_bad_file_creates_no_store(tmp_path, capsys):
    empty = Atoms("Cu", positions=[[0, 0, 0]], cell=[0, 0, 0], pbc=True)
    empty.calc = SinglePointCalculator(empty, energy=0.0, forces=np.zeros((1, 3)))
    write(tmp_path / "flat.extxyz", [*_labelled(2), empty])
    db = tmp_path / "s.db"
    code = main(["import", str(tmp_path / "flat.extxyz"), "--store", f"sqlite:///{db}", "--campaign", "c"])
    assert code == 2
    assert "flat.extxyz frame 2: periodic along axis [0, 1, 2]" in capsys.readouterr().err
    assert not db.exists()
