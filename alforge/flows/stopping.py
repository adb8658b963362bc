"""When a campaign stops early (the criteria of the campaign file's ``stopping`` section)."""

from __future__ import annotations

from typing import Any

from alforge.config import LabellerConfig, StoppingConfig


def stop_reason(
    cfg: StoppingConfig, metrics: dict[str, Any], labels_selected: int, last_selection: dict | None
) -> str | None:
    """Why the campaign should stop after the model just trained, or None to go on."""
    rmse = metrics.get("test_forces_rmse")
    if cfg.target_forces_rmse is not None and rmse is not None and rmse < cfg.target_forces_rmse:
        return f"test force RMSE {rmse:.4f} eV/Å is below the target {cfg.target_forces_rmse:g}"
    if cfg.label_budget is not None and labels_selected >= cfg.label_budget:
        return f"label budget spent ({labels_selected} of {cfg.label_budget})"
    if last_selection is not None:
        informative = sum(1 for s in last_selection["scores"] if s >= cfg.min_score)
        if informative < cfg.min_informative:
            return (
                f"only {informative} candidate(s) scored >= {cfg.min_score:g} "
                f"(min_informative = {cfg.min_informative})"
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
