"""The training itself: `train(params, root)`, the notebook's procedure with the recorder attached.

The notebook's procedure exactly: GPT2LMHeadModel with tied embeddings, dropouts 0 and bfloat16 weights; W_initial
drawn in float32 from `init_seed` and cast to bfloat16; the notebook's TokenDataset windows; HF Trainer with the
notebook's TrainingArguments (hf.py: adamw_torch, bf16, linear schedule, default clipping) and the same seeds, so
the same data order. Recording happens in `recording.recorder.TrajectoryCallback`, which hands each step to the
recording ring (recording/ring.py): a writer thread digests and writes it into the output file and feeds the
observers, off the training thread. The output's lifecycle (lock, resume point, ring, checkpoints, commit or
abort) is recording/output.py's. Used by the train stage (stage.py), `verify`'s rerun and the benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers.utils import logging as hf_logging

from flannel_repro.core.config import Params
from flannel_repro.data.masks import Masks
from flannel_repro.recording.checkpoint import HISTORY_KEYS
from flannel_repro.recording.indicators import TokenIndicators
from flannel_repro.recording.motion import TokenMotion
from flannel_repro.recording.output import RecordedOutput, metadata_scalars, recorded_output
from flannel_repro.recording.progress import Progress
from flannel_repro.recording.recorder import TrajectoryCallback
from flannel_repro.recording.records import StepObserver, StepRecord
from flannel_repro.recording.ring import RING_SLOTS, RecordingRing
from flannel_repro.recording.stopping import StopSignals
from flannel_repro.tracing.callback import StepTraces, TraceCallback, trace_header
from flannel_repro.tracing.file import write_trace
from flannel_repro.tracking.base import Tracker
from flannel_repro.training.hf import make_trainer, scratch_dir, training_arguments
from flannel_repro.training.inputs import load_inputs
from flannel_repro.training.model import (
    TokenDataset,
    build_model,
    check_single_device,
    initial_embedding,
    pick_device,
    set_determinism,
)
from flannel_repro.training.preflight import check_before_training
from flannel_repro.training.result import TrainResult
from flannel_repro.trajectory.file import TrajectoryWriter
from flannel_repro.trajectory.layout import STEP_TENSORS
from flannel_repro.trajectory.provenance import fingerprint


class _Collect:
    """Keeps the per-step scalars for metrics, the loss curve and tracking summaries."""

    def __init__(self, runs: int, steps: int) -> None:
        self.losses = [[math.nan] * (steps + 1) for _ in range(runs)]
        self.grad_norms = [[math.nan] * (steps + 1) for _ in range(runs)]
        self.lrs = [[math.nan] * (steps + 1) for _ in range(runs)]

    def history(self) -> dict[str, list[list[float]]]:
        return {"losses": self.losses, "grad_norms": self.grad_norms, "lrs": self.lrs}

    def restore(self, history: dict[str, list[list[float]]]) -> None:
        """Scalars of the steps before a resume point, from the resume marker (exact floats)."""
        saved_rows = [history[k] for k in HISTORY_KEYS]
        for mine, theirs in zip((self.losses, self.grad_norms, self.lrs), saved_rows, strict=True):
            for row, saved in zip(mine, theirs, strict=False):
                row[: len(saved)] = saved[: len(row)]

    def __call__(self, rec: StepRecord) -> None:
        self.losses[rec.run][rec.step] = rec.loss
        self.grad_norms[rec.run][rec.step] = rec.grad_norm
        self.lrs[rec.run][rec.step] = rec.learning_rate


def train(
    params: Params,
    root: Path = Path("."),
    *,
    observers: Sequence[Any] = (),
    write: bool = True,
    record: bool = True,
    progress: bool = True,
    resume: bool = False,
    stops: StopSignals | None = None,
    ring_slots: int = RING_SLOTS,
    checked: bool = False,
    traces: StepTraces | None = None,
) -> TrainResult:
    """Run training with `params` and record the trajectory to `params.paths.trajectory` (under `root`).

    observers: what watches the run besides the file (tracking, verify), each with any of `recorded_scalars(d)`,
    given W_initial and the scalars before training, `start_run(run, seed)` and `end_run(run)`, told when each of
    the `num_runs` runs begins and ends, and `__call__(StepRecord)`, given
    every step in order on the recording ring's writer thread (ring.py). write=False records nothing to disk
    (verify); record=False turns recording off entirely (the benchmark's baseline). resume=True continues the
    interrupted run of this output from its last checkpoint (see checkpoint.py); the steps before it are replayed to
    the observers from the partial trajectory, so they see exactly what an uninterrupted run shows them, and an
    observer with a `resumed_from(tracking_run)` hook is told which tracking run was interrupted. stops: the stage's
    stop signals; training then stops at a step boundary with a checkpoint of that step, and the commit is a
    critical section (see output.py). ring_slots: steps in flight between training and the writer thread; 0 records
    on the training thread itself (the benchmark's synchronous baseline; an observer's error then surfaces at its
    own step). checked: the caller (the train stage) has already run `check_before_training`. traces: the steps to
    trace and where their op traces go (tracing/callback.py); by default a run that writes its trajectory traces
    `record.trace_steps` into `paths.trace`, written once the trajectory is committed.
    """
    root, cfg = Path(root), params.train
    # Device and inputs, checked before anything is opened or trained.
    device = _prepare(params, root, write, resume, checked)
    inputs = load_inputs(params, root)
    fp = fingerprint(device)
    w_initial = initial_embedding(params.model, cfg)
    scalars = metadata_scalars(params, inputs.masks, w_initial)
    _each(observers, "recorded_scalars", scalars)  # verify checks them against the reference
    collect = _Collect(cfg.num_runs, cfg.steps)
    tracking_run = next((o.run_id for o in observers if isinstance(o, Tracker)), None)
    motion = TokenMotion(inputs.masks, cfg.num_runs, cfg.steps)  # before the other observers: they see rec.motion
    indicators = TokenIndicators(inputs.masks, cfg.num_runs, cfg.steps)  # likewise
    saved = traces is None and write and record  # the run's own traces, kept beside the trajectory
    traces = StepTraces(params.record.trace_steps) if saved else traces
    # The output: lock, resume point, temporary file and checkpoints; committed when the block ends, else kept
    # for --resume or removed.
    with recorded_output(params, root, scalars, fp, inputs.input_digests, write=write and record,
                         resume=resume, stops=stops, tracking_run=tracking_run) as out:
        if out.marker:
            collect.restore(out.marker.history)
            if out.marker.tracking_run:
                _each(observers, "resumed_from", out.marker.tracking_run)
        sinks = [o for o in observers if callable(o)]  # per-step observers; the others have run hooks only
        # The file has these steps already, and progress is not shown again.
        replayed = [collect, motion, indicators, *sinks]
        shown = [Progress(cfg.num_runs, cfg.steps, cfg.log_every)] if progress else []
        # record=False (the benchmark's baseline) trains without the recorder: no per-step copies of W or grad_W.
        ring = out.record_steps([*replayed, *shown], device, ring_slots) if record else None
        dataset = TokenDataset(inputs.tokens.to(device), params.model.max_seq_len, cfg.label_mode)
        setup = _Setup(params, device, w_initial, dataset, ring, traces)
        start = time.perf_counter()
        for run in range(cfg.num_runs):
            _each(observers, "start_run", run, cfg.train_seed + run)
            done = out.steps_done(run)
            if done >= 0:
                _replay(out.writer, params.record.schedule(cfg.steps), run, done, collect, replayed)
            if done < cfg.steps:
                _train_one(setup, run, out, collect.history)
                out.run_done(run, collect.history)
            _each(observers, "end_run", run)
        runtime = time.perf_counter() - start
    if saved:
        header = trace_header(out.writer.content_digest, fp, params.paths.trajectory)
        write_trace(root / params.paths.trace, header, traces.traced)
    return _result(out, inputs.masks, collect, {**motion.curves, **indicators.curves}, runtime, device, fp)


def _result(out: RecordedOutput, masks: Masks, collect: _Collect, curves: dict[str, list[list[float]]],
            runtime: float, device: torch.device, fp: dict[str, Any]) -> TrainResult:
    cfg = out.params.train
    first_run, first_step = (out.marker.run, out.marker.step) if out.marker else (0, 0)
    trained = cfg.num_runs * cfg.steps - (first_run * cfg.steps + first_step)  # a resumed run trains fewer steps
    return TrainResult(
        trajectory=out.path if out.writer is not None else None,
        sha256=out.sha256,
        content_digest=out.writer.content_digest if out.writer is not None else None,
        final_loss=collect.losses[-1][-1],
        runtime_s=runtime,
        steps_per_s=trained / runtime if trained else math.nan,
        n_live=masks.n_live,
        n_dead=masks.n_dead,
        n_dead_bytes=masks.n_dead_bytes,
        device=f"{device.type}: {fp['device_name']}",
        fingerprint=fp,
        losses=collect.losses,
        grad_norms=collect.grad_norms,
        learning_rates=collect.lrs,
        motion=curves,
        file_bytes=out.path.stat().st_size if out.committed else None,
        safetensors_bytes=out.writer.size if out.writer is not None else None,
    )


def _prepare(params: Params, root: Path, write: bool, resume: bool, checked: bool) -> torch.device:
    """Determinism switches, the device, and outputs that cannot be written; quiets the Trainer's logs."""
    set_determinism(params.train)
    device = pick_device(params.train.device)
    check_single_device(device)
    if not checked:
        check_before_training(params, root, write, resume)
    _warn_oversubscribed(params.train.num_threads, device)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr at every checkpoint
    return device


def _warn_oversubscribed(threads: int | None, device: torch.device) -> None:
    """More CPU threads than cores can run many times slower; the count is part of the bits, so it is kept, and said."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cpu" and threads is not None and cores and threads > cores:
        print(f"flannel-repro: warning: {threads} CPU threads (train.num_threads) on {cores} available cores: this "
              "run may be much slower; keep the count only to match a recorded run (it is part of the bits)",
              file=sys.stderr)


def _each(observers: Sequence[Any], hook: str, *args: Any) -> None:
    """Call `hook` on every observer that has it."""
    for o in observers:
        method = getattr(o, hook, None)
        if method is not None:
            method(*args)


@dataclass(frozen=True)
class _Setup:
    """What every run of one file shares."""

    params: Params
    device: torch.device
    w_initial: torch.Tensor  # (V, H) bf16
    dataset: Dataset
    ring: RecordingRing | None  # where each step's record goes; None: train without the recorder
    traces: StepTraces | None = None  # the steps traced op by op (tracing/), and their traces


def _replay(writer: TrajectoryWriter, schedule: tuple[int, ...], run: int, upto: int, collect: _Collect,
            sinks) -> None:
    """Feed steps 0..upto of `run`, already in the partial trajectory, to the sinks (not to the file again), with
    their tensors: token motion is computed from them, as in flight."""
    names = [n for n in writer.specs if n in STEP_TENSORS]
    index = {t: i for i, t in enumerate(schedule)}
    for t in range(upto + 1):
        tensors, digests = {}, {}
        for name in names if t in index else []:  # record.steps: only the recorded steps have tensors
            tensors[name] = writer.read(name, (run, index[t]))
            digests[name] = bytes(writer.read(f"digest_{name}", (run, index[t])).tolist())
        indices = writer.read("batch_indices", (run, t - 1)) if t > 0 else None
        rec = StepRecord(run, t, collect.losses[run][t], collect.grad_norms[run][t], collect.lrs[run][t], tensors,
                         digests=digests, batch_indices=indices)
        for sink in sinks:
            sink(rec)


def _train_one(setup: _Setup, run: int, out: RecordedOutput, history) -> None:
    """Train run `run` (seed train_seed + run), from step 0 or from the output's resume checkpoint."""
    params, seed = setup.params, setup.params.train.train_seed + run
    resume_dir, output_dir = out.resume_checkpoint(run), out.checkpoint_dir(run)
    # The order of every RNG draw matches the notebook: seed, build the model, then the Trainer (which seeds again).
    # A resumed run draws the same, then the Trainer restores the checkpoint's weights, optimizer and RNG states.
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(params.model, setup.w_initial, setup.device)
    observer = StepObserver()
    callback = TrajectoryCallback(run, params, observer, setup.ring) if setup.ring is not None else None
    with contextlib.ExitStack() as stack:
        scratch = str(output_dir) if output_dir is not None else stack.enter_context(scratch_dir())
        every = params.train.checkpoint_every if output_dir is not None else 0
        args = training_arguments(params.train, setup.device, seed, scratch, checkpoint_every=every)
        # The tracer goes first: it leaves a traced step before the recorder copies the step's tensors.
        tracer = [TraceCallback(run, setup.traces)] if setup.traces is not None else []
        trainer = make_trainer(model, args, setup.dataset, observer, [*tracer, *([callback] if callback else [])])
        for cb in out.callbacks(run, history):
            trainer.add_callback(cb)
        if callback is not None and resume_dir is None:
            callback.emit_initial(model.transformer.wte.weight)
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)
