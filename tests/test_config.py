"""Campaign files: invalid ones fail before any work, naming the file and the field."""

from __future__ import annotations

import pytest
import yaml

from alforge.config import ConfigError, load_config
from conftest import tiny_campaign


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_valid_file_resolves_defaults(tmp_path):
    cfg = load_config(tiny_campaign(tmp_path))
    assert cfg.store == f"sqlite:///{tmp_path.resolve() / 'tiny.db'}"
    assert cfg.workdir == (tmp_path / "runs" / "tiny").resolve()
    assert cfg.mlip.num_channels == 8 and cfg.selector.name == "mig"


@pytest.mark.parametrize(
    "override, field, expected",
    [
        ({"selector": {"batch_size": 0}}, "selector.batch_size", "greater than or equal to 1"),
        ({"selector": {"name": "nope"}}, "selector", "unknown selector 'nope'"),
        ({"mlip": {"r_max": -1}}, "mlip.r_max", "greater than 0"),
        ({"mlip": {"num_chanels": 8}}, "mlip.num_chanels", "Extra inputs are not permitted"),
        ({"exploration": {"temperatures": [300, -5]}}, "exploration.temperatures", "must be > 0 K"),
        ({"labeller": {"name": "nosuchmodule:make"}}, "labeller.name", "cannot import module"),
        ({"labeller": {"name": "vasp"}}, "labeller.name", "neither a built-in name"),
        ({"seeds": [{"generate": {"element": "Xx"}}]}, "seeds.0.generate.element", "unknown chemical symbol"),
        ({"seeds": [{}]}, "seeds.0", "exactly one of 'file' or 'generate'"),
        ({"name": "has space"}, "name", "letters, digits"),
        ({"uncertainty": {"hessian": "forces"}}, "uncertainty.hessian", "'loss' or 'energy'"),
        ({"uncertainty": {"regularizer": 0}}, "uncertainty.regularizer", "greater than 0"),
        ({"uncertainty": {"force_weight": 1.0}}, "uncertainty.force_weight", "Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_field(tmp_path, override, field, expected):
    path = tiny_campaign(tmp_path, **override)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert f"  {field}" in message
    assert expected in message


def test_missing_seed_file_is_named(tmp_path):
    path = tiny_campaign(tmp_path, seeds=[{"file": "nowhere.extxyz"}])
    with pytest.raises(ConfigError, match="nowhere.extxyz"):
        load_config(path)


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, yaml.safe_dump([1, 2])))
