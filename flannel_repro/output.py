"""The recorded output of a train run: one context manager from the lock to the committed file.

`recorded_output(...)` owns everything between "training may start" and "the trajectory is in place": the output's
lock, the resume point of `--resume`, the temporary file the trajectory streams into, the Trainer checkpoints and
their marker (checkpoint.py), and the end: commit on success; on an error or Ctrl-C, keep the partial file when a
checkpoint can resume it, else remove it, and turn the error into one line that says which.

    with recorded_output(params, root, scalars, fp, digests, write=True, resume=False) as out:
        ...train, feeding out.observers...
    out.sha256
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointCallback, Checkpoints, Marker, io_error_message, notice, run_done
from .config import Params
from .errors import FlannelError
from .fsutil import sha256_file
from .masks import Masks
from .provenance import versions
from .recorder import FileSink, trajectory_specs
from .trajectory import FORMAT, TensorSpec, TrajectoryWriter

History = Callable[[], dict[str, list[list[float]]]]


def metadata_scalars(params: Params, masks: Masks, w_initial: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every scalar of the notebook's save cell, W_initial included, with the notebook's dtypes."""
    t, m, r = params.train, params.model, params.record
    i64 = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    b = lambda x: torch.tensor(x, dtype=torch.bool)  # noqa: E731
    return {
        "n_runs": i64(t.num_runs),
        "init_seed": i64(t.init_seed),
        "train_seed": i64(t.train_seed),
        "n_steps": i64(t.steps),
        "n_live": i64(masks.n_live),
        "n_dead": i64(masks.n_dead),
        "vocab_size": i64(m.vocab_size),
        "hidden_dim": i64(m.hidden_dim),
        "init_scale": f32(t.init_scale),
        "learning_rate": f32(t.learning_rate),
        "weight_decay": f32(t.weight_decay),
        "adam_beta1": f32(t.adam_beta1),
        "adam_beta2": f32(t.adam_beta2),
        "W_initial": w_initial,
        "recorded_W": b(r.W),
        "recorded_grads": b(r.grads),
        "recorded_losses": b(r.losses),
        "recorded_momentum": b(r.momentum),
        "recorded_variance": b(r.variance),
    }


@dataclass
class RecordedOutput:
    """What the training loop needs of the output; every field is None/empty when nothing is written."""

    params: Params
    path: Path
    writer: TrajectoryWriter | None = None
    checkpoints: Checkpoints | None = None
    marker: Marker | None = None  # where a resumed run continues; None starts at step 0
    sha256: str | None = None  # set once the file is committed
    observers: list[Any] = field(default_factory=list)  # the file's own per-step sink, first of all

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

    def callbacks(self, run: int, history: History) -> list[Any]:
        """Trainer callbacks that publish a resume marker after each checkpoint of `run`."""
        if not self.checkpointing:
            return []
        return [CheckpointCallback(self.checkpoints, self.writer, run, self.params.to_json(), history)]

    def run_done(self, run: int, history: History) -> None:
        """`run` is complete: a resume starts the next run afresh."""
        if self.checkpointing and run + 1 < self.params.train.num_runs:
            run_done(self.checkpoints, self.writer, run, self.params.to_json(), history())


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
) -> Iterator[RecordedOutput]:
    """Open the trajectory output (write=False: nothing is written, errors are still remapped), yield it for the
    training loop, then commit it; see the module docstring for what happens on an error."""
    out = RecordedOutput(params, params.paths.under(root).trajectory)
    if write:
        _open(out, root, scalars, fp, input_digests, resume)
    writer, checkpoints = out.writer, out.checkpoints
    try:
        if writer is not None and out.marker is None:
            for name, value in scalars.items():
                writer.write(name, (), value)
        yield out
        if writer is not None:
            writer.commit()
            checkpoints.finish()
            out.sha256 = sha256_file(out.path)
    except BaseException as e:
        kept = _stop(writer, checkpoints) if writer is not None else None
        if kept is None and not isinstance(e, OSError):
            raise
        hint = f"; {kept}" if kept else ""
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted; no output was written{hint}") from None
        if isinstance(e, FlannelError):
            raise FlannelError(f"{e}{hint}") from None
        if isinstance(e, OSError):
            raise FlannelError(io_error_message(e, "trajectory") + hint) from None
        raise


def _open(out: RecordedOutput, root: Path, scalars, fp, input_digests, resume: bool) -> None:
    """Take the output's lock, find the resume point and open the temporary file (or the partial one)."""
    params, cfg, mcfg = out.params, out.params.train, out.params.model
    specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in scalars.items()}
    specs.update(trajectory_specs(params.record, cfg.num_runs, cfg.steps, mcfg.vocab_size, mcfg.hidden_dim,
                                  cfg.batch_size))
    metadata = {
        "format": FORMAT,
        "params": params.to_json(),
        "versions": json.dumps(versions(), sort_keys=True),
        "fingerprint": json.dumps(fp, sort_keys=True),
        "inputs": json.dumps(input_digests, sort_keys=True),
    }
    checkpoints = Checkpoints(root, params.paths.trajectory, out.path)
    checkpoints.acquire()
    try:
        marker = _resume_point(checkpoints, params, resume)
        checkpoints.clear(keep=marker.temp if marker else None)
        writer = TrajectoryWriter(out.path, specs, metadata, resume_from=marker.temp if marker else None)
    except BaseException:
        checkpoints.release()  # the marker and partial file stay as they were
        raise
    out.writer, out.checkpoints, out.marker = writer, checkpoints, marker
    out.observers = [FileSink(writer, params.record)]


def _resume_point(checkpoints: Checkpoints, params: Params, resume: bool) -> Marker | None:
    """The marker a resume continues from; None starts from step 0 (and the caller clears what is left)."""
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
    notice(f"resuming run {marker.run + 1}/{params.train.num_runs} after step {marker.step}")
    return marker


def _stop(writer: TrajectoryWriter, checkpoints: Checkpoints) -> str | None:
    """A failed or interrupted run: keep the partial trajectory only if a checkpoint can resume it, and say how."""
    with contextlib.suppress(FlannelError, OSError):
        marker = checkpoints.read_marker()
        if marker is not None and marker.temp == writer.tmp_path:
            writer.close()
            checkpoints.release()
            where = f"after run {marker.run + 1}, step {marker.step}" if marker.step else f"with run {marker.run + 1}"
            return f"`flannel-repro train --resume` continues {where}"
    writer.abort()
    checkpoints.clear()
    checkpoints.release()
    return None
