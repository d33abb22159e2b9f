"""Per-step recording through a public `TrainerCallback`.

What is recorded, and when, follows the notebook's BatchRecorder exactly:
- t = 0: W_initial; grad_W, momentum and variance zero; loss NaN.
- t = 1..steps: grad_W is the embedding gradient after backward and before clipping (captured by a
  post-accumulate-grad hook on the tied embedding); with record.grad_parts, its two halves as autograd makes them
  (grad_parts.py); W, momentum and variance are read after the optimizer step
  (`on_step_end`); the loss is the one `compute_loss` returned for that step's batch; the gradient norm is the
  Trainer's pre-clip norm and the learning rate the one the update used, read where the Trainer computes them (its
  per-step log, which used to carry them, is off).

Each step becomes a `StepRecord` whose tensors, loss, gradient norm and batch indices are copied into a slot of the
recording ring (ring.py); the ring's writer thread reads the numbers, digests the slices and hands the record to the
sinks (the trajectory writer, tracking, progress, verify) in step order. So on CUDA the training thread never waits
for the device to read a number (on MPS a copy to the host still waits). Digests are the sha256 of each recorded
slice's raw bytes, exactly as stored in the file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from flannel_repro.core.config import Params
from flannel_repro.recording.grad_parts import PART_NAMES, GradParts
from flannel_repro.recording.records import StepObserver, StepRecord
from flannel_repro.trajectory.file import TrajectoryWriter
from flannel_repro.trajectory.layout import recorded_tensors

if TYPE_CHECKING:
    from flannel_repro.recording.ring import RecordingRing


class TrajectoryCallback(TrainerCallback):
    """Builds one `StepRecord` per optimizer step, its tensors copied into a slot of the recording ring, and submits
    it; the ring's writer thread digests it and hands it to every sink (ring.py). Nothing here reads a number off
    the device (on CUDA nothing waits for it): the loss, the gradient norm and the batch go into the slot too."""

    def __init__(self, run: int, params: Params, observer: StepObserver, ring: RecordingRing) -> None:
        self.run = run
        self.names = recorded_tensors(params.record)
        self.recorded = set(params.record.schedule(params.train.steps))  # record.steps: the others carry no tensors
        self.observer = observer
        self.ring = ring
        self._grad: torch.Tensor | None = None  # grad_W before clipping, on the model's device
        self._hook = None
        self._parts: GradParts | None = None  # the two halves of grad_W, when recorded
        self._lr = math.nan  # the learning rate of the current step's update

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
        if PART_NAMES[0] in self.names:
            self._parts = GradParts(model)  # its hooks copy every step's halves: the schedule is applied below

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        # After the update, before the scheduler steps: the Trainer's own reading of the rate this update used.
        lr = lr_scheduler.get_last_lr()[0]
        self._lr = lr.item() if torch.is_tensor(lr) else float(lr)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        weight = model.get_input_embeddings().weight
        slot = self.ring.acquire()  # waits only while every slot is still being written
        tensors: dict[str, torch.Tensor] = {}
        names = self.names if state.global_step in self.recorded else []  # only the loss, batch, ... otherwise
        if "W" in names:
            tensors["W"] = slot.copy("W", weight.to(torch.bfloat16))
        if "grad_W" in names:
            tensors["grad_W"] = slot.copy("grad_W", self._grad)
        if self._parts is not None and PART_NAMES[0] in names:
            for name, part in self._parts.buffers.items():
                tensors[name] = slot.copy(name, part)
        if "momentum" in names or "variance" in names:
            adam = getattr(optimizer, "optimizer", optimizer).state[weight]
            for name, key in (("momentum", "exp_avg"), ("variance", "exp_avg_sq")):
                if name in names:
                    tensors[name] = slot.copy(name, adam[key].to(torch.bfloat16))
        seen = self.observer
        unread = {"loss": slot.copy("loss", seen.loss), "batch_indices": slot.copy("batch_indices", seen.indices)}
        grad_norm = math.nan
        if torch.is_tensor(seen.grad_norm):
            unread["grad_norm"] = slot.copy("grad_norm", seen.grad_norm)
        elif seen.grad_norm is not None:
            grad_norm = float(seen.grad_norm)
        slot.ready()
        rec = StepRecord(self.run, state.global_step, math.nan, grad_norm, self._lr, tensors, unread=unread)
        self.ring.submit(rec, slot)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._parts is not None:
            self._parts.remove()
            self._parts = None


class FileSink:
    """Writes each StepRecord into the trajectory file: its (V, H) tensors at the step's index in record.steps'
    schedule, the loss, gradient norm, rate and batch at the step itself."""

    def __init__(self, writer: TrajectoryWriter, params: Params) -> None:
        self.writer = writer
        self.losses = params.record.losses
        self.index = {t: i for i, t in enumerate(params.record.schedule(params.train.steps))}

    def __call__(self, rec: StepRecord) -> None:
        w, idx = self.writer, (rec.run, rec.step)
        for name, t in rec.tensors.items():  # none at a step the schedule does not record
            at = (rec.run, self.index[rec.step])
            w.write(name, at, t)
            w.write(f"digest_{name}", at, torch.frombuffer(bytearray(rec.digests[name]), dtype=torch.uint8))
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

