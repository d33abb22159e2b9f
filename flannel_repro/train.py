"""Stage 4: the Flannel 7 training run, recorded step by step.

The notebook's procedure exactly: GPT2LMHeadModel with tied embeddings, dropouts 0 and bfloat16 weights; W_initial
drawn in float32 from `init_seed` and cast to bfloat16; the notebook's TokenDataset windows; HF Trainer with the
notebook's TrainingArguments (adamw_torch, bf16, linear schedule, default clipping) and the same seeds, so the same
data order. Recording happens in `recorder.TrajectoryCallback`; the trajectory streams into the output file.

    result = train(load_params("params.yaml"), root=Path("."))
    result.sha256, result.final_loss
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers.utils import logging as hf_logging

from .checkpoint import HISTORY_KEYS, Checkpoints, CheckpointCallback, Marker, io_error_message, notice, run_done
from .config import Params, TrainConfig
from .errors import FlannelError
from .fsutil import atomic_output, sha256_file, write_json
from .masks import Masks, encode_corpus, load_masks
from .model import TokenDataset, build_model, check_single_device, initial_embedding, pick_device, set_determinism
from .progress import Progress
from .provenance import fingerprint, versions
from .recorder import STEP_TENSORS, FileSink, StepObserver, StepRecord, StepSink, TrajectoryCallback, trajectory_specs
from .trajectory import FORMAT, TensorSpec, TrajectoryWriter


@dataclass(frozen=True)
class TrainResult:
    trajectory: Path | None
    sha256: str | None
    final_loss: float
    runtime_s: float
    steps_per_s: float
    n_live: int
    n_dead: int
    device: str
    fingerprint: dict[str, Any]
    losses: list[list[float]] = field(repr=False)  # (runs, steps+1), NaN at t = 0
    grad_norms: list[list[float]] = field(repr=False)
    learning_rates: list[list[float]] = field(repr=False)

    def metrics(self) -> dict[str, Any]:
        return {
            "final_loss": self.final_loss if math.isfinite(self.final_loss) else None,  # JSON has no NaN
            "runtime_s": round(self.runtime_s, 3),
            "steps_per_s": round(self.steps_per_s, 4),
            "trajectory_sha256": self.sha256,
            "n_live": self.n_live,
            "n_dead": self.n_dead,
            "device": self.device,
        }


def check_output_paths(params: Params, root: Path, write: bool) -> None:
    """Fail before training, not after it, when an output path is a folder."""
    if not write:
        return
    for key in ("trajectory", "metrics", "loss_curve"):
        path = root / getattr(params.paths, key)
        if path.is_dir():
            raise FlannelError(f"{path}: is a folder; paths.{key} must name a file, fix it in params.yaml")


def training_arguments(cfg: TrainConfig, device: torch.device, seed: int, output_dir: str, checkpoint_every: int = 0):
    """The notebook's TrainingArguments, with a log entry every step and, when asked, the Trainer's own resumable
    checkpoints every `checkpoint_every` steps (neither changes a number)."""
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
        logging_steps=1,
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
        """Trainer whose loss is the model's mean loss over the batch, as the notebook's compute_loss returns."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            indices = inputs.pop("sample_index")
            # With bf16, Accelerate wraps forward in autocast AND converts every output to float32 afterwards:
            # for the (batch, seq, vocab) logits that is 164 MB and ~8% of a step, and nothing reads them. Run the
            # plain forward inside the very same autocast context instead; the loss is bit-identical.
            model = self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            with self.accelerator.autocast():
                outputs = model(**inputs)
            observer.observe(outputs.loss, indices)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

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
    p, v = params.paths, params.model.vocab_size
    corpus_path, tok_path, masks_path = root / p.corpus, root / p.tokenizer, root / p.masks
    tokens = encode_corpus(corpus_path, tok_path, v)
    need = params.model.max_seq_len + 1
    if len(tokens) < need:
        raise FlannelError(
            f"{corpus_path}: corpus has {len(tokens)} tokens, fewer than model.max_seq_len + 1 = {need}; use a "
            "longer corpus or a smaller max_seq_len"
        )
    masks = load_masks(masks_path, v)
    digests = {
        "corpus_sha256": sha256_file(corpus_path),
        "tokenizer_sha256": sha256_file(tok_path),
        "masks_sha256": sha256_file(masks_path),
    }
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
        for mine, theirs in zip((self.losses, self.grad_norms, self.lrs), (history[k] for k in HISTORY_KEYS)):
            for row, saved in zip(mine, theirs):
                row[: len(saved)] = saved[: len(row)]

    def __call__(self, rec: StepRecord) -> None:
        self.losses[rec.run][rec.step] = rec.loss
        self.grad_norms[rec.run][rec.step] = rec.grad_norm
        self.lrs[rec.run][rec.step] = rec.learning_rate


