"""The recorded output of a train run: one context manager from the lock to the committed file.

`recorded_output(...)` owns everything between "training may start" and "the trajectory is in place": the output's
lock (keyed on the file's real location, however its path is spelled), the resume point of `--resume` and the
checks before it is trusted, the temporary file the trajectory streams into, the recording ring whose writer
thread fills it (ring.py), the Trainer checkpoints and their marker (checkpoint.py), stop signals while training
(stopping.py: stop at the next step boundary, with a checkpoint of that step), and the end:
- commit (`RecordedOutput.commit`): every step through the ring, then one critical section in which stop signals
  wait, then the file is in place;
- on an error or a stop: stop the ring's writer thread, keep the partial file when a checkpoint can resume it,
  else remove it, and turn the error into one line that says which.
The ring is also drained before every checkpoint marker (a marker promises the partial trajectory up to its step)
and at the end of each run.

Test hook: with the environment variable FLANNEL_TEST_HOLD_COMMIT=PATH, the commit creates PATH and waits, inside
its critical section, until PATH is removed, so a test can signal the process at exactly that moment.

    with recorded_output(params, root, scalars, fp, digests, write=True, resume=False) as out:
        ring = out.record_steps(sinks, device)
        ...train, submitting each step to the ring...
    out.sha256
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError, Interrupted, signal_name
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.core.safetensors_header import dtype_name, read_header
from flannel_repro.data.masks import Masks
from flannel_repro.recording.checkpoint import (
    CheckpointCallback,
    Checkpoints,
    Marker,
    check_checkpoint,
    io_error_message,
    notice,
    run_done,
)
from flannel_repro.recording.recorder import FileSink
from flannel_repro.recording.ring import RING_SLOTS, RecordingRing
from flannel_repro.recording.stopping import StopSignals
from flannel_repro.trajectory.file import FORMAT, TORCH_DTYPES, TensorSpec, TrajectoryWriter
from flannel_repro.trajectory.layout import SCALARS, SCHEDULE_KEY, scalar_values, trajectory_layout
from flannel_repro.trajectory.packed import PackedFile, is_packed
from flannel_repro.trajectory.packed_writer import PackedWriter
from flannel_repro.trajectory.provenance import versions

History = Callable[[], dict[str, list[list[float]]]]


def metadata_scalars(params: Params, masks: Masks, w_initial: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every scalar of the notebook's save cell (layout.SCALARS) with the notebook's dtypes, and W_initial."""
    values = {**scalar_values(params), "n_live": masks.n_live, "n_dead": masks.n_dead}
    scalars = {name: torch.tensor(values[name], dtype=TORCH_DTYPES[dtype]) for name, (dtype, _) in SCALARS.items()}
    if params.record.steps != "every":  # layout.SCHEDULE_KEY: the training step of each recorded index
        scalars[SCHEDULE_KEY] = torch.tensor(params.record.schedule(params.train.steps), dtype=torch.int64)
    return {**scalars, "W_initial": w_initial}


