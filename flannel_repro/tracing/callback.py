"""Tracing chosen steps of a training run: a public `TrainerCallback` that enters the op tracer (ops.py) when a
traced step begins and leaves it when the step ends.

In the HF Trainer's loop (transformers 5.24, `_inner_training_loop`) `on_step_begin` comes before `training_step`
(forward and backward) and `on_step_end` after gradient clipping, `optimizer.step()`, the scheduler's step and
`zero_grad`, so a traced step holds every op that computes a number of the step. The callback goes first in the
Trainer's list, so the recorder's own copies at `on_step_end` (recorder.py) are not traced; its gradient copy in
backward is, as a part of every recorded step.

    traces = StepTraces(steps=(1,))
    callback = TraceCallback(run, traces)   # one per run; traces.steps holds every (run, step) traced
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from flannel_repro.tracing.ops import Op, OpTracer


@dataclass
class StepTraces:
    """The steps to trace (in every run) and what was traced: {(run, step): ops}. stop_after: end training once
    every one of `steps` is traced (`flannel-repro trace`, which needs no more of the run)."""

    steps: tuple[int, ...]
    stop_after: bool = False
    traced: dict[tuple[int, int], list[Op]] = field(default_factory=dict)


class TraceCallback(TrainerCallback):
    def __init__(self, run: int, traces: StepTraces) -> None:
        self.run = run
        self.traces = traces
        self._tracer: OpTracer | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1  # the step about to run, as the trajectory numbers it
        if step in self.traces.steps:
            self._tracer = OpTracer(model, optimizer)
            self._tracer.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._tracer is None:
            return
        self._tracer.__exit__(None, None, None)
        self.traces.traced[(self.run, state.global_step)] = self._tracer.ops
        self._tracer = None
        if self.traces.stop_after and state.global_step >= max(self.traces.steps):
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._tracer is not None:  # training ended inside a traced step (a stop signal): leave the mode
            self._tracer.__exit__(None, None, None)
            self._tracer = None


def trace_header(content_digest: str | None, fp: dict[str, Any], source: str) -> dict[str, Any]:
    """What a trace says about where it was made: the trajectory's content digest (the run it belongs to), the
    torch version, the thread count and the device fingerprint. Nothing that changes from one run to the next."""
    return {"content_digest": content_digest, "source": source, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "fingerprint": fp}
