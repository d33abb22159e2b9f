"""What one recorded step is (`StepRecord`), what consumes it (`StepSink`), and what the Trainer hands the recorder
for the current step (`StepObserver`): the types the recorder, the ring, the observers and verify share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


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
    # token motion and indicators, filled by motion.TokenMotion and indicators.TokenIndicators
    motion: dict[str, float] = field(default_factory=dict)
    # The fields above still held as the step's tensors in a ring slot: reading a number off a device waits for
    # it, so the training thread leaves that to the writer thread (`settle`, after the slot's copies have landed).
    unread: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def settle(self) -> None:
        """Fill loss, grad_norm and batch_indices from `unread` (on the writer thread, once the slot is ready)."""
        for name, value in self.unread.items():
            setattr(self, name, value.clone() if name == "batch_indices" else value.item())
        self.unread = {}


class StepSink(Protocol):
    def __call__(self, rec: StepRecord) -> None: ...


class StepObserver:
    """What the Trainer computes for the current step that the record takes, as the tensors it computes: the loss
    and the batch's dataset indices (`compute_loss`) and the pre-clip gradient norm (`_get_grad_norm`)."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | float | None = None

    def observe(self, loss: torch.Tensor, indices: torch.Tensor) -> None:
        self.loss = loss.detach()
        self.indices = indices.detach()