def train(
    params: Params,
    root: Path = Path("."),
    *,
    sinks: list[StepSink] | None = None,
    run_sinks: list[Any] | None = None,
    write: bool = True,
    record: bool = True,
    progress: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Run training with `params` and record the trajectory to `params.paths.trajectory` (under `root`).

    sinks: extra per-step consumers (tracking, verify). run_sinks: objects with `start_run(run, seed)` and
    `end_run(run)`, told when each of the `num_runs` runs begins and ends. write=False records nothing to disk
    (verify); record=False turns recording off entirely (the benchmark's baseline). resume=True continues the
    interrupted run of this output from its last checkpoint (see checkpoint.py); the steps before it are replayed
    to the sinks from the partial trajectory, so they see exactly what an uninterrupted run shows them.
    """
    root = Path(root)
    cfg, mcfg = params.train, params.model
    set_determinism(cfg)
    device = pick_device(cfg.device)
    check_single_device(device)
    check_output_paths(params, root, write)
    inputs = load_inputs(params, root)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr at every checkpoint
    fp = fingerprint(device)

    w_initial = initial_embedding(mcfg, cfg)
    scalars = metadata_scalars(params, inputs.masks, w_initial)
    collect = _Collect(cfg.num_runs, cfg.steps)
    extra_sinks: list[StepSink] = [collect, *(sinks or [])]
    all_sinks: list[StepSink] = list(extra_sinks)
    writer = checkpoints = marker = None
    out_path = root / params.paths.trajectory
    if write and record:
        specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in scalars.items()}
        specs.update(trajectory_specs(params.record, cfg.num_runs, cfg.steps, mcfg.vocab_size, mcfg.hidden_dim, cfg.batch_size))
        metadata = {
            "format": FORMAT,
            "params": params.to_json(),
            "versions": json.dumps(versions(), sort_keys=True),
            "fingerprint": json.dumps(fp, sort_keys=True),
            "inputs": json.dumps(inputs.input_digests, sort_keys=True),
        }
        checkpoints = Checkpoints(root, params.paths.trajectory, out_path)
        checkpoints.acquire()
        try:
            marker = _resume_point(checkpoints, params, resume)
            checkpoints.clear(keep=marker.temp if marker else None)
            writer = TrajectoryWriter(out_path, specs, metadata, resume_from=marker.temp if marker else None)
        except BaseException:
            checkpoints.release()  # the marker and partial file stay as they were
            raise
        all_sinks.insert(0, FileSink(writer, params.record))
    if progress:
        all_sinks.append(Progress(cfg.num_runs, cfg.steps, cfg.log_every))

    first_run, first_step = (marker.run, marker.step) if marker else (0, 0)
    if marker:
        collect.restore(marker.history)
    checkpointing = checkpoints is not None and cfg.checkpoint_every > 0
    try:
        if writer is not None and not marker:
            for name, value in scalars.items():
                writer.write(name, (), value)
        tokens = inputs.tokens.to(device)
        dataset = TokenDataset(tokens, mcfg.max_seq_len, cfg.label_mode)
        start = time.perf_counter()
        for run in range(cfg.num_runs):
            seed = cfg.train_seed + run
            for s in run_sinks or []:
                s.start_run(run, seed)
            # Steps of this run already in the partial trajectory: all of an earlier run, 0..K of the resumed one.
            done = cfg.steps if run < first_run else first_step if run == first_run and first_step > 0 else -1
            if done >= 0 and extra_sinks:
                _replay(writer, run, done, collect, extra_sinks, with_tensors=bool(sinks))
            if done < cfg.steps:
                resume_dir = marker.checkpoint if marker and run == first_run and first_step > 0 else None
                extra_callbacks = []
                if checkpointing:
                    extra_callbacks.append(
                        CheckpointCallback(checkpoints, writer, run, params.to_json(), collect.history)
                    )
                out_dir = checkpoints.dir / f"run-{run}" if checkpointing else None
                _train_one(params, run, seed, w_initial, dataset, device, all_sinks, record,
                           resume_dir=resume_dir, output_dir=out_dir, callbacks=extra_callbacks)
                if checkpointing and run + 1 < cfg.num_runs:
                    run_done(checkpoints, writer, run, params.to_json(), collect.history())
            for s in run_sinks or []:
                s.end_run(run)
        runtime = time.perf_counter() - start
        sha = None
        if writer is not None:
            writer.commit()
            checkpoints.finish()
            sha = sha256_file(out_path)
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

    final = collect.losses[-1][-1]
    trained = cfg.num_runs * cfg.steps - (first_run * cfg.steps + first_step)
    return TrainResult(
        trajectory=out_path if writer is not None else None,
        sha256=sha,
        final_loss=final,
        runtime_s=runtime,
        steps_per_s=trained / runtime if trained else math.nan,
        n_live=inputs.masks.n_live,
        n_dead=inputs.masks.n_dead,
        device=f"{device.type}: {fp['device_name']}",
        fingerprint=fp,
        losses=collect.losses,
        grad_norms=collect.grad_norms,
        learning_rates=collect.lrs,
    )


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


def _replay(writer: TrajectoryWriter, run: int, upto: int, collect: "_Collect", sinks, with_tensors: bool) -> None:
    """Feed steps 0..upto of `run`, already in the partial trajectory, to the sinks (not to the file again)."""
    names = [n for n in writer.specs if n in STEP_TENSORS]
    for t in range(upto + 1):
        tensors, digests = {}, {}
        if with_tensors:
            for name in names:
                tensors[name] = writer.read(name, (run, t))
                digests[name] = bytes(writer.read(f"digest_{name}", (run, t)).tolist())
        indices = writer.read("batch_indices", (run, t - 1)) if t > 0 else None
        rec = StepRecord(run, t, collect.losses[run][t], collect.grad_norms[run][t], collect.lrs[run][t], tensors,
                         digests=digests, batch_indices=indices)
        for sink in sinks:
            sink(rec)


def _train_one(params, run, seed, w_initial, dataset, device, sinks, record: bool, *,
               resume_dir: Path | None = None, output_dir: Path | None = None, callbacks=()) -> None:
    # The order of every RNG draw matches the notebook: seed, build the model, then the Trainer (which seeds again).
    # A resumed run draws the same, then the Trainer restores the checkpoint's weights, optimizer and RNG states.
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(params.model, w_initial, device)
    observer = StepObserver()
    # record=False (the benchmark's baseline) trains without the recorder: no per-step copies of W or grad_W.
    callback = TrajectoryCallback(run, params.record, observer, sinks, want_digests=True) if record else None
    with contextlib.ExitStack() as stack:
        scratch = str(output_dir) if output_dir is not None else stack.enter_context(_scratch_dir())
        args = training_arguments(params.train, device, seed, scratch, checkpoint_every=params.train.checkpoint_every
                                  if output_dir is not None else 0)
        trainer = make_trainer(model, args, dataset, observer, [callback] if callback else [])
        for cb in callbacks:
            trainer.add_callback(cb)
        if record and resume_dir is None:
            callback.emit_initial(model.transformer.wte.weight)
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)


def write_reports(params: Params, result: TrainResult, root: Path) -> None:
    """metrics/train.json (DVC metrics) and the per-step loss curve CSV (DVC plots)."""
    write_json(root / params.paths.metrics, result.metrics())
    with atomic_output(root / params.paths.loss_curve) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["run", "step", "loss", "grad_norm", "learning_rate"])
            for run, losses in enumerate(result.losses):
                for step in range(1, len(losses)):
                    w.writerow([run, step, repr(losses[step]), repr(result.grad_norms[run][step]),
                                repr(result.learning_rates[run][step])])
