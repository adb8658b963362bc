"""The three figures an iteration publishes, as PNG bytes: arrays in, images out.

Matplotlib's Agg canvas is used directly (no pyplot), so drawing needs no display, keeps no global
figure registry and is safe from the worker threads Prefect runs tasks in.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
SIZE = (5.0, 3.6)  # inches: readable inside the Prefect UI's artifact pane


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def learning_curve_png(
    n_labels: Sequence[int], forces_rmse: Sequence[float | None], energy_rmse: Sequence[float | None]
) -> bytes:
    """Test force RMSE (meV/Å, left axis) and energy RMSE (meV/atom, right axis) against the
    labels each model was trained on; a missing error (no test set, energy-only test set) is a gap."""
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    x = np.asarray(n_labels, dtype=float)
    f = np.array([np.nan if v is None else 1000 * v for v in forces_rmse], dtype=float)
    e = np.array([np.nan if v is None else 1000 * v for v in energy_rmse], dtype=float)
    ax.plot(x, f, "o-", color="tab:blue", label="force RMSE")
    ax.set_xlabel("labels used for training")
    ax.set_ylabel("test force RMSE (meV/Å)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(x, e, "s--", color="tab:orange", label="energy RMSE")
    twin.set_ylabel("test energy RMSE (meV/atom)", color="tab:orange")
    ax.set_title("learning curve")
    ax.grid(alpha=0.3)
    return _png(fig)


def parity_png(reference: np.ndarray, predicted: np.ndarray, title: str = "test forces") -> bytes:
    """Predicted against reference force components (eV/Å) with the y = x line and the RMSE."""
    ref, pred = np.ravel(reference), np.ravel(predicted)
    if ref.shape != pred.shape:
        raise ValueError(f"parity plot: {ref.size} reference values but {pred.size} predictions")
    fig = Figure(figsize=(SIZE[1] + 0.4, SIZE[1]))
    ax = fig.add_subplot()
    ax.scatter(ref, pred, s=6, alpha=0.6, color="tab:blue")
    if ref.size:
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        rmse = float(np.sqrt(np.mean((pred - ref) ** 2)))
        ax.text(0.04, 0.94, f"RMSE {1000 * rmse:.1f} meV/Å", transform=ax.transAxes, va="top")
    ax.set_xlabel("reference force (eV/Å)")
    ax.set_ylabel("model force (eV/Å)")
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    return _png(fig)


def calibration_png(sigma: np.ndarray, abs_error: np.ndarray) -> bytes:
    """|energy error| against the calibrated σ of each test structure (meV, log–log over a wide range),
    with the |error| = σ line: well calibrated points scatter around it, about 68 % below."""
    s, a = 1000 * np.asarray(sigma, dtype=float), 1000 * np.asarray(abs_error, dtype=float)
    if s.shape != a.shape:
        raise ValueError(f"calibration plot: {s.size} σ values but {a.size} errors")
    fig = Figure(figsize=SIZE)
    ax = fig.add_subplot()
    positive = (s > 0) & (a > 0)
    ax.scatter(s[positive], a[positive], s=10, color="tab:green")
    if positive.any():
        lo = float(min(s[positive].min(), a[positive].min()))
        hi = float(max(s[positive].max(), a[positive].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="|error| = σ")
        if hi / lo >= 10:  # log axes only where they help: within a decade they just crowd the ticks
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.legend(loc="upper left")
    ax.set_xlabel("calibrated σ (meV)")
    ax.set_ylabel("|energy error| (meV)")
    ax.set_title("calibration on the test set")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)
