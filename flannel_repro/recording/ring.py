"""The recording ring: each step's tensors leave the training thread through a bounded ring of host buffers, and one
writer thread digests them, writes them and hands them to the step observers, in step order.

The training thread (`recorder.TrajectoryCallback`) takes a free slot with `acquire()`, copies the step's (V, H)
tensors (and its loss, gradient norm and batch) into it (`Slot.copy`: on CUDA into pinned host memory with
non-blocking copies, then an event marks the slot ready; on the CPU a plain copy) and `submit()`s the StepRecord. It
waits only when every slot is still in flight. The writer thread takes the steps in order: it waits for the slot's
event, reads the step's loss, gradient norm and batch from the slot (`StepRecord.settle`), computes each slice's
sha256, and calls every sink (the file's own first), then frees the slot. A sink must copy what it keeps of
`rec.tensors`: the buffers are reused.

An error in the writer thread (a full disk, an observer that raises, verify's divergence) stops it: the steps after
the failed one reach no sink, and the training thread re-raises that same exception at its next `acquire`, `submit`
or `drain`, so the run fails at the next step. `drain()` returns once every submitted step went through every sink
(output.py calls it before a checkpoint marker, at the end of each run and before the commit); `close()` stops the
thread and drops the steps it has not started (on an error or Ctrl-C, before the file is kept or removed).

`slots=0` records synchronously: each step is digested and handed to the sinks on the training thread, in `submit`
(the benchmark's baseline, and for debugging: an observer's error then surfaces at its own step).

    ring = RecordingRing(sinks, cuda=device.type == "cuda")
    slot = ring.acquire()                               # training thread, after the optimizer step
    rec = StepRecord(..., tensors={"W": slot.copy("W", weight)})
    slot.ready()
    ring.submit(rec, slot)
    ...
    ring.drain()                                        # before a marker or the commit
    ring.close()
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import torch

from flannel_repro.recording.records import StepRecord, StepSink
from flannel_repro.trajectory.file import digest

RING_SLOTS = 4  # steps in flight between the training thread and the writer; 2.56 MB each with W and grad_W
OBSERVER_GRACE_S = 1.0  # how long close() lets an observer call finish before it leaves it running (a hung store)


class Slot:
    """One step's host buffers, allocated at first use and reused."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda  # page-locked buffers, so device-to-host copies run without blocking the host
        self.tensors: dict[str, torch.Tensor] = {}
        self._event: torch.cuda.Event | None = None

    def copy(self, name: str, source: torch.Tensor) -> torch.Tensor:
        """Copy `source` (any device) into this slot's buffer `name`, enqueued without waiting on CUDA."""
        buf = self._buffer(name, source.shape, source.dtype)
        buf.copy_(source.detach(), non_blocking=self.cuda)
        return buf

    def zero(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffer(name, shape, dtype)
        buf.zero_()
        return buf

    def ready(self) -> None:
        """Every copy into this slot is enqueued: mark the point the writer waits for (CUDA)."""
        if self.cuda:
            if self._event is None:
                self._event = torch.cuda.Event(blocking=True)  # the writer sleeps until it completes, no spinning
            self._event.record()  # on the current stream, after the copies

    def wait(self) -> None:
        """Until the copies into this slot have landed (at once on the CPU)."""
        if self._event is not None:
            self._event.synchronize()

    def _buffer(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        buf = self.tensors.get(name)
        if buf is None or buf.dtype != dtype or tuple(buf.shape) != tuple(shape):
            buf = torch.empty(tuple(shape), dtype=dtype, pin_memory=self.cuda)
            self.tensors[name] = buf
        return buf


class RecordingRing:
    """The slots, the writer thread and the sinks it feeds, in order (see the module docstring)."""

    def __init__(self, sinks: Sequence[StepSink], *, cuda: bool, slots: int = RING_SLOTS, file_sinks: int = 0) -> None:
        if slots < 0:
            raise ValueError(f"slots must be >= 0, got {slots}")
        self.sinks = list(sinks)
        self.file_sinks = file_sinks  # the first sinks write the output file: close() waits while one is running
        self._free = [Slot(cuda) for _ in range(max(slots, 1))]
        self._threaded = slots > 0
        self._queue: collections.deque[tuple[StepRecord, Slot]] = collections.deque()  # submitted, not yet taken
        self._busy = False  # the writer is processing a step
        self._in_sink: int | None = None  # the index of the sink the writer is in, if any
        self.abandoned = False  # close() returned while an observer call was still in progress
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if self._threaded:
            # A daemon, so that nothing can keep the process alive; close() joins it on every path that ends a run.
            threads = torch.get_num_threads()  # the training thread's
            started = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(started,), name="flannel-recorder", daemon=True)
            self._thread.start()
            started.wait()
            # The writer set its own intra-op threads to 1, which also changed torch's process-wide default for
            # threads started later; put that back to the training thread's count (which itself is unchanged).
            torch.set_num_threads(threads)

    # -- the training thread ----------------------------------------------------------------------------------------
    def acquire(self) -> Slot:
        """A free slot, waiting while every slot is in flight; raises the writer's error, if any."""
        with self._cond:
            while not self._free and self._error is None:
                self._cond.wait()
            self._raise_error()
            return self._free.pop()

    def submit(self, rec: StepRecord, slot: Slot) -> None:
        """Hand a step whose tensors are in `slot` to the writer (or, with slots=0, record it here and now)."""
        if not self._threaded:
            try:
                self._process(rec, slot)
            finally:
                self._free.append(slot)
            return
        with self._cond:
            self._raise_error()
            self._queue.append((rec, slot))
            self._cond.notify_all()

    def release(self, slot: Slot) -> None:
        """Give back a slot that was acquired but will not be submitted."""
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted step went through every sink; raises the writer's error, if any."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()
            self._raise_error()

    def close(self) -> None:
        """Stop the writer thread: it takes no further step nor sink, and the steps it has not started are dropped.
        Returns once nothing writes to the file: it waits for a file sink the writer is in, and up to
        OBSERVER_GRACE_S for an observer call; one that takes longer (a tracking store that stopped answering must
        not hold up a stop, a second Ctrl-C above all) is left to finish on the daemon thread, nothing runs after
        it, and each sink with an `abandoned()` hook is told. Does not raise the writer's error (it runs while a run
        is being abandoned, or after the final drain); idempotent."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
            while self._in_sink is not None and self._in_sink < self.file_sinks:
                self._cond.wait()
            left = not self._cond.wait_for(lambda: self._in_sink is None, timeout=OBSERVER_GRACE_S)
        if left and not self.abandoned:  # whatever that call waits on, the others must not wait on it too
            self.abandoned = True
            for sink in self.sinks:
                hook = getattr(sink, "abandoned", None)
                if callable(hook):
                    hook()
        if not left and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writer thread ------------------------------------------------------------------------------------------
    def _run(self, started: threading.Event) -> None:
        # The writer's own tensor work (token motion's norms) runs on this thread alone: with torch's intra-op
        # threads it would start a second team of OpenMP workers beside the training thread's, and recording would
        # slow training more than recording on the training thread does (README, Benchmarks: the tiny-step case).
        try:
            torch.get_num_threads()  # torch's per-thread set-up first: it would later reset the count to the default
            torch.set_num_threads(1)
        finally:
            started.set()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                rec, slot = self._queue.popleft()
                self._busy = True
            try:
                self._process(rec, slot)
            except BaseException as e:  # re-raised on the training thread; this thread takes no further step
                with self._cond:
                    self._error, self._busy = e, False
                    self._queue.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._free.append(slot)
                self._cond.notify_all()

    def _process(self, rec: StepRecord, slot: Slot) -> None:
        slot.wait()
        rec.settle()
        rec.digests = {name: digest(t) for name, t in rec.tensors.items()}
        for i, sink in enumerate(self.sinks):
            with self._cond:
                if self._closed:  # close() has returned or is waiting for the file sinks: no further sink runs
                    return
                self._in_sink = i
            try:
                sink(rec)
            finally:
                with self._cond:
                    self._in_sink = None
                    self._cond.notify_all()
