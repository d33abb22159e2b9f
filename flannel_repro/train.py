"""Stage 4, `flannel-repro train`: the Flannel 7 training run, recorded step by step, tracked and reported.

`run_train_stage(params, root)` is the stage as the CLI, dvc.yaml and the tests run it: it holds the stop signals
(stopping.py), opens the tracking run (train_log.py), trains, writes the DVC metrics and loss curve, and logs the
results. `train(params, root)` is the training itself, also used untracked by `verify`'s rerun and the benchmarks.

The notebook's procedure exactly: GPT2LMHeadModel with tied embeddings, dropouts 0 and bfloat16 weights; W_initial
drawn in float32 from `init_seed` and cast to bfloat16; the notebook's TokenDataset windows; HF Trainer with the
notebook's TrainingArguments (adamw_torch, bf16, linear schedule, default clipping) and the same seeds, so the same
data order. Recording happens in `recorder.TrajectoryCallback`, which hands each step to the recording ring
(ring.py): a writer thread digests and writes it into the output file and feeds the observers, off the training
thread. The output's lifecycle (lock, resume point, ring, checkpoints, commit or abort) is output.py's.

    result, run_id = run_train_stage(load_params("params.yaml"), root=Path("."))
    result.sha256, result.final_loss
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers.utils import logging as hf_logging

from .checkpoint import HISTORY_KEYS
from .config import Params, TrainConfig
from .corpus import read_corpus
from .errors import FlannelError, TrackingIncomplete
from .fsutil import atomic_output, free_bytes, sha256_file, write_json
from .layout import STEP_TENSORS, trajectory_layout
from .masks import Masks, encode_corpus, load_masks
from .model import TokenDataset, build_model, check_single_device, initial_embedding, pick_device, set_determinism
from .motion import MOTION_NAMES, TokenMotion
from .output import RecordedOutput, metadata_scalars, recorded_output
from .paths_guard import check_files, stage_files
from .progress import Progress
from .provenance import fingerprint
from .recorder import StepObserver, StepRecord, TrajectoryCallback
from .ring import RING_SLOTS, RecordingRing
from .stopping import StopSignals
from .tokenizer import load_tokenizer
from .tracking import Tracker
from .train_log import log_train_result, tracked_run
from .trajectory import TrajectoryWriter


def run_train_stage(
    params: Params, root: Path, *, observers: Sequence[Any] = (), progress: bool = True, resume: bool = False
) -> tuple[TrainResult, str | None]:
    """The train stage: returns the training result and the tracking run id (None when tracking is disabled).

    observers: extra `train()` observers (tests). A resumed run (`resume=True`) is a new tracking run, tagged with
    the interrupted one: train() replays the steps before the resume point to the observers, so its metrics are
    complete. SIGINT, SIGTERM and SIGHUP raise `Interrupted` (stopping.py); a tracking store that stopped answering
    and did not come back raises `TrackingIncomplete` once everything else is done."""
    root = Path(root)
    # Before the tracking run exists: the outputs, room for the trajectory, and the inputs in pipeline order.
    check_before_training(params, root, write=True, resume=resume)
    check_inputs(params, root)
    with StopSignals() as stops, tracked_run(params, root, resume=resume) as (tracker, metrics):
        result = train(params, root, observers=[*metrics, *observers, tracker], progress=progress, resume=resume,
                       stops=stops)
        try:
            write_reports(params, result, root)  # still inside the commit's critical section
        except FlannelError as e:
            raise FlannelError(f"{e}; the trajectory itself is complete and in place ({params.paths.trajectory}, "
                               f"sha256 {result.sha256}): run `flannel-repro train` again to write the reports once "
                               "they can be") from None
        stops.honour()
        log_train_result(tracker, params, root, result)
    if tracker.pending is not None:
        raise TrackingIncomplete(
            f"tracking run {tracker.run_id} is incomplete: the store did not answer again, so what it missed is kept "
            f"in {tracker.pending}; send it with `flannel-repro sync`", result=result, run_id=tracker.run_id)
    return result, tracker.run_id


def write_reports(params: Params, result: TrainResult, root: Path) -> None:
    """metrics/train.json (DVC metrics) and the per-step CSV (DVC plots): loss, gradient norm, learning rate and
    the token motion of live and dead tokens."""
    paths = params.paths.under(root)
    write_json(paths.metrics, result.metrics())
    with atomic_output(paths.loss_curve) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["run", "step", "loss", "grad_norm", "learning_rate", *MOTION_NAMES])
            for run, losses in enumerate(result.losses):
                for step in range(1, len(losses)):
                    w.writerow([run, step, repr(losses[step]), repr(result.grad_norms[run][step]),
                                repr(result.learning_rates[run][step]),
                                *(repr(result.motion[name][run][step]) for name in MOTION_NAMES)])


@dataclass(frozen=True)
class TrainResult:
    trajectory: Path | None
    sha256: str | None
    content_digest: str | None  # sha256 over the recorded numbers only (content.py)
    final_loss: float
    runtime_s: float
    steps_per_s: float
    n_live: int
    n_dead: int
    n_dead_bytes: int | None  # dead tokens that are single bytes, as the masks file records (None: not recorded)
    device: str
    fingerprint: dict[str, Any]
    losses: list[list[float]] = field(repr=False)  # (runs, steps+1), NaN at t = 0
    grad_norms: list[list[float]] = field(repr=False)
    learning_rates: list[list[float]] = field(repr=False)
    motion: dict[str, list[list[float]]] = field(repr=False)  # motion.MOTION_NAMES -> (runs, steps+1)

    def metrics(self) -> dict[str, Any]:
        return {
            "final_loss": self.final_loss if math.isfinite(self.final_loss) else None,  # JSON has no NaN
            "runtime_s": round(self.runtime_s, 3),
            "steps_per_s": round(self.steps_per_s, 4),
            "trajectory_sha256": self.sha256,
            "content_digest": self.content_digest,
            "n_live": self.n_live,
            "n_dead": self.n_dead,
            "dead_share": round(self.n_dead / (self.n_live + self.n_dead), 4),
            "n_dead_bytes": self.n_dead_bytes,
            "n_dead_merges": None if self.n_dead_bytes is None else self.n_dead - self.n_dead_bytes,
            "device": self.device,
        }


# Memory a run keeps per step: the per-step scalars and token motion (nine floats) and what torch and the Trainer
# keep. Measured: resident memory grew 768 KB from step 200 to step 1,800 of the tiny-step case (480 B a step).
BYTES_PER_STEP = 512


def check_before_training(params: Params, root: Path, write: bool, resume: bool = False) -> None:
    """Everything about the outputs that would otherwise fail after a full run, checked before anything is read:
    the output paths (paths_guard), the trajectory's size against the file size limit and (unless a resume reuses
    its reserved partial file) its folder's free space, and the per-step records against the memory available."""
    cfg = params.train
    if write:
        check_files(stage_files("train", params, root))
        size = sum(s.nbytes for s in trajectory_layout(params).values())  # every tensor; the header adds little
        folder, fix = params.paths.under(root).trajectory.parent, "record fewer steps (train.steps) or less (record.*)"
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit != resource.RLIM_INFINITY and size > limit:
            raise FlannelError(f"{folder}: cannot reserve {size:,} bytes for the trajectory (File too large: this "
                               f"process may write files of at most {limit:,} bytes (ulimit -f)); raise the limit or "
                               f"{fix}")
        free = free_bytes(folder)
        if not resume and size > free:
            raise FlannelError(f"{folder}: cannot reserve {size:,} bytes for the trajectory (No space left on device: "
                               f"{free:,} bytes free); free space there or set paths.trajectory to a folder with room, "
                               f"or {fix}")
    need = cfg.num_runs * (cfg.steps + 1) * BYTES_PER_STEP
    available = available_memory()
    if available is not None and need > available:
        raise FlannelError(f"params: train.steps = {cfg.steps:,} x train.num_runs = {cfg.num_runs} keeps about "
                           f"{need / 2**30:.1f} GiB of per-step records in memory, more than the "
                           f"{available / 2**30:.1f} GiB available; record fewer steps")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where the system does not say."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    return None


