"""The Python API (alforge.Campaign) on one tiny campaign made from a dict with pymatgen and ASE
seeds, run once for the module; `alforge --version`; errors for structure objects it cannot use."""

from __future__ import annotations

import json
import subprocess
import sys

import ase.io
import numpy as np
import pandas as pd
import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from pymatgen.core import Lattice, Structure

import alforge
from alforge.cli import main
from alforge.results import NoModelError
from alforge.sources import SourceError
from conftest import tiny_campaign

#: the ASE seed's label: EMT's energy, shifted, so a stored label equal to it came from the object
SHIFT = 0.0123


def _cu_structure() -> Structure:
    """A conventional fcc Cu cell as pymatgen builds it, lightly displaced (so it is no other seed)."""
    frac = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.51]]
    return Structure(Lattice.cubic(3.61), ["Cu"] * 4, frac)


def _labelled_atoms() -> tuple[Atoms, float]:
    atoms = bulk("Cu", a=3.62, cubic=True)
    atoms.rattle(0.04, seed=7)
    atoms.calc = EMT()
    energy = atoms.get_potential_energy() + SHIFT
    atoms.calc.results["energy"] = energy  # a label as a calculator leaves it
    return atoms, energy


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, prefect_harness):
    tmp = tmp_path_factory.mktemp("api")
    config = yaml.safe_load(tiny_campaign(tmp).read_text())
    atoms, energy = _labelled_atoms()
    config["name"] = "api-tiny"
    config["seeds"] = [_cu_structure(), atoms, {"generate": {**config["seeds"][0]["generate"], "count": 4}}]
    config["mlip"].update({"max_epochs": 4, "finetune_epochs": 2})
    config["test"][0]["generate"]["count"] = 3
    config["exploration"]["steps"] = 9
    config["stopping"]["max_iterations"] = 5  # the run's override wins: 2
    campaign = alforge.Campaign(config, directory=tmp / "notebook")
    result = campaign.run(overrides={"stopping.max_iterations": 2})
    return campaign, result, energy


@pytest.mark.slow
def test_dict_campaign_is_a_file_with_its_structures_beside_it(api_run):
    campaign, result, _ = api_run
    assert campaign.path.name == "api-tiny.yaml" and result["stop_reason"] == "reached max_iterations = 2"
    written = yaml.safe_load(campaign.path.read_text())
    assert written["seeds"][0] == {"file": "api-tiny.seeds.extxyz"} and "generate" in written["seeds"][1]
    frames = ase.io.read(campaign.path.parent / "api-tiny.seeds.extxyz", ":")
    assert len(frames) == 2 and frames[0].calc is None and frames[1].calc is not None
    again = alforge.Campaign.from_file(campaign.path)
    assert again.iterations().equals(campaign.iterations())


@pytest.mark.slow
def test_iterations_one_row_each_with_errors_and_diagnostics(api_run):
    campaign, _, _ = api_run
    df = campaign.iterations()
    assert list(df["iteration"]) == [1, 2]
    for column in ("n_train", "labels_done", "selected", "stop_reason", "train_forces_rmse", "valid_forces_rmse",
                   "test_forces_rmse", "test_energy_rmse_per_atom", "hessian.form", "calibration.alpha2"):
        assert column in df.columns, column
    assert list(df["selected"]) == [3, 0] and list(df["n_train"]) == [6, 9]
    assert df["stop_reason"].iloc[-1] == "reached max_iterations = 2" and pd.isna(df["stop_reason"].iloc[0])
    assert np.all(np.isfinite(df["test_forces_rmse"].astype(float)))


@pytest.mark.slow
def test_structures_carry_labels_and_provenance(api_run):
    campaign, _, energy = api_run
    seeds = campaign.structures(role="seed")
    assert len(seeds) == 6 and all(a.info["role"] == "seed" for a in seeds)
    assert {a.info["source"] for a in seeds} == {"file:api-tiny.seeds.extxyz", "generate:Cu"}
    assert all(a.calc is not None and a.get_forces().shape == (len(a), 3) for a in seeds)
    # the ASE seed kept its own label; the pymatgen one (no label) was labelled by EMT
    from_file = sorted((a for a in seeds if a.info["source"].startswith("file:")), key=lambda a: a.info["alforge_id"])
    assert [a.info["label_calculator"].startswith("import:") for a in from_file] == [False, True]
    assert from_file[1].get_potential_energy() == pytest.approx(energy, abs=1e-12)
    picked = campaign.structures(role="candidate", labelled=True)
    assert len(picked) == 3
    seed_ids = {a.info["alforge_id"] for a in seeds}
    for a in picked:
        assert a.info["iteration"] == 1 and "walker" in a.info["provenance"] and a.info["parent_id"] in seed_ids
    unpicked = campaign.structures(role="candidate", labelled=False)
    assert unpicked and all(a.calc is None for a in unpicked)
    assert {a.info["alforge_id"] for a in picked}.isdisjoint(a.info["alforge_id"] for a in unpicked)
    assert len(campaign.structures()) == 6 + 3 + len(picked) + len(unpicked)  # + the 3 test structures
    with pytest.raises(ValueError, match="role must be one of"):
        campaign.structures(role="seeds")


