"""What a training run returns: the file, its digests, the per-step scalars, the token motion and indicators."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flannel_repro.trajectory.content import short_digest


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
    # motion.MOTION_NAMES and indicators.INDICATOR_NAMES -> (runs, steps+1)
    motion: dict[str, list[list[float]]] = field(repr=False)
    file_bytes: int | None = None  # the trajectory file's size on disk
    safetensors_bytes: int | None = None  # the size of its safetensors form (the same for both forms)

    def metrics(self) -> dict[str, Any]:
        return {
            "final_loss": self.final_loss if math.isfinite(self.final_loss) else None,  # JSON has no NaN
            "runtime_s": round(self.runtime_s, 3),
            "steps_per_s": round(self.steps_per_s, 4),
            "trajectory_sha256": self.sha256,
            "content_digest": self.content_digest,
            "content": short_digest(self.content_digest),  # the same, in a table column (verify's audited_content)
            "trajectory_bytes": self.file_bytes,
            # the safetensors form's size over the file's: 1.0 for safetensors, about 3 packed (record.format)
            "trajectory_ratio": round(self.safetensors_bytes / self.file_bytes, 3) if self.file_bytes else None,
            "n_live": self.n_live,
            "n_dead": self.n_dead,
            "dead_share": round(self.n_dead / (self.n_live + self.n_dead), 4),
            "n_dead_bytes": self.n_dead_bytes,
            "n_dead_merges": None if self.n_dead_bytes is None else self.n_dead - self.n_dead_bytes,
            "device": self.device,
        }