def check_inputs(params: Params, root: Path) -> None:
    """Each input's own checks, in pipeline order and without encoding anything, so that a problem is blamed on the
    first file that has it: a tokenizer of the wrong size, not the masks made for it."""
    paths, v = params.paths.under(root), params.model.vocab_size
    read_corpus(paths.corpus)
    load_tokenizer(paths.tokenizer, v)
    load_masks(paths.masks, v)


def training_arguments(cfg: TrainConfig, device: torch.device, seed: int, output_dir: str, checkpoint_every: int = 0):
    """The notebook's TrainingArguments, with the Trainer's own resumable checkpoints every `checkpoint_every` steps
    when asked, and without its per-step log: the recorder takes the gradient norm and the learning rate where the
    Trainer computes them (`make_trainer`, `recorder.TrajectoryCallback`). Neither changes a number."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_strategy="no",  # no log entry, .item() or on_log round per step
        logging_nan_inf_filter=False,  # filters only the logged loss: two tensor checks and a device sync per step
        remove_unused_columns=False,  # keep sample_index for the recorder; the notebook's columns are all used
        save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or 500,
        save_only_model=False,  # optimizer, scheduler and RNG states too
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=True,
        seed=seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )


def make_trainer(model, args, dataset: Dataset, observer: StepObserver, callbacks: list):
    from transformers import PrinterCallback, ProgressCallback, Trainer

    class FlannelTrainer(Trainer):
        """The notebook's Trainer (its loss is the model's mean loss over the batch, as the notebook's compute_loss
        returns) without the per-step work that computes no number of the run. Each override returns exactly what
        the Trainer's own method returns."""

        _plain: tuple[Any, Any] | None = None  # (model, the same without Accelerate's output conversion)
        _flops_per_token: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            indices = inputs.pop("sample_index")
            # With bf16, Accelerate wraps forward in autocast AND converts every output to float32 afterwards:
            # for the (batch, seq, vocab) logits that is 164 MB and ~8% of a step, and nothing reads them. Run the
            # plain forward inside the very same autocast context instead; the loss is bit-identical.
            if self._plain is None or self._plain[0] is not model:
                self._plain = (model, self.accelerator.unwrap_model(model, keep_fp32_wrapper=False))
            with self.accelerator.autocast():
                outputs = self._plain[1](**inputs)
            observer.observe(outputs.loss, indices)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def _get_grad_norm(self, model, grad_norm=None):
            # A private method, as no public callback is given the pre-clip norm except through the per-step log;
            # test_train.py checks the recorded norm against that log, so a renamed method cannot go unnoticed.
            grad_norm = super()._get_grad_norm(model, grad_norm)  # before clipping
            observer.grad_norm = grad_norm
            return grad_norm

        def floating_point_ops(self, inputs):
            # The Trainer's count (6 x tokens x parameters), without walking every parameter at every step.
            if self._flops_per_token is None:
                self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return inputs["input_ids"].numel() * self._flops_per_token

    trainer = FlannelTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    """The Trainer's output_dir, kept out of every versioned folder."""
    path = tempfile.mkdtemp(prefix="flannel-trainer-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Inputs:
    tokens: torch.Tensor
    masks: Masks
    input_digests: dict[str, str]


def load_inputs(params: Params, root: Path) -> _Inputs:
    """Read and check every input before any training starts."""
    paths, v = params.paths.under(root), params.model.vocab_size
    corpus_path, tok_path, masks_path = paths.corpus, paths.tokenizer, paths.masks
    tokens = encode_corpus(corpus_path, tok_path, v)
    need = params.model.max_seq_len + 1
    if len(tokens) < need:
        raise FlannelError(
            f"{corpus_path}: corpus has {len(tokens)} tokens, fewer than model.max_seq_len + 1 = {need}; use a "
            "longer corpus or a smaller max_seq_len"
        )
    masks = load_masks(masks_path, v)
    digests = {f"{name}_sha256": sha256_file(path) for name, path in paths.inputs().items()}
    made_from = _masks_made_from(masks_path)
    for key, what, path in (("corpus_sha256", "corpus", corpus_path), ("tokenizer_sha256", "tokenizer", tok_path)):
        if made_from.get(key) is not None and made_from[key] != digests[key]:
            raise FlannelError(
                f"{masks_path}: masks file was made from another {what} than {path}; remake it with "
                "`flannel-repro masks`"
            )
    return _Inputs(tokens, masks, digests)


def _masks_made_from(path: Path) -> dict[str, str]:
    """The corpus and tokenizer digests a masks file records in its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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
    own step).
    """
    root, cfg = Path(root), params.train
    # Device and inputs, checked before anything is opened or trained.
    device = _prepare(params, root, write, resume)
    inputs = load_inputs(params, root)
    fp = fingerprint(device)
    w_initial = initial_embedding(params.model, cfg)
    scalars = metadata_scalars(params, inputs.masks, w_initial)
    _each(observers, "recorded_scalars", scalars)  # verify checks them against the reference
    collect = _Collect(cfg.num_runs, cfg.steps)
    tracking_run = next((o.run_id for o in observers if isinstance(o, Tracker)), None)
    motion = TokenMotion(inputs.masks, cfg.num_runs, cfg.steps)  # before the other observers: they see rec.motion
    # The output: lock, resume point, temporary file and checkpoints; committed when the block ends, else kept
    # for --resume or removed.
    with recorded_output(params, root, scalars, fp, inputs.input_digests, write=write and record,
                         resume=resume, stops=stops, tracking_run=tracking_run) as out:
        if out.marker:
            collect.restore(out.marker.history)
            if out.marker.tracking_run:
                _each(observers, "resumed_from", out.marker.tracking_run)
        sinks = [o for o in observers if callable(o)]  # per-step observers; the others have run hooks only
        replayed = [collect, motion, *sinks]  # the file has these steps already, and progress is not shown again
        shown = [Progress(cfg.num_runs, cfg.steps, cfg.log_every)] if progress else []
        # record=False (the benchmark's baseline) trains without the recorder: no per-step copies of W or grad_W.
        ring = out.record_steps([*replayed, *shown], device, ring_slots) if record else None
        dataset = TokenDataset(inputs.tokens.to(device), params.model.max_seq_len, cfg.label_mode)
        setup = _Setup(params, device, w_initial, dataset, ring)
        start = time.perf_counter()
        for run in range(cfg.num_runs):
            _each(observers, "start_run", run, cfg.train_seed + run)
            done = out.steps_done(run)
            if done >= 0:
                _replay(out.writer, run, done, collect, replayed)
            if done < cfg.steps:
                _train_one(setup, run, out, collect.history)
                out.run_done(run, collect.history)
            _each(observers, "end_run", run)
        runtime = time.perf_counter() - start
    return _result(out, inputs.masks, collect, motion, runtime, device, fp)


def _result(out: RecordedOutput, masks: Masks, collect: _Collect, motion: TokenMotion, runtime: float,
            device: torch.device, fp: dict[str, Any]) -> TrainResult:
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
        motion=motion.curves,
    )