@dataclass
class RecordedOutput:
    """What the training loop needs of the output; every field is None/empty when nothing is written."""

    params: Params
    path: Path
    stops: StopSignals | None = None  # stop signals of the stage; None: Python's own Ctrl-C, nothing else
    tracking_run: str | None = None  # the tracking run of this file, named in resume markers
    writer: TrajectoryWriter | None = None
    checkpoints: Checkpoints | None = None
    marker: Marker | None = None  # where a resumed run continues; None starts at step 0
    stopped_at: int | None = None  # the step at which a stop signal ended the current run's training
    committed: bool = False  # the trajectory is in place
    sha256: str | None = None  # set once the file is committed
    observers: list[Any] = field(default_factory=list)  # the file's own per-step sink, first of all
    ring: RecordingRing | None = None  # set by record_steps()

    @property
    def checkpointing(self) -> bool:
        return self.checkpoints is not None and self.params.train.checkpoint_every > 0

    def steps_done(self, run: int) -> int:
        """The last step of `run` already in the partial trajectory: all of an earlier run, 0..K of the resumed
        one; -1 when the run starts afresh."""
        if self.marker is None:
            return -1
        if run < self.marker.run:
            return self.params.train.steps
        return self.marker.step if run == self.marker.run and self.marker.step > 0 else -1

    def resume_checkpoint(self, run: int) -> Path | None:
        """The Trainer checkpoint `run` continues from, if it is the resumed run."""
        m = self.marker
        return m.checkpoint if m is not None and run == m.run and m.step > 0 else None

    def checkpoint_dir(self, run: int) -> Path | None:
        """The Trainer's output_dir for `run` when checkpoints are on (else a scratch folder is used)."""
        return self.checkpoints.dir / f"run-{run}" if self.checkpointing else None

    def record_steps(self, sinks: list[Any], device: torch.device, slots: int = RING_SLOTS) -> RecordingRing:
        """The ring every recorded step goes through: its writer thread feeds the file's own sink, then `sinks`, in
        step order (slots=0: on the training thread)."""
        self.ring = RecordingRing([*self.observers, *sinks], cuda=device.type == "cuda", slots=slots,
                                  file_sinks=len(self.observers))
        return self.ring

    def drain(self) -> None:
        """Every step submitted so far is in the file and seen by every sink; raises the writer thread's error."""
        if self.ring is not None:
            self.ring.drain()

    def stop_recording(self) -> None:
        """Stop the writer thread (the steps it has not started are dropped): nothing writes to the file after."""
        if self.ring is not None:
            self.ring.close()

    def callbacks(self, run: int, history: History) -> list[Any]:
        """Trainer callbacks of `run`: a resume marker after each checkpoint, and the stop at a step boundary."""
        callbacks: list[Any] = []
        if self.checkpointing:
            callbacks.append(CheckpointCallback(self.checkpoints, self.writer, run, self.params.to_json(), history,
                                                self.tracking_run, self.drain))
        if self.stops is not None:
            callbacks.append(StopCallback(self))
        return callbacks

    def run_done(self, run: int, history: History) -> None:
        """`run` has ended: complete (a resume then starts the next run afresh), or stopped by a signal, which is
        raised here; the checkpoint of the step it stopped at is then the resume point. Either way every step it
        recorded has gone through the ring first."""
        self.drain()
        runs = self.params.train.num_runs
        where = f" of run {run + 1}" if runs > 1 else ""
        if self.stopped_at is not None:
            name = signal_name(self.stops.requested)
            raise Interrupted(self.stops.requested, f"stopped by {name} after step {self.stopped_at}{where}; no output "
                                                    "was written")
        if self.checkpointing and run + 1 < runs:
            run_done(self.checkpoints, self.writer, run, self.params.to_json(), history(), self.tracking_run)
        if self.stops is not None and self.stops.requested is not None and run + 1 < runs:
            name = signal_name(self.stops.requested)
            raise Interrupted(self.stops.requested, f"stopped by {name} after run {run + 1}; no output was written")

    def commit(self) -> None:
        """Put the finished trajectory in place: the critical section of the run. Stop signals wait from here until
        the stage has written its reports too (`StopSignals.honour`), so the outputs are replaced together."""
        # Every step's slices must be in the temporary file before it is renamed into place (and every observer,
        # verify's check included, must have seen every step): drain the ring and stop its thread.
        self.drain()
        self.stop_recording()
        if self.stops is not None:
            self.stops.hold()
        if self.writer is None:
            return
        _test_hold()
        self.writer.commit()  # then the checkpoints go
        self.committed = True
        self.checkpoints.finish()
        self.sha256 = sha256_file(self.path)
        if self.stops is not None:
            self.stops.committed(f"{self.path} (sha256 {self.sha256})")


class StopCallback(TrainerCallback):
    """On a stop request: end training at this step boundary, with a checkpoint of this step when checkpoints are on
    (a preempted job loses no work). At the last step there is nothing to save: the run is complete."""

    def __init__(self, out: RecordedOutput) -> None:
        self.out = out

    def on_step_end(self, args, state, control, **kwargs):
        if self.out.stops.requested is None or state.global_step >= state.max_steps:
            return
        if self.out.checkpointing:
            control.should_save = True
        control.should_training_stop = True
        self.out.stopped_at = state.global_step


def _test_hold() -> None:
    """The test hook of the module docstring: wait inside the critical section while $FLANNEL_TEST_HOLD_COMMIT
    exists."""
    hold = os.environ.get("FLANNEL_TEST_HOLD_COMMIT")
    if not hold:
        return
    Path(hold).touch()
    while Path(hold).exists():
        time.sleep(0.01)


