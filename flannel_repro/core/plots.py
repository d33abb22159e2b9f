"""The project's PNG plots, all drawn the same way: a matplotlib `Figure` (no pyplot, so no global backend or
figure registry), rendered with Agg and written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flannel_repro.core.fsutil import atomic_output


def figure(*, nrows: int = 1, figsize: tuple[float, float], sharex: bool = False) -> tuple[Any, Any]:
    """A new figure and its axes (one, or a tuple of `nrows`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="tight")
    axes = fig.subplots(nrows, 1, sharex=sharex)
    return fig, axes


def save_png(fig: Any, out: Path) -> None:
    with atomic_output(Path(out)) as tmp:
        fig.savefig(tmp, format="png")


def loss_curve_png(losses: list[list[float]], first_seed: int, out: Path, title: str) -> None:
    """Training loss by step, one line per run (seed); `losses` is (runs, steps+1) with NaN at t = 0."""
    fig, ax = figure(figsize=(7, 4))
    for run, curve in enumerate(losses):
        ax.plot(range(1, len(curve)), curve[1:], lw=1, label=f"seed {first_seed + run}")
    ax.set(xlabel="step", ylabel="training loss", title=title)
    if len(losses) > 1:
        ax.legend()
    save_png(fig, out)