def _prepare(params: Params, root: Path, write: bool, resume: bool) -> torch.device:
    """Determinism switches, the device, and outputs that cannot be written; quiets the Trainer's logs."""
    set_determinism(params.train)
    device = pick_device(params.train.device)
    check_single_device(device)
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


def _replay(writer: TrajectoryWriter, run: int, upto: int, collect: _Collect, sinks) -> None:
    """Feed steps 0..upto of `run`, already in the partial trajectory, to the sinks (not to the file again), with
    their tensors: token motion is computed from them, as in flight."""
    names = [n for n in writer.specs if n in STEP_TENSORS]
    for t in range(upto + 1):
        tensors, digests = {}, {}
        for name in names:
            tensors[name] = writer.read(name, (run, t))
            digests[name] = bytes(writer.read(f"digest_{name}", (run, t)).tolist())
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
    callback = TrajectoryCallback(run, params.record, observer, setup.ring) if setup.ring is not None else None
    with contextlib.ExitStack() as stack:
        scratch = str(output_dir) if output_dir is not None else stack.enter_context(_scratch_dir())
        every = params.train.checkpoint_every if output_dir is not None else 0
        args = training_arguments(params.train, setup.device, seed, scratch, checkpoint_every=every)
        trainer = make_trainer(model, args, setup.dataset, observer, [callback] if callback else [])
        for cb in out.callbacks(run, history):
            trainer.add_callback(cb)
        if callback is not None and resume_dir is None:
            callback.emit_initial(model.transformer.wte.weight)
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)