@contextlib.contextmanager
def recorded_output(
    params: Params,
    root: Path,
    scalars: dict[str, torch.Tensor],
    fp: dict[str, Any],
    input_digests: dict[str, str],
    *,
    write: bool,
    resume: bool,
    stops: StopSignals | None = None,
    tracking_run: str | None = None,
) -> Iterator[RecordedOutput]:
    """Open the trajectory output (write=False: nothing is written, errors are still remapped), yield it for the
    training loop, then commit it; see the module docstring for what happens on an error or a stop signal."""
    out = RecordedOutput(params, params.paths.under(root).trajectory, stops, tracking_run)
    if write:
        _open(out, root, fp, input_digests, resume)
    try:
        if out.writer is not None and out.marker is None:
            for name, value in scalars.items():
                out.writer.write(name, (), value)
        with stops.at_step_boundary() if stops is not None else contextlib.nullcontext():
            yield out
        out.commit()
    except BaseException as e:
        out.stop_recording()  # nothing writes to the file while it is kept or removed
        if out.committed:  # the file is in place; nothing to keep or remove
            raise
        raise _ended(out, e) from None


def _ended(out: RecordedOutput, e: BaseException) -> BaseException:
    """A failed or stopped run: keep or remove the partial file, and say which in the error's one line."""
    kept = _stop(out.writer, out.checkpoints) if out.writer is not None else None
    hint = f"; {kept}" if kept else ""
    if isinstance(e, KeyboardInterrupt):
        if isinstance(e, Interrupted) and not kept and out.writer is not None and not out.checkpointing:
            hint = "; checkpoints are off (train.checkpoint_every: 0), so nothing can resume it"
        text = str(e) if isinstance(e, Interrupted) else "interrupted; no output was written"
        return Interrupted(getattr(e, "signum", signal.SIGINT), f"{text}{hint}")
    if isinstance(e, FlannelError):
        return FlannelError(f"{e}{hint}") if kept else e
    if isinstance(e, OSError):
        return FlannelError(io_error_message(e, "trajectory") + hint)
    return e


def _open(out: RecordedOutput, root: Path, fp, input_digests, resume: bool) -> None:
    """Take the output's lock, find the resume point and check it, and open the temporary file (or the partial one).
    A resume that is refused leaves every file as it was: the partial trajectory, the marker and the checkpoints."""
    params = out.params
    specs = {name: TensorSpec(TORCH_DTYPES[s.dtype], s.shape) for name, s in trajectory_layout(params).items()}
    metadata = {
        "format": FORMAT,
        "params": params.to_json(),
        "versions": json.dumps(versions(), sort_keys=True),
        "fingerprint": json.dumps(fp, sort_keys=True),
        "inputs": json.dumps(input_digests, sort_keys=True),
    }
    checkpoints = Checkpoints(root, params.paths.trajectory, out.path)
    checkpoints.acquire()
    writer, marker = None, None
    try:
        marker = _resume_point(checkpoints, params, resume)
        if marker is not None:
            _check_partial(marker.temp, specs, metadata, out.path)
        checkpoints.clear(keep=marker.temp if marker else None)
        writer = _writer(params, out.path, specs, metadata, marker)
        if marker is not None and marker.step > 0:
            check_checkpoint(marker, writer, params.record.schedule(params.train.steps))
    except BaseException:
        if writer is not None:  # a resumed partial file is kept as it was
            writer.close() if marker is not None else writer.abort()
        checkpoints.release()
        raise
    out.writer, out.checkpoints, out.marker = writer, checkpoints, marker
    out.observers = [FileSink(writer, params)]


def _writer(params: Params, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str],
            marker: Marker | None) -> TrajectoryWriter:
    """The writer of record.format: a safetensors file, or the packed form (packed_writer.py), which on a resume
    keeps the frames up to the step the checkpoint holds (all of the runs before a run that starts afresh)."""
    temp = marker.temp if marker else None
    if params.record.format != "packed":
        return TrajectoryWriter(path, specs, metadata, resume_from=temp)
    keep = None
    if marker is not None:
        keep = (marker.run, marker.step) if marker.step > 0 else (
            (marker.run - 1, params.train.steps) if marker.run > 0 else None)
    return PackedWriter(path, specs, metadata, resume_from=temp, resume_at=keep)


def _resume_point(checkpoints: Checkpoints, params: Params, resume: bool) -> Marker | None:
    """The marker a resume continues from, checked against these params; None starts from step 0 (and the caller
    clears what is left)."""
    if not resume:
        return None
    marker = checkpoints.read_marker()
    if marker is None:
        notice("no interrupted run of this output to resume; starting from step 0")
        return None
    if marker.params != params.to_json():
        old, new = json.loads(marker.params), json.loads(params.to_json())
        diff = next((f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s, sec in new.items()
                     for k, v in sec.items() if old.get(s, {}).get(k) != v), "the params differ")
        raise FlannelError(
            f"{checkpoints.dir / 'resume.json'}: the interrupted run used other params ({diff}); restore them, or "
            "run `flannel-repro train` without --resume to start over"
        )
    why = marker.out_of_range(params.train.num_runs, params.train.steps)
    if why:
        raise checkpoints.corrupt(why)
    notice(f"resuming run {marker.run + 1}/{params.train.num_runs} after step {marker.step}")
    return marker


