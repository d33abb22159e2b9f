"""Token motion: how far and how fast the live and the dead rows of W move, at every step, computed in flight.

From the (V, H) bf16 slices the recorder already holds, in float32, for live and for dead tokens separately:

    drift_*  mean over tokens of ||W_t[v] - W_initial[v]||_2   how far the rows have moved since t = 0
    speed_*  mean over tokens of ||W_t[v] - W_(t-1)[v]||_2     how far they moved in this step
    force_*  mean over tokens of ||grad_W_t[v]||_2             how hard this step's gradient pulls on them

`TokenMotion` is a train() step sink: it fills `rec.motion` for the sinks after it (tracking logs it) and keeps
the (runs, steps+1) curves for the per-step CSV. t = 0 has drift, speed and force 0 by definition; a value whose
tensor is not recorded (record.W or record.grads off, or a step record.steps does not record) or whose token set is
empty is NaN. With a schedule, speed at a recorded step is the move since the previous recorded step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flannel_repro.data.masks import Masks
from flannel_repro.recording.records import StepRecord

MOTION_NAMES = ("drift_live", "drift_dead", "speed_live", "speed_dead", "force_live", "force_dead")


def token_sets(masks: Masks) -> tuple[np.ndarray, np.ndarray]:
    """The live and the dead token ids."""
    return masks.live_mask.numpy().nonzero()[0], masks.dead_mask.numpy().nonzero()[0]


def set_means(values: np.ndarray, sets: tuple[np.ndarray, ...]) -> list[float]:
    """The mean of (V,) float32 `values` over each token set: a float64 sum in numpy (pairwise, one thread) rounded
    to float32, so the same value whichever thread computes it and however many threads torch has (in flight on the
    recording ring's writer thread, replayed after a resume on the training thread). NaN for an empty set."""
    return [float(np.float32(values[t].sum(dtype=np.float64) / len(t))) if len(t) else math.nan for t in sets]


class TokenMotion:
    """Drift, speed and force of live and dead tokens per (run, step); about 2 ms of CPU a step at 10,000 x 64."""

    def __init__(self, masks: Masks, runs: int, steps: int) -> None:
        self.token_sets = token_sets(masks)
        self.curves = {name: [[math.nan] * (steps + 1) for _ in range(runs)] for name in MOTION_NAMES}
        self._initial: torch.Tensor | None = None  # (V, H) float32 W_initial of the run in progress
        self._prev: torch.Tensor | None = None  # (V, H) float32 W_(t-1)

    def __call__(self, rec: StepRecord) -> None:
        norms = {}  # kind -> (V,) float32 row norms
        w = rec.tensors.get("W")
        if w is not None:
            w = w.float()
            if rec.step == 0:
                self._initial = self._prev = w
            if self._prev is not None:  # a run's steps arrive in order from t = 0 (replayed first after a resume)
                norms["drift"] = (w - self._initial).norm(dim=1)
                norms["speed"] = (w - self._prev).norm(dim=1)
            self._prev = w
        g = rec.tensors.get("grad_W")
        if g is not None:
            norms["force"] = g.float().norm(dim=1)
        if not norms:
            return
        for kind, row_norms in norms.items():
            for side, value in zip(("live", "dead"), set_means(row_norms.numpy(), self.token_sets), strict=True):
                self.curves[f"{kind}_{side}"][rec.run][rec.step] = value  # NaN over no tokens, not 0
                rec.motion[f"{kind}_{side}"] = value
