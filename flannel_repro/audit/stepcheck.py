"""The per-step comparison behind `verify`: a recorder sink that checks each step of a rerun as training produces it.

At step t of run r it compares, with the reference:
- each recorded (V, H) slice (W, grad_W, momentum, variance): the rerun's digest with the reference's stored digest,
  and, for a file, the file's own slice, read and hashed now, with that stored digest;
- for a file, the bytes the rerun would record for losses, losses_f32, grad_norm, lr_schedule and batch_indices at
  that step with the file's; for an MLflow run, the f32 loss with the run's digests.json;
- at step 0 of run 0, the rerun's W_initial and scalars with the reference's content record.
A difference where the file no longer agrees with itself (a slice with its digest, a key with its content record)
is corruption: the file changed after it was written. A difference between an intact reference and the rerun is a
divergence. After the last step, the rerun's own content record is compared line by line with the reference's.

    check = StepCheck(ref, masks, stop=True)
    train(params, root, observers=[check], write=False)
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from flannel_repro.audit.bits import compare_slices, f32_bits
from flannel_repro.audit.check import Problem, slice_problems
from flannel_repro.data.masks import Masks
from flannel_repro.recording.recorder import FileSink
from flannel_repro.recording.records import StepRecord
from flannel_repro.trajectory import content
from flannel_repro.trajectory.file import TORCH_DTYPES, as_bytes, flat_index
from flannel_repro.trajectory.layout import STEP_TENSORS, STEP_VALUES, trajectory_layout

if TYPE_CHECKING:
    from flannel_repro.audit.reference import Reference

# Causal: backward (the output projection's half first, then the lookup's, then their sum), then the update.
SLICE_ORDER = ("grad_W_output", "grad_W_input", "grad_W", "W", "momentum", "variance")


@dataclass
class Divergence:
    run: int
    step: int
    tensors: list[str]  # in causal order; the first is the first divergent key ("loss" is the f32 loss)
    detail: dict[str, Any] = field(default_factory=dict)  # per tensor, only for the first divergent step
    notes: list[str] = field(default_factory=list)


class MemoryRecord:
    """What the rerun would write, minus the (V, H) slices themselves: FileSink's target when nothing goes to disk.
    Holds the scalars, W_initial, the per-step values and the per-step digests, so the rerun has a content record."""

    def __init__(self, layout: dict[str, Any]) -> None:
        self.layout = layout
        self.tensors = {k: torch.zeros(s.shape, dtype=TORCH_DTYPES[s.dtype]) for k, s in layout.items()
                        if k not in STEP_TENSORS}
        self.specs = self.tensors  # FileSink reads the shape of a batch_indices row from here

    def write(self, name: str, index: tuple[int, ...], value: torch.Tensor) -> None:
        if name in self.tensors:
            self.tensors[name][index] = value

    def bytes_at(self, name: str, index: tuple[int, ...]) -> bytes:
        return bytes(as_bytes(self.tensors[name][index]))

    def record(self) -> str:
        layout = {k: (s.dtype, s.shape) for k, s in self.layout.items()}
        return content.render(content.entries(layout, lambda k: as_bytes(self.tensors[k])))


class Stop(Exception):
    """Raised from the sink to end the rerun at the first divergent or corrupt step."""


class StepCheck:
    """A recorder sink comparing each step with the reference while training produces it."""

    def __init__(self, ref: Reference, masks: Masks, stop: bool) -> None:
        self.ref = ref
        self.live = masks.live_mask
        self.stop = stop
        self.insp = ref.inspection  # the file's checked view; None for an MLflow run
        m = ref.manifest
        self.digests = {k: [[bytes.fromhex(h) for h in run] for run in v] for k, v in m["digests"].items()}
        self.losses = [[f32_bits(x) for x in run] for run in m["losses_f32"]] if "losses_f32" in m else None
        self.record = ref.record  # {key: content.Entry} or None
        self.memory = MemoryRecord(trajectory_layout(ref.params))
        self.sink = FileSink(self.memory, ref.params)
        self.index = self.sink.index  # training step -> index of the recorded (V, H) slices (record.steps)
        self.steps_checked = 0
        self.divergences: list[Divergence] = []
        self.problems: list[Problem] = []  # corruption the rerun located
        self.reference_s = 0.0  # time spent reading and hashing the reference's own bytes
        self.content_digest: str | None = None  # the rerun's, once every step was checked
        self.record_differences: list[str] = []  # keys whose content record lines differ from the reference's
        self._initial: list[str] | None = None

    def __call__(self, rec: StepRecord) -> None:
        if self._initial is None:
            raise RuntimeError("train() gave the step check no recorded scalars")  # train() calls the hook first
        self.sink(rec)  # what the rerun would record at this step, into memory
        corrupt: list[Problem] = []
        bad = list(self._initial) if (rec.run, rec.step) == (0, 0) else []
        start = time.perf_counter()
        if self.insp is not None:
            self._check_values(rec, bad, corrupt)
        elif self.losses is not None and f32_bits(rec.loss) != self.losses[rec.run][rec.step]:
            bad.append("loss")
        for name in SLICE_ORDER:
            if name in self.digests and name in rec.digests:  # none at a step the schedule does not record
                self._check_slice(name, rec, bad, corrupt)
        self.reference_s += time.perf_counter() - start
        self.steps_checked += 1
        if not bad and not corrupt:
            return
        self.problems += corrupt
        if bad:
            d = Divergence(rec.run, rec.step, bad)
            if not self.divergences:
                self._detail(d, rec)
            self.divergences.append(d)
        if self.stop:
            raise Stop

    def finish(self) -> None:
        """After the last step: the rerun's content record against the reference's, line by line."""
        text = self.memory.record()
        self.content_digest = content.content_digest(text)
        if self.record is None:
            return
        ours = {e.name: e for e in content.parse(text)}
        compared = [k for k in ours if k not in self.ref.unrecorded]  # a notebook file lacks some keys
        self.record_differences = sorted(k for k in compared if self.record.get(k) != ours[k])

    def recorded_scalars(self, scalars: dict[str, torch.Tensor]) -> None:
        """W_initial and the scalars the rerun records, as the recorded params and today's inputs give them (train()
        computes them on its own thread before training), against the reference's content record."""
        for name, value in scalars.items():
            self.memory.write(name, (), value)
        self._initial = []
        if self.record is None:
            return
        for name in ("W_initial", *(k for k in self.memory.layout if not self.memory.layout[k].shape)):
            sha = hashlib.sha256(as_bytes(self.memory.tensors[name])).hexdigest()
            if name in self.record and self.record[name].sha256 != sha:
                self._initial.append(name)

    def _check_values(self, rec: StepRecord, bad: list[str], corrupt: list[Problem]) -> None:
        """The file's per-step values at this step against what the rerun records (file references)."""
        insp, run, t = self.insp, rec.run, rec.step
        for key in STEP_VALUES:
            if key not in self.memory.tensors or key in self.ref.unrecorded or (key == "batch_indices" and t == 0):
                continue
            index = (run, t - 1) if key == "batch_indices" else (run, t)
            ours = self.memory.bytes_at(key, index)
            lo = insp.span(key)[0] + flat_index(self.memory.tensors[key].shape, index) * len(ours)
            if bytes(insp.view[lo : lo + len(ours)]) == ours:
                continue
            if key in insp.changed:
                corrupt.append(Problem(key, "the file's value differs from the rerun's, and the key no longer matches "
                                            "the content record: changed after the file was written", run, t))
            else:
                bad.append("loss" if key == "losses_f32" else key)

    def _check_slice(self, name: str, rec: StepRecord, bad: list[str], corrupt: list[Problem]) -> None:
        run, t = rec.run, rec.step
        stored, ours = self.digests[name][run][self.index[t]], rec.digests[name]
        if self.insp is None:
            if ours != stored:
                bad.append(name)
            return
        found = self.insp.slice_digest(name, run, t)
        if found != stored:
            problems = slice_problems(self.insp, name, run, t, found, slices_intact=None)
            if problems and problems[0].key != name and found == ours:
                problems = [Problem(f"digest_{name}", "the recorded digest was changed after the file was written "
                                                      "(the slice itself matches the rerun)", run, t)]
            elif problems and ours == stored:
                problems = [Problem(p.key, f"{p.what}; the rerun reproduces the recorded digest", run, t)
                            for p in problems]
            corrupt += problems
        elif ours != stored:
            if f"digest_{name}" in self.insp.changed or self.insp.record_changed:
                corrupt.append(Problem(name, f"the slice and its digest were changed together after the file was "
                                             f"written (digest_{name} no longer matches the content record, and the "
                                             "rerun gives another slice)", run, t))
            else:
                bad.append(name)

    def _detail(self, d: Divergence, rec: StepRecord) -> None:
        traj = self.ref.trajectory
        for name in d.tensors:
            if name == "loss" and self.losses is not None:
                d.detail["loss"] = {"reference": self.ref.manifest["losses_f32"][rec.run][rec.step], "rerun": rec.loss}
            elif name in STEP_TENSORS and name in rec.tensors and traj is not None:
                d.detail[name] = compare_slices(rec.tensors[name], traj.step(name, rec.step, rec.run), self.live)
        if traj is None and any(n in STEP_TENSORS for n in d.tensors):
            d.notes.append("elementwise detail (elements, ULPs, token rows) needs the trajectory file: "
                           "run `flannel-repro verify PATH` on the run's file")
