"""How a train stage stops on SIGINT, SIGTERM or SIGHUP: Ctrl-C, a scheduler preempting the job, a closed terminal.

`StopSignals` holds the three handlers while the stage runs, in one of three modes:
- at once (start-up, tracking at the end): the signal raises `Interrupted` where the program is, as Ctrl-C does;
- at the next step boundary (while training): the request is only noted, and output.py's `StopCallback` has the
  Trainer write a checkpoint of that step and stop, so a preempted job loses no work. A second signal stops at once;
- deferred (from the trajectory's commit until the reports are written): the request waits, so the outputs are
  replaced together or not at all; `honour()` raises it afterwards, saying what was written.

    with StopSignals() as stops:
        result = train(params, root, stops=stops)   # commits the trajectory, then holds stop requests
        write_reports(params, result, root)
        stops.honour()
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from flannel_repro.core.errors import Interrupted, signal_name

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """The stop requests of one train stage (see the module docstring for the modes)."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the first stop signal received, not yet honoured
        self.written: str | None = None  # what the commit put in place, named by any later stop
        self._mode = "now"
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for s in STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # ignored by the caller (`nohup`): leave it so
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._mode == "defer" or (self._mode == "step" and self.requested is None):
            self.requested = self.requested or signum
            return
        raise self.interrupted(signum)

    def interrupted(self, signum: int | None = None) -> Interrupted:
        """The stop as an exception whose message says whether the output was replaced."""
        signum = signum or self.requested or signal.SIGINT
        if self.written:
            return Interrupted(signum, f"stopped by {signal_name(signum)} after the output was written: "
                                       f"{self.written}")
        return Interrupted(signum, f"stopped by {signal_name(signum)}; no output was written")

    @contextlib.contextmanager
    def at_step_boundary(self) -> Iterator[None]:
        """While training: a signal is a request that the training loop honours at the next step boundary."""
        self._mode = "step"
        try:
            yield
        finally:
            if self._mode == "step":
                self._mode = "now"

    def hold(self) -> None:
        """The commit starts: stop requests wait until `honour()`."""
        self._mode = "defer"

    def committed(self, what: str) -> None:
        """The trajectory is in place; `what` names it in the message of any later stop."""
        self.written = what

    def honour(self) -> None:
        """The stage's outputs are written: raise a stop request that came while they were, and stop at once on any
        later signal."""
        self._mode = "now"
        if self.requested is not None:
            raise self.interrupted()
