"""When a campaign stops early (the criteria of the campaign file's ``stopping`` section)."""

from __future__ import annotations

from typing import Any

import numpy as np

from alforge.config import LabellerConfig, StoppingConfig
from alforge.selectors import make_selector
from alforge.selectors.base import Selector


def stop_reason(
    cfg: StoppingConfig,
    metrics: dict[str, Any],
    labels_selected: int,
    last_selection: dict | None,
    selector: Selector | None = None,
) -> str | None:
    """Why the campaign should stop after the model just trained, or None to go on.

    The "too few informative picks" test counts, among ``last_selection["scores"]``, the picks
    that ``selector.informative(scores, cfg.min_score)`` calls informative, in the selector's own
    units (nats for MIG/MMIG, variance drop for qopt, PR gain for pr_augment, γ above γ_lo for
    dopt, ...; see :class:`alforge.selectors.base.Selector`). ``selector`` is the configured
    selector; when omitted it is rebuilt from ``last_selection["selector"]`` (name) and
    ``last_selection.get("params", {})`` if present, else every score ``≥ min_score`` counts.
    """
    rmse = metrics.get("test_forces_rmse")
    if cfg.target_forces_rmse is not None and rmse is not None and rmse < cfg.target_forces_rmse:
        return f"test force RMSE {rmse:.4f} eV/Å is below the target {cfg.target_forces_rmse:g}"
    if cfg.label_budget is not None and labels_selected >= cfg.label_budget:
        return f"label budget spent ({labels_selected} of {cfg.label_budget})"
    if last_selection is not None:
        if selector is None and last_selection.get("selector"):
            selector = make_selector(last_selection["selector"], **last_selection.get("params", {}))
        scores = np.asarray(last_selection["scores"], dtype=np.float64)
        counter = selector if selector is not None else Selector()
        informative = counter.informative(scores, cfg.min_score)
        if informative < cfg.min_informative:
            name = f" by {selector.name}'s measure" if selector is not None else ""
            return (
                f"only {informative} pick(s) informative{name} (min_score = {cfg.min_score:g}, "
                f"min_informative = {cfg.min_informative})"
            )
    return None


def remaining_budget(cfg: StoppingConfig, batch_size: int, labels_selected: int) -> int:
    if cfg.label_budget is None:
        return batch_size
    return max(0, min(batch_size, cfg.label_budget - labels_selected))


#: finished labels needed before the failure *fraction* is judged (a 1-of-2 start says little)
MIN_FINISHED_FOR_FRACTION = 10


def failure_budget_reason(cfg: LabellerConfig, counts: dict[str, int]) -> str | None:
    """Why the campaign must pause for a human, or None. Counts are labels by status."""
    failed, done = counts.get("failed", 0), counts.get("done", 0)
    if cfg.max_failed is not None and failed > cfg.max_failed:
        return (
            f"{failed} labels failed, more than labeller.max_failed = {cfg.max_failed}; "
            "inspect them with `alforge status`, fix the labeller or raise the budget, then run again"
        )
    finished = failed + done
    if cfg.max_failed_fraction is not None and finished >= MIN_FINISHED_FOR_FRACTION:
        fraction = failed / finished
        if fraction > cfg.max_failed_fraction:
            return (
                f"{failed} of {finished} labels failed ({fraction:.0%}), more than "
                f"labeller.max_failed_fraction = {cfg.max_failed_fraction:g}; inspect them with "
                "`alforge status`, fix the labeller or raise the budget, then run again"
            )
    return None
