"""Benchmark: the Trainer's per-step bookkeeping, each piece timed alone, as the stock Trainer does it and as
flannel-repro's Trainer does it.

A step's time is mostly arithmetic, and on a loaded machine two whole runs differ by more than the few hundred
microseconds in question, so the pieces are timed one by one instead, each over many calls, on the real trainer of
the tiny-step case (batch 1, 16 tokens; `training/hf.py`'s own `training_arguments` and `make_trainer`) after it has
trained a few steps:
  - the per-step log (what `logging_steps=1` costs): gather and `.item()` of the loss and of the gradient norm, the
    log entry, every callback's `on_log`; flannel-repro turns the log off (`logging_strategy="no"`);
  - the NaN/inf filter of the logged loss (`logging_nan_inf_filter`): off;
  - the FLOP count: the Trainer walks every parameter at every step; flannel-repro counts them once;
  - unwrapping the model for the plain forward: every step before, once now;
  - how the recorder reads the loss, the batch and the gradient norm: `.item()` and `.cpu()` on the training
    thread before, copies into the recording ring's slot now (read on the writer thread; on CUDA this is what
    keeps the training thread from waiting for the device at every step).
It prints microseconds per step for each, before and after, and the tiny step's own time for scale.

    python bench/trainer_overhead.py                    # runs the data stages in bench/results/work first
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench_train import REPO, TINY, make_data

from flannel_repro.trajectory.provenance import cpu_model


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Median over 5 batches of `calls` calls, in microseconds per call."""
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "work")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trainer_overhead.json")
    args = ap.parse_args()
    wd = args.workdir
    make_data(wd)

    from flannel_repro.core.runtime import configure

    configure()
    import logging

    import torch
    from transformers import Trainer

    from flannel_repro.core.config import load_params
    from flannel_repro.recording.recorder import TrajectoryCallback
    from flannel_repro.recording.records import StepObserver
    from flannel_repro.recording.ring import RecordingRing
    from flannel_repro.training.hf import make_trainer, training_arguments
    from flannel_repro.training.inputs import load_inputs
    from flannel_repro.training.model import TokenDataset, build_model, initial_embedding, pick_device, set_determinism

    logging.getLogger("transformers").setLevel(logging.ERROR)
    params = load_params(wd / "params.yaml", [*TINY, "train.steps=30", "train.num_threads=2"])
    cfg = params.train
    set_determinism(cfg)
    device = pick_device(cfg.device)
    inputs = load_inputs(params, wd)
    dataset = TokenDataset(inputs.tokens, params.model.max_seq_len, cfg.label_mode)
    torch.manual_seed(cfg.train_seed)
    model = build_model(params.model, initial_embedding(params.model, cfg), device)
    observer = StepObserver()
    ring = RecordingRing([], cuda=False, slots=0)
    callback = TrajectoryCallback(0, params.record, observer, ring)
    scratch = wd / "trainer_overhead_scratch"
    trainer = make_trainer(model, training_arguments(cfg, device, cfg.train_seed, str(scratch)), dataset, observer,
                           [callback])
    start = time.perf_counter()
    trainer.train()
    # For scale only: includes the first step's set-up and the digests of this synchronous ring (slots=0)
    step_us = (time.perf_counter() - start) / cfg.steps * 1e6
    shutil.rmtree(scratch, ignore_errors=True)

    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("sample_index")
    loss = torch.tensor(3.25)
    grad_norm = torch.tensor(1.5)
    indices = torch.arange(cfg.batch_size)
    state, control = trainer.state, trainer.control
    slot = ring.acquire()

    def log_step() -> None:  # the Trainer's own per-step log, as logging_steps=1 runs it
        control.should_log = True
        trainer._globalstep_last_logged = state.global_step - 1
        trainer._maybe_log_save_evaluate(loss.clone(), grad_norm, model, None, 0, None, start, learning_rate=1e-3)

    def no_log_step() -> None:
        control.should_log = False
        trainer._maybe_log_save_evaluate(loss.clone(), grad_norm, model, None, 0, None, start, learning_rate=1e-3)

    def read_here() -> None:  # the recorder before: numbers read on the training thread (the log read grad_norm)
        loss.item()
        indices.detach().cpu()

    def copy_to_slot() -> None:  # the recorder now: copies into the ring's slot
        slot.copy("loss", loss)
        slot.copy("batch_indices", indices)
        slot.copy("grad_norm", grad_norm)

    n = args.calls
    unwrap = trainer.accelerator.unwrap_model
    pieces = {
        "per-step log (logging_steps=1 -> off)": (per_call_us(log_step, n), per_call_us(no_log_step, n)),
        "NaN/inf filter of the logged loss": (per_call_us(lambda: torch.isnan(loss) or torch.isinf(loss), n), 0.0),
        "FLOP count": (per_call_us(lambda: Trainer.floating_point_ops(trainer, batch), n),
                       per_call_us(lambda: trainer.floating_point_ops(batch), n)),
        "unwrap the model for the plain forward": (per_call_us(lambda: unwrap(model, keep_fp32_wrapper=False), n),
                                                   0.0),
        "recorder: read loss, batch, gradient norm": (per_call_us(read_here, n), per_call_us(copy_to_slot, n)),
        # added: the recorder's own reading of the learning rate (the log carried it before)
        "recorder: the learning rate, on_optimizer_step": (
            0.0, per_call_us(lambda: callback.on_optimizer_step(trainer.args, state, control,
                                                                 lr_scheduler=trainer.lr_scheduler), n)),
    }
    ring.release(slot)
    ring.close()
    before, after = sum(b for b, _ in pieces.values()), sum(a for _, a in pieces.values())
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}; tiny step (first {cfg.steps} steps, "
          f"set-up included) {step_us / 1000:.1f} ms")
    print(f"{'per step, microseconds':<45} {'Trainer':>9} {'flannel':>9}")
    for name, (b, a) in pieces.items():
        print(f"{name:<45} {b:>9.1f} {a:>9.1f}")
    print(f"{'total':<45} {before:>9.1f} {after:>9.1f}   saved {before - after:.0f} us a step "
          f"({(before - after) / step_us:.1%} of a tiny step here)")
    result = {"cpu": cpu_model(), "tiny_step_us": step_us, "calls": n,
              "pieces_us": {k: {"trainer": b, "flannel": a} for k, (b, a) in pieces.items()},
              "saved_us_per_step": before - after}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
