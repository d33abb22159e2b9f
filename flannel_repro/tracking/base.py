"""Tracking, as the training and audit code see it: small interfaces and a no-op.

`Tracker` is where a train run reports to (params, per-step metrics, tags, inputs, artifacts, finish); it is also a
`train()` observer, told when each run of a file starts and ends. `NullTracker` stands in when `tracking.enabled`
is false. `AuditStore` is where `verify` finds the run it audits and logs its verdict. The one implementation of
each is MLflow's, in mlflow_store.py (with spool.py, the only modules that import mlflow); what a train run logs is
decided in training/train_log.py.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The two tags that identify what a train run wrote, short enough for a runs table column: the file's sha256 and the
# content digest of its numbers (trajectory/content.py).
SHA256_TAG = "sha256"
DIGEST_TAG = "digest"


@dataclass(frozen=True)
class InputFile:
    """A file a run read, identified by the sha256 of its full contents."""

    name: str  # "corpus", "tokenizer", "masks"
    path: Path
    sha256: str


@dataclass(frozen=True)
class AuditRun:
    """One verify result, as its audit run records it."""

    verdict: str  # "identical", "diverged" or "corrupt"
    first_divergent_step: int | None
    fingerprint: Mapping[str, Any]  # the machine the rerun ran on
    params: Mapping[str, Any]  # the rerun's params, flattened (`train.steps`, ...)
    started_at: float  # wall clock, seconds since the epoch
    runtime_s: float  # of the rerun(s)
    steps_checked: int
    steps_per_s: float | None
    report: Path | None = None  # verify.json, logged as an artifact
    tags: Mapping[str, str] = field(default_factory=dict)  # the origin op of a divergence (tracing/origin.py)


def param_text(value: Any) -> str:
    """A param value as params.yaml users write it: `[]`, `["rerun"]`, `null`, `true`, `0.001`; a string as is."""
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


class Tracker(abc.ABC):
    """Where a training run reports to. Also a `train()` observer: `start_run(run, seed)` / `end_run(run)` bracket
    each of the `num_runs` runs of one file."""

    run_id: str | None = None  # the tracking run of the whole file; None when nothing is tracked
    pending: Path | None = None  # after finish(): what the store did not take, kept for `flannel-repro sync`

    @abc.abstractmethod
    def tolerate_outages(self) -> None:
        """Training starts: from now on a store that stops answering costs a warning line, not the run; what it
        misses is kept and sent when it answers again."""

    @abc.abstractmethod
    def stop_waiting(self) -> None:
        """A call to the store was left in progress when the run stopped (the stop did not wait for it): keep every
        later call for `flannel-repro sync` rather than wait on the store again."""

    @abc.abstractmethod
    def resumed_from(self, run_id: str) -> None:
        """This run continues the interrupted tracking run `run_id` (`train --resume`)."""

    @abc.abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of the run in progress at `step`; buffered, not one call per step."""

    @abc.abstractmethod
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    @abc.abstractmethod
    def log_inputs(self, files: Sequence[InputFile]) -> None: ...

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    def set_name(self, name: str, children: Mapping[int, str] | None = None) -> None:
        """Rename the file's run (and each seed's child run) once the run is known by what it recorded."""

    @abc.abstractmethod
    def set_note(self, text: str, run: int | None = None) -> None:
        """The description (markdown) of the file's run, or with `run` of that seed's run (the file's run when the
        file holds one)."""

    @abc.abstractmethod
    def start_run(self, run: int, seed: int) -> None: ...

    @abc.abstractmethod
    def end_run(self, run: int) -> None: ...

    @abc.abstractmethod
    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Flush what is buffered and close the run with `status` ("FINISHED", "FAILED" or "KILLED")."""


class NullTracker(Tracker):
    """tracking.enabled: false. Records nothing."""

    def tolerate_outages(self) -> None:
        pass

    def stop_waiting(self) -> None:
        pass

    def resumed_from(self, run_id: str) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_inputs(self, files: Sequence[InputFile]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def set_name(self, name: str, children: Mapping[int, str] | None = None) -> None:
        pass

    def set_note(self, text: str, run: int | None = None) -> None:
        pass

    def start_run(self, run: int, seed: int) -> None:
        pass

    def end_run(self, run: int) -> None:
        pass

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        pass


class AuditStore(abc.ABC):
    """Where `verify` finds the train run it audits, and logs its verdict beside it as an audit run."""

    uri: str

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the store holds anything yet (a SQLite file not yet created holds no run to audit)."""

    @abc.abstractmethod
    def run_manifest(self, run_id: str) -> dict[str, Any]:
        """The `digests.json` manifest train run `run_id` logged (`trajectory.manifest` form)."""

    @abc.abstractmethod
    def find_train_run(self, trajectory_sha256: str) -> str | None:
        """The newest finished train run that wrote a file with this sha256, if any."""

    @abc.abstractmethod
    def log_audit_run(self, audited_run_id: str, audit: AuditRun) -> str:
        """Log a verify result as its own run nested under the audited run, and tag the audited run with the
        verdict; returns the audit run's id."""
