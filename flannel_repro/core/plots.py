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


def live_dead_png(panels: dict[str, tuple[str, str]], curves: dict[str, list[list[float]]], first_seed: int,
                  out: Path, title: str) -> None:
    """One panel per entry of `panels` (y label -> (live curve, dead curve)), each curve (runs, steps+1) by step
    from t = 0; live solid and dead dashed, one colour per run (seed), so the seeds overlay."""
    fig, axes = figure(nrows=len(panels), figsize=(7, 2.6 * len(panels)), sharex=True)
    axes = axes if len(panels) > 1 else (axes,)
    for ax, (ylabel, names) in zip(axes, panels.items(), strict=True):
        for run in range(len(curves[names[0]])):
            colour = f"C{run % 10}"
            for name, style, side in zip(names, ("-", "--"), ("live", "dead"), strict=True):
                curve = curves[name][run]
                ax.plot(range(len(curve)), curve, style, color=colour, lw=1, label=f"seed {first_seed + run} {side}")
        ax.set(ylabel=ylabel)
    axes[0].set_title(title)
    axes[0].legend(fontsize="small", ncol=2)
    axes[-1].set(xlabel="step")
    save_png(fig, out)
