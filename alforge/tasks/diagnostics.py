"""Per-iteration uncertainty diagnostics (METHODS §2 and §8), stored with the iteration.

From the model's last-layer features and its one stored Hessian (the Gauss–Newton Hessian of the
loss it was trained with, or the energy-only form when the campaign asks for it): the form, row
weights and ς of that Hessian and how ς was chosen, the distribution of PR over candidates and the
test set, of LPR over their atoms, and the calibration of ``σ² = α² f_sᵀH⁻¹f_s`` against the test set's energy residuals: α² (eq. 26) on one
half, ENCE, miscalibration area, NLL, Spearman and conformal coverage on the other.
"""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from alforge.config import UncertaintyConfig
from alforge.tasks.common import open_store
from alforge.tasks.featurize import LAST_LAYER, model_energies, structure_features
from alforge.tasks.hessian import ensure_hessian
from alforge.uncertainty import calibration as cal
from alforge.uncertainty.rigidity import (
    Hessian,
    component_prediction_rigidity,
    local_prediction_rigidity,
    prediction_rigidity,
)

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
CONFORMAL_MISCOVERAGE = 0.1
MIN_FOR_SPLIT = 10  # fewer test structures: calibrate and evaluate on the same set (flagged)


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def calibration_report(residuals: np.ndarray, variances: np.ndarray) -> dict[str, float | bool]:
    """α² on the even-indexed half, metrics on the odd half (or in-sample below MIN_FOR_SPLIT)."""
    n = len(residuals)
    in_sample = n < MIN_FOR_SPLIT
    fit = np.arange(n) if in_sample else np.arange(0, n, 2)
    held = np.arange(n) if in_sample else np.arange(1, n, 2)
    a2 = cal.alpha2(residuals[fit], variances[fit])
    sigmas = np.sqrt(a2 * variances)
    q = cal.conformal_quantile(np.abs(residuals[fit]) / sigmas[fit], CONFORMAL_MISCOVERAGE)
    r, s = residuals[held], sigmas[held]
    return {
        "alpha2": float(a2),
        "ence": float(cal.ence(r, s, n_bins=min(10, max(1, len(r) // 2)))),
        "miscalibration_area": float(cal.miscalibration_area(r, s)),
        "nll": float(cal.gaussian_nll(r, s)),
        "spearman": float(cal.spearman(r, s)) if len(r) > 2 else float("nan"),
        "conformal_quantile": float(q),
        "conformal_coverage": float(cal.coverage(r, q * s)),
        "n": int(n),
        "in_sample": in_sample,
    }


def model_hessian(store_url: str, model_id: int, cfg: UncertaintyConfig) -> Hessian:
    """The model's one stored ``H`` (``cfg.hessian`` form, ``cfg.regularizer`` or the chosen ς).

    The same object every selector of the iteration reads (:func:`alforge.tasks.hessian.ensure_hessian`):
    computed once per model from the structures it was fitted to, stored, reused.
    """
    return ensure_hessian(store_url, model_id, form=cfg.hessian, regularizer=cfg.regularizer)


def hessian_record(hessian: Hessian) -> dict:
    """What an iteration records of its ``H``: form, row weights, ς and how ς was chosen."""
    return {
        "form": hessian.form,
        "weights": hessian.weights.to_dict() if hessian.weights is not None else None,
        "regularizer": hessian.regularizer,
        "regularizer_method": hessian.regularizer_method,
    }


@task(name="diagnostics", tags=["alforge", "step:diagnostics"], cache_policy=NO_CACHE)
def diagnostics(
    store_url: str, campaign_id: int, model_id: int, candidate_ids: list[int], cfg: UncertaintyConfig
) -> dict:
    from alforge.mlip.features import last_layer_weights
    from alforge.mlip.mace_model import load_model

    store = open_store(store_url)
    hessian = model_hessian(store_url, model_id, cfg)
    test_ids = store.labelled_ids(campaign_id, role="test")
    out: dict = {"hessian": hessian_record(hessian)}
    for name, ids in (("candidates", candidate_ids), ("test", test_ids)):
        if not ids:
            continue
        out[f"pr_{name}"] = _quantiles(prediction_rigidity(hessian, structure_features(store_url, model_id, ids)))
        atoms = np.concatenate(store.get_features(model_id, LAST_LAYER, ids))
        out[f"lpr_{name}"] = _quantiles(local_prediction_rigidity(hessian, atoms))
    if test_ids:  # CPR of each MACE readout block: which layer's features the test set lacks
        _, blocks = last_layer_weights(load_model(store.model_file(model_id)))
        cpr = component_prediction_rigidity(hessian, structure_features(store_url, model_id, test_ids), blocks)
        out["cpr_test"] = {name: _quantiles(values) for name, values in cpr.items()}
    if len(test_ids) >= 2:
        ref = np.array([a.get_potential_energy() for a in store.get_labelled_atoms(test_ids)])
        residuals = model_energies(store_url, model_id, test_ids) - ref
        variances = hessian.variance(structure_features(store_url, model_id, test_ids))
        out["calibration"] = calibration_report(residuals, variances)
        # per structure, for the iteration's calibration plot (σ with the α² just fitted)
        out["calibration_points"] = {
            "structure_ids": [int(i) for i in test_ids],
            "abs_error": np.abs(residuals).tolist(),
            "sigma": np.sqrt(out["calibration"]["alpha2"] * variances).tolist(),
        }
    from alforge.tasks.probe import campaign_probe_settings, probe_evaluation

    if (probe := campaign_probe_settings(store, campaign_id)) is not None:  # METHODS §6, with baselines
        out["probe"] = probe_evaluation(store_url, campaign_id, model_id, probe)
    from alforge.tasks.ltau import campaign_ltau_settings, campaign_uses_ltau, ltau_evaluation

    if campaign_uses_ltau(store, campaign_id):  # METHODS §7: calibration, ECE, Spearman on the test set
        out["ltau"] = ltau_evaluation(store_url, campaign_id, model_id, campaign_ltau_settings(store, campaign_id))
    return out
