"""Under-training indicators ("Fishing for Magikarp", Land and Bartolo 2024), per step, computed in flight.

The paper finds under-trained tokens by how close their (unembedding) rows are to the mean row of tokens known to be
unused. Here the embedding is tied and the unused tokens are known exactly: the dead set. At each step, from the
(V, H) bf16 slice of W in float32, with mu the mean row over the whole vocabulary and the rows centred on it:

    x_v = W_t[v] - mu          r = mean over dead v of x_v (the dead rows' mean, centred)
    dist_v = ||x_v - r||_2      Euclidean distance of token v's row from the dead rows' mean
    cos_v  = 1 - cos(x_v, r)    cosine distance from it (0: the same direction as the dead mean)
    dead_centroid = ||r||_2     how far the dead set's mean has moved off the vocabulary's centroid

The paper removes the first principal component before the cosine, as its unembeddings share a large constant
direction; here the centring removes that direction (the mean), which is exact, cheap and has no sign or
convergence to choose, so the value is the same whichever thread computes it. A live token whose dist and cos are
as small as the dead tokens' is one the training has not yet moved away from them.

`TokenIndicators` is a train() step sink beside motion.TokenMotion: it adds the summaries (`INDICATOR_NAMES`: the
live and dead means of dist and cos, and dead_centroid) to `rec.motion`, which tracking logs, and keeps the
(runs, steps+1) curves for the per-step CSV; NaN without W or without dead tokens. `indicators(w, dead_mask)` gives
the per-token values of any step, e.g. read from the file: `indicators(traj.step("W", t).float(), masks.dead_mask)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flannel_repro.data.masks import Masks
from flannel_repro.recording.motion import set_means, token_sets
from flannel_repro.recording.records import StepRecord

INDICATOR_NAMES = ("dist_live", "dist_dead", "cos_live", "cos_dead", "dead_centroid")


def indicators(w: torch.Tensor, dead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token `dist` and `cos` (V,) float32 and the scalar `dead_centroid` of one (V, H) float32 slice of W. The
    two mean rows are float64 sums in numpy rounded to float32 (as motion.set_means): the same bits on any thread."""
    x = w - _mean_row(w)
    r = _mean_row(x[dead_mask])
    dist = (x - r).norm(dim=1)
    cos = 1 - (x @ r) / (x.norm(dim=1) * r.norm())  # NaN for a row at the centroid itself
    return {"dist": dist, "cos": cos, "dead_centroid": r.norm()}


def _mean_row(rows: torch.Tensor) -> torch.Tensor:
    """(H,) float32: the mean of (n, H) float32 `rows`."""
    return torch.from_numpy((rows.numpy().sum(axis=0, dtype=np.float64) / len(rows)).astype(np.float32))


class TokenIndicators:
    """The live and dead means of the indicators per (run, step); about 2 ms of CPU a step at 10,000 x 64."""

    def __init__(self, masks: Masks, runs: int, steps: int) -> None:
        self.dead_mask = masks.dead_mask
        self.token_sets = token_sets(masks)
        self.curves = {name: [[math.nan] * (steps + 1) for _ in range(runs)] for name in INDICATOR_NAMES}

    def __call__(self, rec: StepRecord) -> None:
        w = rec.tensors.get("W")
        if w is None or not len(self.token_sets[1]):
            return
        values = indicators(w.float(), self.dead_mask)
        out = {"dead_centroid": float(values["dead_centroid"])}
        for kind in ("dist", "cos"):
            live, dead = set_means(values[kind].numpy(), self.token_sets)
            out |= {f"{kind}_live": live, f"{kind}_dead": dead}
        for name, value in out.items():
            self.curves[name][rec.run][rec.step] = value
            rec.motion[name] = value