def _check_partial(temp: Path, specs: dict[str, TensorSpec], metadata: dict[str, str], out_path: Path) -> None:
    """Refuse to continue a partial trajectory recorded in another setting, naming the first field that differs
    (e.g. `fingerprint.torch_threads: 1 -> 2`)."""
    start_over = "or run `flannel-repro train` without --resume to start over"
    if not temp.is_file():
        if _completed_here(out_path, metadata):  # killed between the rename and the end of the commit
            raise FlannelError(f"{out_path}: the interrupted run had already put its complete trajectory here and "
                               "was stopped before its metrics were written; `flannel-repro check` confirms the "
                               "file, and `flannel-repro train` without --resume writes them (training again)")
        raise FlannelError(f"{temp}: the partial trajectory of the interrupted run is gone; run `flannel-repro "
                           "train` without --resume to start over")
    try:
        header = read_header(temp, "partial trajectory")
    except FlannelError as e:
        raise FlannelError(f"{e}; {start_over}") from None
    recorded = header.get("__metadata__") or {}
    diff = next((d for key in metadata if (d := _difference(key, recorded.get(key), metadata[key]))), None)
    if diff is None:
        for name, spec in specs.items():
            entry = header.get(name) or {}
            want = [dtype_name(spec.dtype), list(spec.shape)]
            if [entry.get("dtype"), entry.get("shape")] != want:
                diff = f"tensor {name}: {entry.get('dtype')} {entry.get('shape')} -> {want[0]} {want[1]}"
                break
    if diff is not None:
        raise FlannelError(f"{temp}: the interrupted run was recorded in another setting ({diff}); resume it in the "
                           f"same setting, {start_over}")


def _completed_here(out_path: Path, metadata: dict[str, str]) -> bool:
    """Whether the file at the output path was recorded with exactly this setting (params, versions, fingerprint and
    inputs): the trajectory of the interrupted run itself, complete."""
    try:
        if is_packed(out_path):
            with PackedFile(out_path) as pf:
                recorded = pf.header.get("__metadata__") or {}
        else:
            recorded = read_header(out_path, "trajectory").get("__metadata__") or {}
    except (FlannelError, OSError):
        return False
    return all(recorded.get(key) == value for key, value in metadata.items())


def _difference(key: str, old: str | None, new: str) -> str | None:
    """`key.field: old -> new` for the first field of a header metadata entry that differs, else None."""
    if old == new:
        return None
    try:
        old_doc, new_doc = json.loads(old), json.loads(new)
    except (TypeError, json.JSONDecodeError):
        return f"{key}: {old!r} -> {new!r}"
    flat_old, flat_new = _flatten(old_doc), _flatten(new_doc)
    for name in sorted(flat_old.keys() | flat_new.keys()):
        if flat_old.get(name) != flat_new.get(name):
            return f"{key}.{name}: {flat_old.get(name)!r} -> {flat_new.get(name)!r}"
    return f"{key}: {old!r} -> {new!r}"


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {prefix or "value": doc}
    flat: dict[str, Any] = {}
    for k, v in doc.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        flat.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return flat


def _stop(writer: TrajectoryWriter, checkpoints: Checkpoints) -> str | None:
    """A failed or interrupted run: keep the partial trajectory only if a checkpoint can resume it, and say how. (A
    close that fails, as on a full disk, keeps it too: the resume checks what the checkpoint holds and drops the
    rest.)"""
    marker = None
    with contextlib.suppress(FlannelError, OSError):
        marker = checkpoints.read_marker()
    if marker is not None and marker.temp == writer.tmp_path:
        with contextlib.suppress(FlannelError, OSError):
            writer.close()
        with contextlib.suppress(FlannelError, OSError):
            checkpoints.release()
        where = f"after run {marker.run + 1}, step {marker.step}" if marker.step else f"with run {marker.run + 1}"
        return f"`flannel-repro train --resume` continues {where}"
    writer.abort()
    checkpoints.clear()
    checkpoints.release()
    return None
