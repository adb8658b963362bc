"""Model files are read without unpickling code (issue 8, "Model files are trusted only through the store").

A planted pickle whose ``__reduce__`` writes a marker file is refused by every loader, and the marker
never appears; mace's own (pickled-module) format is refused the same way; alforge's format holds
only plain values and tensors and reloads to exactly the trained model; and no process alforge
starts inherits ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alforge.mlip.mace_model import (
    MODEL_FORMAT,
    ModelFormatError,
    evaluate,
    export_mace_model,
    load_calculator,
    load_model,
    train_mace,
)
from alforge.mlip.params import MACEParams
from cu_cells import cu_cells

TINY = dict(num_channels=8, max_L=0, max_ell=2, mlp_irreps="8x0e", batch_size=4, device="cpu")


class Planted:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _plant(path: Path, marker: Path, how: str) -> None:
    if how == "torch.save":
        torch.save(Planted(marker), path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps(Planted(marker)))
    else:  # inside a dict that looks like alforge's format
        torch.save({"format": MODEL_FORMAT, "dtype": "float64", "architecture": Planted(marker), "state_dict": {}}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    return train_mace(cu_cells(4, seed=0), MACEParams(**TINY, max_epochs=1), tmp_path_factory.mktemp("m") / "m.model")


@pytest.mark.parametrize("how", ["torch.save", "pickle", "in-format"])
def test_planted_pickle_is_refused_without_running(tmp_path: Path, how: str) -> None:
    model, marker = tmp_path / "iteration-002.model", tmp_path / "marker"
    _plant(model, marker, how)
    for load in (load_model, load_calculator):
        with pytest.raises(ModelFormatError, match="iteration-002.model"):
            load(model, "cpu")
    with pytest.raises(ModelFormatError, match="iteration-002.model"):
        train_mace(cu_cells(2, seed=1), MACEParams(**TINY, max_epochs=1), tmp_path / "next.model", init_model=model)
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.slow
def test_saved_model_is_weights_only_and_reloads_exactly(trained, tmp_path: Path) -> None:
    saved = torch.load(trained.model_path, weights_only=True)  # nothing but plain values and tensors
    assert saved["format"] == MODEL_FORMAT and saved["dtype"] == "float64"
    # the reloaded model reproduces the errors train_mace measured on the model it had in memory
    train = [cu_cells(4, seed=0)[i] for i in trained.training["train_indices"]]
    reloaded = evaluate(trained.model_path, train, device="cpu")
    for key in ("energy_rmse_per_atom", "forces_rmse", "stress_rmse"):
        assert reloaded[key] == pytest.approx(trained.metrics[f"train_{key}"], rel=1e-12, abs=1e-15)


@pytest.mark.slow
def test_mace_format_is_refused(trained, tmp_path: Path) -> None:
    """mace's pickled module holds torch.fx graph modules, which unpickle by executing source code."""
    export_mace_model(trained.model_path, tmp_path / "mace.model")
    with pytest.raises(ModelFormatError, match="not an alforge model file"):
        load_model(tmp_path / "mace.model", "cpu")
    model = load_model(trained.model_path, "cpu")
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert np.isfinite(float(model.atomic_energies_fn.atomic_energies.sum()))


def test_children_never_inherit_the_weights_only_override(tmp_path: Path) -> None:
    """Importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; alforge removes it before any code runs."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "import alforge.mlip.features, alforge.mlip.committee\n"
        "from alforge.labelling.runner import run_process\n"
        "d = Path(sys.argv[1])\n"
        "print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', 'unset'))\n"
        "run_process(['sh', '-c', 'echo ${TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:-unset}'], d, d / 'out', d / 'err')\n"
        "print((d / 'out').read_text().strip())\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["unset", "unset"]
