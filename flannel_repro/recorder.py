"""Per-step recording through a public `TrainerCallback`.

What is recorded, and when, follows the notebook's BatchRecorder exactly:
- t = 0: W_initial; grad_W, momentum and variance zero; loss NaN.
- t = 1..steps: grad_W is the embedding gradient after backward and before clipping (captured by a
  post-accumulate-grad hook on the tied embedding); W, momentum and variance are read after the optimizer step
  (`on_step_end`); the loss is the one `compute_loss` returned for that step's batch.

Each step becomes a `StepRecord` whose tensors are copied into a slot of the recording ring (ring.py); the ring's
writer thread digests it and hands it to the sinks (the trajectory writer, tracking, progress, verify) in step
order. Digests are the sha256 of each recorded slice's raw bytes, exactly as stored in the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import TrainerCallback

from .config import RecordConfig
from .layout import STEP_TENSORS, recorded_tensors  # noqa: F401 (STEP_TENSORS: re-exported for train.py)
from .trajectory import TensorSpec, TrajectoryWriter

if TYPE_CHECKING:
    from .ring import RecordingRing, Slot


@dataclass
class StepRecord:
    run: int
    step: int  # 0 = initial state
    loss: float  # NaN at t = 0
    grad_norm: float  # pre-clip global gradient norm; NaN at t = 0
    learning_rate: float  # learning rate used by this step's update; NaN at t = 0
    tensors: dict[str, torch.Tensor]  # recorded (V, H) bf16 slices on the CPU (a ring slot's: copy what you keep)
    digests: dict[str, bytes] = field(default_factory=dict)
    batch_indices: torch.Tensor | None = None  # int64[batch]; None at t = 0
    motion: dict[str, float] = field(default_factory=dict)  # token motion, filled by motion.TokenMotion


class StepSink(Protocol):
    def __call__(self, rec: StepRecord) -> None: ...


class StepObserver:
    """What `compute_loss` sees for the current step: the loss and the dataset indices of the batch."""

    def __init__(self) -> None:
        self.loss: float = math.nan
        self.indices: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor, indices: torch.Tensor) -> None:
        self.loss = loss.item()
        self.indices = indices.detach().cpu()


class TrajectoryCallback(TrainerCallback):
    """Builds one `StepRecord` per optimizer step, its tensors copied into a slot of the recording ring, and submits
    it; the ring's writer thread digests it and hands it to every sink (ring.py)."""

    def __init__(self, run: int, record: RecordConfig, observer: StepObserver, ring: RecordingRing) -> None:
        self.run = run
        self.names = recorded_tensors(record)
        self.observer = observer
        self.ring = ring
        self._grad: torch.Tensor | None = None  # grad_W before clipping, on the model's device
        self._hook = None
        self._pending: tuple[StepRecord, Slot] | None = None

    def emit_initial(self, weight: torch.Tensor) -> None:
        slot = self.ring.acquire()
        tensors = {name: slot.copy(name, weight.to(torch.bfloat16)) if name == "W"
                   else slot.zero(name, weight.shape, torch.bfloat16) for name in self.names}
        slot.ready()
        self.ring.submit(StepRecord(self.run, 0, math.nan, math.nan, math.nan, tensors), slot)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        weight = model.get_input_embeddings().weight
        if "grad_W" in self.names:
            self._grad = torch.zeros(weight.shape, dtype=torch.bfloat16, device=weight.device)

            def capture(param: torch.Tensor) -> None:  # after backward, before clipping (a device-side copy)
                self._grad.copy_(param.grad)

            self._hook = weight.register_post_accumulate_grad_hook(capture)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        weight = model.get_input_embeddings().weight
        slot = self.ring.acquire()  # waits only while every slot is still being written
        tensors: dict[str, torch.Tensor] = {}
        if "W" in self.names:
            tensors["W"] = slot.copy("W", weight.to(torch.bfloat16))
        if "grad_W" in self.names:
            tensors["grad_W"] = slot.copy("grad_W", self._grad)
        if "momentum" in self.names or "variance" in self.names:
            adam = getattr(optimizer, "optimizer", optimizer).state[weight]
            for name, key in (("momentum", "exp_avg"), ("variance", "exp_avg_sq")):
                if name in self.names:
                    tensors[name] = slot.copy(name, adam[key].to(torch.bfloat16))
        slot.ready()
        rec = StepRecord(self.run, state.global_step, self.observer.loss, math.nan, math.nan, tensors,
                         batch_indices=self.observer.indices)
        self._pending = (rec, slot)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer logs every step (logging_steps=1) right after on_step_end: the pre-clip gradient norm and
        # the learning rate this step used.
        pending, self._pending = self._pending, None
        if pending is None:
            return
        rec, slot = pending
        if rec.step != state.global_step:
            self.ring.release(slot)
            return
        logs = logs or {}
        rec.grad_norm = float(logs.get("grad_norm", math.nan))
        rec.learning_rate = float(logs.get("learning_rate", math.nan))
        self.ring.submit(rec, slot)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def trajectory_specs(record: RecordConfig, runs: int, steps: int, vocab: int, hidden: int, batch: int):
    """Keys, dtypes and shapes of the per-step part of the file."""
    specs = {}
    for name in recorded_tensors(record):
        specs[name] = TensorSpec(torch.bfloat16, (runs, steps + 1, vocab, hidden))
        specs[f"digest_{name}"] = TensorSpec(torch.uint8, (runs, steps + 1, 32))
    if record.losses:
        specs["losses"] = TensorSpec(torch.bfloat16, (runs, steps + 1))
        specs["losses_f32"] = TensorSpec(torch.float32, (runs, steps + 1))
    specs["grad_norm"] = TensorSpec(torch.float32, (runs, steps + 1))
    specs["lr_schedule"] = TensorSpec(torch.float32, (runs, steps + 1))
    specs["batch_indices"] = TensorSpec(torch.int64, (runs, steps, batch))
    return specs


class FileSink:
    """Writes each StepRecord into the trajectory file."""

    def __init__(self, writer: TrajectoryWriter, record: RecordConfig) -> None:
        self.writer = writer
        self.losses = record.losses

    def __call__(self, rec: StepRecord) -> None:
        w, idx = self.writer, (rec.run, rec.step)
        for name, t in rec.tensors.items():
            w.write(name, idx, t)
            w.write(f"digest_{name}", idx, torch.frombuffer(bytearray(rec.digests[name]), dtype=torch.uint8))
        if self.losses:
            w.write("losses", idx, torch.tensor(rec.loss, dtype=torch.bfloat16))
            w.write("losses_f32", idx, torch.tensor(rec.loss, dtype=torch.float32))
        w.write("grad_norm", idx, torch.tensor(rec.grad_norm, dtype=torch.float32))
        w.write("lr_schedule", idx, torch.tensor(rec.learning_rate, dtype=torch.float32))
        if rec.batch_indices is not None:
            # The last batch of an epoch can be short (the Trainer keeps it): -1 fills the unused slots.
            row = torch.full(w.specs["batch_indices"].shape[-1:], -1, dtype=torch.int64)
            row[: len(rec.batch_indices)] = rec.batch_indices
            w.write("batch_indices", (rec.run, rec.step - 1), row)

