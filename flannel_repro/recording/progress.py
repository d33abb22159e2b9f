"""Progress on stderr: a live bar with step, loss and steps/s on a terminal, a short line every N steps otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from flannel_repro.recording.records import StepRecord


class Progress:
    def __init__(self, runs: int, steps: int, every: int, stream: TextIO | None = None) -> None:
        self.runs, self.steps, self.every = runs, steps, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._t0 = time.perf_counter()

    def __call__(self, rec: StepRecord) -> None:
        if rec.step == 0:
            self._t0 = time.perf_counter()
            return
        rate = rec.step / max(time.perf_counter() - self._t0, 1e-9)
        run = f"run {rec.run + 1}/{self.runs} " if self.runs > 1 else ""
        if self.tty:
            width = 30
            filled = width * rec.step // self.steps
            bar = "#" * filled + "-" * (width - filled)
            end = "\n" if rec.step == self.steps else ""
            self.stream.write(
                f"\r{run}[{bar}] step {rec.step}/{self.steps} loss {rec.loss:.4f} {rate:.2f} steps/s{end}"
            )
            self.stream.flush()
        elif rec.step % self.every == 0 or rec.step == self.steps:
            self.stream.write(f"{run}step {rec.step}/{self.steps} loss {rec.loss:.4f} {rate:.2f} steps/s\n")
            self.stream.flush()