@pytest.mark.slow
def test_selections_name_the_picked_structures(api_run):
    campaign, _, _ = api_run
    sel = campaign.selections()
    assert list(sel["iteration"]) == [1] and sel["selector"].iloc[0] == "mig"
    picked = sel["picked_ids"].iloc[0]
    assert sorted(picked) == sorted(a.info["alforge_id"] for a in campaign.structures("candidate", labelled=True))
    assert len(sel["scores"].iloc[0]) == 3 and sel["candidates"].iloc[0] >= 3


@pytest.mark.slow
def test_model_is_a_calculator_and_export_writes_the_labelled_set(api_run, tmp_path):
    campaign, _, _ = api_run
    atoms = bulk("Cu", a=3.6, cubic=True)
    atoms.rattle(0.03, seed=1)
    for model in (campaign.model(), campaign.model(iteration=1)):
        atoms.calc = model
        assert np.isfinite(atoms.get_potential_energy()) and atoms.get_forces().shape == (4, 3)
    with pytest.raises(NoModelError, match="no model of iteration 7"):
        campaign.model(iteration=7)
    out = campaign.export(tmp_path / "train.extxyz", model=tmp_path / "latest.model")
    assert len(ase.io.read(out, ":")) == 6 + 3 and (tmp_path / "latest.model").stat().st_size > 0


@pytest.mark.slow
def test_status_is_the_status_json_of_the_cli(api_run, capsys):
    campaign, _, _ = api_run
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(campaign.path)]) == 0
    (cli,) = json.loads(capsys.readouterr().out)
    status = campaign.status()
    assert json.loads(json.dumps(status)) == cli and status["status"] == "finished"
    assert len(status["learning_curve"]) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"alforge {alforge.__version__} (torch ") and "mace-torch" in line and "prefect" in line


def test_import_alforge_is_light():
    code = "import sys, alforge; print(sorted(m for m in ('torch', 'prefect', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("section", "entries", "where", "kind"),
    [
        ("seeds", [bulk("Cu"), 3.5], "seeds.1", "float"),
        ("test", [[bulk("Cu"), "cu.xyz"]], "test.0.1", "str"),
        ("targets", [{"structures": [object()]}], "targets.0.structures.0", "object"),
    ],
)
def test_a_bad_structure_object_is_named_with_its_field_and_type(tmp_path, section, entries, where, kind):
    config = {"name": "bad", "seeds": [{"generate": {"element": "Cu"}}], section: entries}
    with pytest.raises(SourceError, match=rf"^{where}: expected ASE Atoms .* got {kind}$"):
        alforge.Campaign(config, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_labels_under_keys_of_their_own_and_molecules_reach_the_file(tmp_path):
    from pymatgen.core import Molecule

    from alforge.sources import read_source

    atoms = bulk("Cu", a=3.6, cubic=True)
    atoms.info["dft_energy"] = -1.25
    atoms.arrays["dft_forces"] = np.full((4, 3), 0.1)
    water = Molecule(["O", "H", "H"], [[0, 0, 0], [0.76, 0.59, 0], [-0.76, 0.59, 0]])
    config = {
        "name": "keys",
        "seeds": [{"structures": [atoms], "energy_key": "dft_energy", "forces_key": "dft_forces"}],
        "targets": water,
    }
    campaign = alforge.Campaign(config, directory=tmp_path)
    assert config["targets"] is water  # the caller's dict is left as it was
    (seeds,) = campaign.config.seeds
    _, (label,), _ = read_source(seeds)
    assert label.energy == -1.25 and np.allclose(label.forces, 0.1)
    (targets,) = campaign.config.targets
    (molecule,), (no_label,), _ = read_source(targets, require_forces=False)
    assert molecule.get_chemical_formula() == "H2O" and not molecule.pbc.any() and no_label is None
