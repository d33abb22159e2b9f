"""Resumable training: the Trainer's own checkpoints, the partial trajectory and the marker that ties them.

With `train.checkpoint_every: K`, every K steps the Trainer saves model, optimizer, scheduler and every RNG state
under `<root>/.flannel/checkpoints/<paths.trajectory>/run-<r>/checkpoint-<step>/` (outside every DVC output), the
partial trajectory (the writer's temporary file beside the output) is flushed to disk, and only then `resume.json`
is replaced atomically: {run, step, temp trajectory, checkpoint, params, per-step scalars}. A marker therefore
always names a complete checkpoint and a trajectory durable up to its step. `flannel-repro train --resume` reads
it, reopens the partial trajectory and lets `Trainer.train(resume_from_checkpoint=...)` continue from step K + 1.

The checkpoint folder, and the lock file in it that keeps two runs from writing the same trajectory, are keyed on
where the output really is (its folder with symlinks resolved), not on how params.yaml spells it: `x`, `./x` and
`/abs/x` are one output. Temporary trajectories of dead runs are removed when the next run of that output starts.

Before a resume trusts a checkpoint (`check_checkpoint`), its step must be the marker's, every file must load as
plain tensors, and its embedding W (and Adam's moments of W, when recorded) must hash to the digests the trajectory
recorded at that step. The Trainer then loads the files with `torch.load(..., weights_only=True)` (transformers
5.24); the pickled `training_args.bin` it also writes is deleted at once and never read. The marker itself is
plain JSON, checked for size, types and ranges before anything trusts it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import TMP_PREFIX, pid_alive, write_failure, write_json
from flannel_repro.core.safetensors_header import read_header
from flannel_repro.trajectory.file import TrajectoryWriter, digest
from flannel_repro.trajectory.packed_writer import frames_companion

MARKER = "resume.json"
MARKER_FORMAT = "flannel-resume/1"
_MARKER_LIMIT = 64 * 1024 * 1024  # a marker holds a few floats per step; anything larger is not ours
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
# Per-step scalars kept in the marker, so metrics and reports of a resumed run match an uninterrupted one exactly.
HISTORY_KEYS = ("losses", "grad_norms", "lrs")


@dataclass(frozen=True)
class Marker:
    run: int  # runs before this one are complete in the partial trajectory
    step: int  # steps 0..step of `run` are in the trajectory; 0 = start `run` afresh
    temp: Path  # the partial trajectory, beside the output
    checkpoint: Path | None  # the Trainer checkpoint after `step` of `run`; None when step == 0
    params: str  # Params.to_json() of the interrupted run
    history: dict[str, list[list[float]]]  # HISTORY_KEYS -> (runs, steps+1), NaN where not yet trained
    tracking_run: str | None = None  # the tracking run of the interrupted run, linked from the resumed one

    def out_of_range(self, runs: int, steps: int) -> str | None:
        """Why this marker cannot belong to a run of `runs` x `steps` (train.num_runs, train.steps), or None."""
        if self.run >= runs:
            return f"run {self.run + 1} of a file of train.num_runs = {runs}"
        if self.step >= steps:
            return f"step {self.step} of a run of train.steps = {steps}"
        shapes = {k: (len(rows), {len(r) for r in rows}) for k, rows in self.history.items()}
        if any(shape != (runs, {steps + 1}) for shape in shapes.values()):
            return f"its history is not {runs} x {steps + 1} values"
        return None


def checkpoint_root(root: Path, trajectory: str | Path) -> Path:
    """Where the checkpoints and the lock of the run writing `<root>/<trajectory>` live: mirrors where the output
    really is (its folder's real path, under the project root when it is inside), so every spelling of one output
    shares one folder. The file name itself is not resolved: the commit replaces a symlink there, not its target."""
    root = Path(root).resolve()
    out = root / trajectory
    real = out.parent.resolve() / out.name
    try:
        rel = real.relative_to(root)
    except ValueError:
        rel = Path(*real.parts[1:])
    return root / ".flannel" / "checkpoints" / rel


def owner_pid(temp: Path) -> int | None:
    """The pid encoded in a temporary trajectory's name (`.flannel-tmp-<name>.<pid>.<random>`)."""
    m = re.search(r"\.(\d+)\.[^.]+$", temp.name)
    return int(m.group(1)) if m else None


class Checkpoints:
    """The checkpoint folder of one output: its lock, its marker and its cleanup."""

    def __init__(self, root: Path, trajectory: str | Path, out_path: Path) -> None:
        self.dir = checkpoint_root(root, trajectory)
        self.out_path = Path(out_path)
        self._lock_fd: int | None = None

    # -- lock ---------------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the output's lock for this process's lifetime (released on exit, even on kill -9)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FlannelError(f"{self.dir}: cannot create the checkpoint folder ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FlannelError(
                f"{self.out_path}: another `flannel-repro train` (pid {holder}) is writing this trajectory; wait "
                "for it to finish or set another paths.trajectory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- marker -------------------------------------------------------------------------------------------------
    def read_marker(self) -> Marker | None:
        path = self.dir / MARKER
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size > _MARKER_LIMIT:
            raise self.corrupt(f"{size} bytes, more than a marker can be")
        try:
            doc = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self.corrupt("not JSON") from None
        try:
            if doc["format"] != MARKER_FORMAT:
                raise ValueError("format")
            run, step, params = doc["run"], doc["step"], doc["params"]
            temp, ckpt = doc["temp"], doc["checkpoint"]
            if not (isinstance(run, int) and isinstance(step, int) and run >= 0 and step >= 0):
                raise ValueError("run/step")
            if not isinstance(params, str):
                raise ValueError("params")
            # Only bare names inside our own folders: a marker cannot point the writer at another file.
            ours = TMP_PREFIX + self.out_path.name + "."
            if not (isinstance(temp, str) and temp.startswith(ours) and "/" not in temp):
                raise ValueError("temp")
            if step > 0 and not (isinstance(ckpt, str) and re.fullmatch(rf"run-{run}/checkpoint-{step}", ckpt)):
                raise ValueError("checkpoint")
            history = {k: [[math.nan if x is None else float(x) for x in row] for row in doc["history"][k]]
                       for k in HISTORY_KEYS}
            tracking_run = doc.get("tracking_run")
            if not (tracking_run is None or (isinstance(tracking_run, str) and re.fullmatch(r"[\w-]{1,64}",
                                                                                            tracking_run))):
                raise ValueError("tracking_run")
        except (KeyError, TypeError, ValueError) as e:
            raise self.corrupt(f"bad or missing {e}") from None
        checkpoint = self.dir / ckpt if step > 0 else None
        if checkpoint is not None:
            missing = [f for f in _CHECKPOINT_FILES if not (checkpoint / f).is_file()]
            if missing:
                raise self.corrupt(f"its checkpoint {checkpoint} lacks {', '.join(missing)}")
        return Marker(run, step, self.out_path.parent / temp, checkpoint, params, history, tracking_run)

    def corrupt(self, why: str) -> FlannelError:
        return FlannelError(f"{self.dir / MARKER}: resume marker is corrupt ({why}); run `flannel-repro train` "
                            "without --resume to start over")

    def write_marker(self, run: int, step: int, temp: Path, history: dict[str, list[list[float]]], params: str,
                     tracking_run: str | None = None) -> None:
        doc = {
            "format": MARKER_FORMAT,
            "run": run,
            "step": step,
            "temp": temp.name,
            "checkpoint": f"run-{run}/checkpoint-{step}" if step > 0 else None,
            "params": params,
            "history": {k: [[None if math.isnan(x) else x for x in row] for row in rows]
                        for k, rows in history.items()},
            "tracking_run": tracking_run,
        }
        write_json(self.dir / MARKER, doc)  # temp + fsync + rename: a marker is complete or absent

    # -- cleanup ------------------------------------------------------------------------------------------------
    def clear(self, keep: Path | None = None) -> None:
        """Remove the marker, every run's checkpoints and the temporary trajectories of dead runs of this output
        (all but `keep`, the partial trajectory a resume continues)."""
        if keep is None:
            (self.dir / MARKER).unlink(missing_ok=True)
            for d in self.dir.glob("run-*"):
                shutil.rmtree(d, ignore_errors=True)
        kept = {keep, frames_companion(self.out_path, keep)} if keep is not None else set()
        for temp in self.out_path.parent.glob(f"{TMP_PREFIX}{self.out_path.name}.*"):
            pid = owner_pid(temp)
            if temp not in kept and (pid is None or pid == os.getpid() or not pid_alive(pid)):
                temp.unlink(missing_ok=True)

    def finish(self) -> None:
        """The trajectory is committed: nothing is left to resume."""
        (self.dir / MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()
        with contextlib.suppress(OSError):  # drop empty parents up to .flannel/checkpoints
            parent = self.dir.parent
            while parent.name != "checkpoints" and parent != parent.parent:
                parent.rmdir()
                parent = parent.parent

    def prune(self, run: int, keep: Path | None) -> None:
        """Delete every checkpoint but `keep` (the one the marker names)."""
        for d in self.dir.glob("run-*/checkpoint-*"):
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.dir.glob("run-*"):
            if d.name != f"run-{run}":
                shutil.rmtree(d, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointCallback(TrainerCallback):
    """After each Trainer checkpoint: drain the recording ring, make the trajectory durable, then publish the marker,
    then prune."""

    def __init__(
        self,
        checkpoints: Checkpoints,
        writer: TrajectoryWriter,
        run: int,
        params_json: str,
        history: Callable[[], dict[str, list[list[float]]]],
        tracking_run: str | None,
        drain: Callable[[], None],
    ) -> None:
        self.checkpoints, self.writer, self.run = checkpoints, writer, run
        self.params_json, self.history, self.tracking_run = params_json, history, tracking_run
        self.drain = drain  # waits until every recorded step so far is in the trajectory (the recording ring)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False  # the finished run is committed instead

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs: never left to be loaded
        self.drain()  # steps up to this one are in the trajectory (and in the history) before the marker says so
        try:
            fsync_tree(folder)
            self.writer.flush()
        except OSError as e:
            raise FlannelError(io_error_message(e, "checkpoint")) from None
        self.checkpoints.write_marker(self.run, state.global_step, self.writer.tmp_path, self.history(),
                                      self.params_json, self.tracking_run)
        self.checkpoints.prune(self.run, keep=folder)


def run_done(checkpoints: Checkpoints, writer: TrajectoryWriter, run: int, params_json: str, history,
             tracking_run: str | None = None) -> None:
    """Run `run` is complete in the trajectory: a resume starts the next run afresh."""
    writer.flush()
    checkpoints.write_marker(run + 1, 0, writer.tmp_path, history, params_json, tracking_run)
    checkpoints.prune(run + 1, keep=None)


def check_checkpoint(marker: Marker, writer: TrajectoryWriter, schedule: tuple[int, ...]) -> None:
    """Before a resume trusts `marker.checkpoint`: its step is the marker's, every file loads as plain tensors, and
    W (and Adam's moments of W, when recorded) hash to what the partial trajectory recorded at that step, when
    `schedule` (record.steps) recorded it."""
    folder = marker.checkpoint
    index = schedule.index(marker.step) if marker.step in schedule else None
    idx = (marker.run, index)
    start_over = "run `flannel-repro train` without --resume to start over"
    state_path = folder / "trainer_state.json"
    try:
        step = json.loads(state_path.read_bytes())["global_step"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise FlannelError(f"{state_path}: checkpoint file is corrupt (no global_step); {start_over}") from None
    if step != marker.step:
        raise FlannelError(f"{state_path}: the checkpoint is of step {step!r}, its resume marker says step "
                           f"{marker.step}; {start_over}")
    weights = folder / "model.safetensors"
    read_header(weights, "checkpoint weights file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            w = f.get_tensor(_EMBEDDING)  # (V, H) bf16
    except (SafetensorError, OSError, KeyError, ValueError):
        raise FlannelError(f"{weights}: checkpoint weights file is corrupt or not this model's (no readable "
                           f"{_EMBEDDING}); {start_over}") from None
    tensors = {"W": w}
    moments = [n for n in ("momentum", "variance") if f"digest_{n}" in writer.specs]
    states = {name: _load_plain(folder / name, start_over) for name in ("optimizer.pt", "scheduler.pt",
                                                                         "rng_state.pth")}
    if moments:
        adam = [s for s in states["optimizer.pt"].get("state", {}).values()
                if isinstance(s, dict) and getattr(s.get("exp_avg"), "shape", None) == w.shape]
        if len(adam) == 1:
            tensors.update(momentum=adam[0]["exp_avg"], variance=adam[0].get("exp_avg_sq"))
    for name, t in tensors.items():
        if f"digest_{name}" not in writer.specs or index is None:  # not recorded: nothing to compare with
            continue
        recorded = bytes(writer.read(f"digest_{name}", idx).tolist())
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or digest(t) != recorded:
            where = weights if name == "W" else folder / "optimizer.pt"
            raise FlannelError(
                f"{where}: the checkpoint's {name} is not the one the trajectory recorded at run {marker.run + 1}, "
                f"step {marker.step} (digest_{name} differs): the checkpoint was altered or is another run's; "
                f"{start_over}"
            )


_EMBEDDING = "transformer.wte.weight"  # W in the Trainer's model.safetensors (the tied lm_head is not stored twice)


def _load_plain(path: Path, start_over: str):
    """A Trainer checkpoint file loaded as the Trainer will load it: weights_only (tensors and plain containers),
    plus numpy arrays in the RNG state, as the Trainer allows there."""
    from transformers.trainer_pt_utils import safe_globals

    allow = safe_globals() if path.name == "rng_state.pth" else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), allow:  # e.g. "Detected pickle protocol 4": said below in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FlannelError(f"{path}: checkpoint file is not a plain tensor file (safe loading refuses what it holds, "
                           f"and it is never loaded otherwise); {start_over}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise FlannelError(f"{path}: checkpoint file is corrupt ({why}); {start_over}") from None


def io_error_message(e: OSError, what: str) -> str:
    where = e.filename or "the output folder"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why, fix = write_failure(e, Path(e.filename).parent if e.filename else Path("."))
        return f"{where}: cannot write the {what} ({why}); {fix} and run again"
    return f"{where}: I/O error while writing the {what} ({e.strerror})"


def notice(text: str) -> None:
    print(f"flannel-repro train: {text}", file=sys.stderr)
