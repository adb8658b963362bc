"""Every shipped example campaign is a valid campaign file."""

from __future__ import annotations

from pathlib import Path

import pytest

from alforge.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/campaign.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_campaign_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.parent.name
    assert cfg.store.endswith(f"{cfg.name}.db")


def test_examples_exist():
    assert {p.parent.name for p in EXAMPLES} >= {"cu-emt", "si-qe"}
