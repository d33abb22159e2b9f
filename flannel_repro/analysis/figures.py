"""Figures of a finished run from its per-step CSV (paths.loss_curve), for a paper or a report.

    indicators_png(params, root, Path("reports/indicators.png"))

draws the under-training indicators (recording/indicators.py) of live against dead tokens over the steps, every run
(seed) of the file overlaid: the mean distance and cosine distance from the dead rows' mean, and how far the dead
mean has moved off the vocabulary's centroid (the same in both line styles: it is one number per step).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.plots import live_dead_png

PANELS = {
    "distance from the dead mean": ("dist_live", "dist_dead"),
    "cosine distance from it": ("cos_live", "cos_dead"),
    "dead mean to centroid": ("dead_centroid", "dead_centroid"),
}


def read_curves(path: Path, names: list[str]) -> dict[str, list[list[float]]]:
    """(runs, steps+1) curves of the CSV's `names` columns, NaN at t = 0 (the CSV starts at step 1)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [n for n in names if rows and n not in rows[0]]
    if not rows or missing:
        raise FlannelError(f"{path}: no {', '.join(missing or names)} column(s); rerun `flannel-repro train` with "
                           "this version to write them")
    runs, steps = 1 + max(int(r["run"]) for r in rows), max(int(r["step"]) for r in rows)
    curves = {n: [[math.nan] * (steps + 1) for _ in range(runs)] for n in names}
    for r in rows:
        for n in names:
            curves[n][int(r["run"])][int(r["step"])] = float(r[n])
    return curves


def indicators_png(params: Params, root: Path, out: Path) -> Path:
    """The indicators of paths.loss_curve, live against dead, seeds overlaid, as a PNG at `out`."""
    names = sorted({n for pair in PANELS.values() for n in pair})
    curves = read_curves(params.paths.under(root).loss_curve, names)
    live_dead_png(PANELS, curves, params.train.train_seed, out,
                  title="Under-training indicators: live (solid) against dead (dashed) tokens")
    return out
