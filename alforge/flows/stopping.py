"""When a campaign stops early (the criteria of the campaign file's ``stopping`` section)."""

from __future__ import annotations

from typing import Any

from alforge.config import StoppingConfig


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
