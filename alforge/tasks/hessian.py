"""The model's loss-consistent last-layer Hessian, computed once and kept in the store (no Prefect).

:func:`ensure_hessian` returns the stored ``H`` of a (model, form), or builds it with
:func:`alforge.uncertainty.gauss_newton` from the structures the model was actually
fitted to (its ``train_ids`` narrowed to the training split recorded in ``<model>.training.json``),
stores it and returns it. By default ``ς`` is chosen on the structures that training held out for
validation (the same split), which the loss never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alforge.tasks.common import open_store
from alforge.uncertainty.rigidity import Hessian

__all__ = ["ensure_hessian", "training_split"]


def training_split(train_ids: Sequence[int], settings: dict, model_path: str) -> tuple[list[int], list[int]]:
    """``(fitted ids, held-out ids)``: the model's ``train_ids`` split as its training settings record."""
    ids = [int(i) for i in train_ids]
    fitted, held = settings.get("train_indices"), settings.get("valid_indices", [])
    if fitted is None:
        return ids, []
    indices = list(fitted) + list(held)
    if indices and (max(indices) >= len(ids) or min(indices) < 0):
        raise ValueError(
            f"training settings of {model_path} index {max(indices) + 1} structures but the store has "
            f"{len(ids)} training ids for it"
        )
    return [ids[i] for i in fitted], [ids[i] for i in held]


def ensure_hessian(
    store_url: str,
    model_id: int,
    *,
    form: str = "loss",
    regularizer: float | None = None,
    validation_ids: Sequence[int] | None = None,
) -> Hessian:
    """The model's Hessian of ``form`` (``"loss"`` or ``"energy"``): from the store, else computed and stored.

    ``regularizer`` (ς): ``None`` uses the stored choice, or chooses one when computing
    (:func:`alforge.uncertainty.choose_regularizer`) on the held-out energies of
    ``validation_ids`` (default: the model's own validation split). An explicit ``ς`` different
    from the stored one is applied to the stored data term (``H − ς_old² I + ς² I``) and not stored.
    """
    from alforge.mlip.loss_weights import LossWeights

    store = open_store(store_url)
    stored = store.get_hessian(model_id, form)
    if stored is None:
        from alforge.mlip.mace_model import read_training_settings
        from alforge.uncertainty.gauss_newton import loss_hessian

        info = store.model(model_id)
        settings = read_training_settings(Path(info.path))
        fitted, held = training_split(info.train_ids, settings, info.path)
        held = list(validation_ids) if validation_ids is not None else held
        hessian = loss_hessian(
            store.model_file(model_id),  # hash-checked before it is loaded
            store.get_labelled_atoms(fitted),
            form=form,
            settings=settings,
            validation=store.get_labelled_atoms(held) if held else None,
        )
        store.put_hessian(
            model_id,
            form,
            hessian.matrix,
            hessian.regularizer,
            hessian.regularizer_method,
            hessian.weights.to_dict(),
            len(fitted),
        )
        stored = {
            "matrix": hessian.matrix,
            "regularizer": hessian.regularizer,
            "regularizer_method": hessian.regularizer_method,
            "weights": hessian.weights.to_dict(),
        }
    matrix, method = stored["matrix"], stored["regularizer_method"]
    if regularizer is not None and regularizer != stored["regularizer"]:
        if not regularizer > 0:
            raise ValueError(f"regularizer (ς) must be > 0, got {regularizer}")
        matrix = matrix.copy()
        matrix[np.diag_indices(len(matrix))] += regularizer**2 - stored["regularizer"] ** 2
        method = "given"
    else:
        regularizer = stored["regularizer"]
    return Hessian(
        matrix,
        regularizer,
        weights=LossWeights.from_dict(stored["weights"]),
        form=form,
        regularizer_method=method,
    )
