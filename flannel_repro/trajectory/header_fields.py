"""What every trajectory reader derives from its header in the same way: the params, the JSON metadata, the runs,
the steps and the training step of each recorded index. `Trajectory` (file.py), `PackedTrajectory`
(packed_reader.py) and `NotebookTrajectory` (notebook.py) mix it in; each sets `path`, `metadata` and `shapes` and
reads tensors with `traj[name]`.

    traj.params.train.steps       # from the header's params
    traj.recorded_steps           # (0, 1, ..., 500), or the record.steps schedule
    traj.index_of(250)            # the index of training step 250 in the per-step tensors
"""

from __future__ import annotations

import bisect
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from flannel_repro.core.config import Params, params_from_json
from flannel_repro.core.errors import FlannelError
from flannel_repro.trajectory.layout import SCHEDULE_KEY


class HeaderFields:
    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]

    def __getitem__(self, name: str) -> Any:
        raise NotImplementedError

    @cached_property
    def params(self) -> Params:
        return params_from_json(self.metadata["params"], f"{self.path} (header params)")

    def meta_json(self, key: str) -> Any:
        return json.loads(self.metadata.get(key, "null"))

    @property
    def n_runs(self) -> int:
        return self.params.train.num_runs

    @property
    def n_steps(self) -> int:
        return self.params.train.steps

    @cached_property
    def recorded_steps(self) -> tuple[int, ...]:
        """The training step of each index of the per-step (V, H) tensors (record.steps; 0..steps by default)."""
        if SCHEDULE_KEY in self.shapes:
            return tuple(self[SCHEDULE_KEY].tolist())
        return tuple(range(self.n_steps + 1))

    def index_of(self, t: int) -> int:
        """The index of training step `t` in the per-step (V, H) tensors; FlannelError if it was not recorded. A
        negative `t` counts recorded steps from the end, as a Python index does (-1: the last recorded step)."""
        steps = self.recorded_steps
        if -len(steps) <= t < 0:
            return len(steps) + t
        i = bisect.bisect_left(steps, t)
        if i < len(steps) and steps[i] == t:
            return i
        near = ", ".join(str(s) for s in steps[max(i - 1, 0) : i + 1])
        raise FlannelError(f"{self.path}: step {t} was not recorded (record.steps = {self.params.record.steps!r}); "
                           f"the nearest recorded steps are {near} (traj.recorded_steps lists them all)")
