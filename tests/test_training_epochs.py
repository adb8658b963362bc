"""The store's training_epochs: rows read back in order, a rerun never duplicates an epoch."""

from __future__ import annotations

import pytest

from alforge.storage import Store


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'store.db'}")


def test_training_epochs_round_trip_without_duplicates(store):
    cid = store.get_or_create_campaign("tiny", {})
    it = store.get_or_create_iteration(cid, 0)
    mid = store.add_model(cid, it, "/m.model", [], {})
    rows = [
        {"epoch": 1, "epochs": 2, "train_loss": 3.0, "valid_loss": 2.5, "valid_energy_rmse_per_atom": 0.01,
         "valid_forces_rmse": 0.2, "seconds": 1.5},
        {"epoch": 2, "epochs": 2, "train_loss": 1.0, "seconds": 1.0},  # no validation split
    ]
    store.add_training_epochs(mid, rows[::-1])
    store.add_training_epochs(mid, [{**rows[0], "train_loss": 99.0}])  # a rerun's epoch 1: kept as first stored
    back = store.training_epochs(mid)
    assert [r["epoch"] for r in back] == [1, 2]
    assert back[0] == rows[0]
    assert back[1]["valid_forces_rmse"] is None and back[1]["train_loss"] == 1.0
    assert store.training_epochs(mid + 1) == []
    assert store.campaign_name(cid) == "tiny"
