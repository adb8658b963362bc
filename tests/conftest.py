"""Shared fixtures: an isolated Prefect home, a tiny campaign file, and Prefect's test harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Before anything imports Prefect: keep its database and settings out of the user's home.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect-test"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Tiny models on 2 cores: one intra-op thread is faster than two (thread overhead dominates, and
# two threads collapse when anything else runs), and it keeps tests deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent


def tiny_campaign(tmp_path: Path, **overrides) -> Path:
    """Write a campaign file sized for CI: 4-atom Cu cells, an 8-channel MACE, a few MD steps."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "seeds": [{"generate": {"element": "Cu", "a": 3.61, "supercells": [[1, 1, 1], [2, 1, 1]],
                                "count": 6, "rattle": 0.05, "strain": 0.02, "seed": 1}}],
        "test": [{"generate": {"element": "Cu", "a": 3.61, "count": 4, "rattle": 0.1, "seed": 2}}],
        "mlip": {"num_channels": 8, "max_L": 0, "num_interactions": 2, "max_epochs": 6,
                 "finetune_epochs": 3, "mlp_irreps": "8x0e", "batch_size": 4},
        "exploration": {"walkers": 2, "temperatures": [500, 900], "steps": 12, "frame_interval": 3,
                        "min_distance": 1.6},
        "selector": {"name": "mig", "batch_size": 3},
        "labeller": {"name": "emt"},
        "stopping": {"max_iterations": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
