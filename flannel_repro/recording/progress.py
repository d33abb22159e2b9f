"""Progress on stderr: tqdm's live bar on a terminal (steps, elapsed, ETA, steps/s, loss), and otherwise (a log,
`dvc queue logs`) a line every N steps, `step 40/500 loss 6.1234 [00:49<09:24, 0.82 steps/s]`.

The rate is the mean over the steps trained so far, counted from the first run's start as the run's own
`steps_per_s` is, so the last line and the run's summary agree. `desc` names what trains ("train", "verify").
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from flannel_repro.recording.records import StepRecord

# tqdm's own layout, with the rate always in steps/s (tqdm turns a rate under 1 into s/step) as the run reports it.
BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class Progress:
    def __init__(self, runs: int, steps: int, every: int, stream: TextIO | None = None, desc: str = "train") -> None:
        self.runs, self.steps, self.every, self.desc = runs, steps, every, desc
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._t0 = time.perf_counter()
        self._first: int | None = None  # the first step shown (a resumed run starts past 0)
        self._bar: tqdm | None = None

    def __call__(self, rec: StepRecord) -> None:
        if rec.step == 0:
            return
        done = rec.run * self.steps + rec.step  # across the file's runs
        if self._first is None:
            self._first = done - 1
        elapsed = time.perf_counter() - self._t0
        rate = (done - self._first) / max(elapsed, 1e-9)
        run = f"run {rec.run + 1}/{self.runs} " if self.runs > 1 else ""
        postfix = f"{run}loss {rec.loss:.4f}"
        last = done == self.runs * self.steps
        if self.tty:
            if self._bar is None:
                self._bar = tqdm(total=self.runs * self.steps, initial=self._first, desc=self.desc, unit=" steps",
                                 file=self.stream, smoothing=0, dynamic_ncols=True, bar_format=BAR)
                self._bar.start_t = time.time() - elapsed  # counted from the run's start, as steps_per_s is
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(done - self._bar.n)
            if last:
                self._bar.close()
        elif rec.step % self.every == 0 or rec.step == self.steps:
            left = (self.runs * self.steps - done) / rate if rate > 0 else 0.0
            self.stream.write(f"{run}step {rec.step}/{self.steps} loss {rec.loss:.4f} [{tqdm.format_interval(elapsed)}"
                              f"<{tqdm.format_interval(left)}, {rate:.2f} steps/s]\n")
            self.stream.flush()
