"""What a train run logs to tracking, around the training itself.

Before training: every resolved param, where the trajectory goes, the code (git), the DVC experiment and a short
description (MLflow's note: seeds, steps, device, and the command that audits the run). During it: loss, gradient
norm, learning rate, the mean norms of the live and dead rows of W and the token motion (motion.py), step by step
(`StepMetrics`, a `train()` observer). After the reports are written: the file's hashes, provenance, inputs,
summary metrics, artifacts (params, digest manifest, the loss curve as CSV and PNG) and the final description.
`tracked_run` opens and closes the run around all of it; stage.py's `run_train_stage` uses it. Everything goes
through the `tracking.Tracker` interface.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from flannel_repro.core.config import Params
from flannel_repro.core.fsutil import project_root
from flannel_repro.core.plots import loss_curve_png
from flannel_repro.data.masks import Masks, load_masks
from flannel_repro.recording.motion import set_means, token_sets
from flannel_repro.recording.records import StepRecord
from flannel_repro.tracking.base import DIGEST_TAG, SHA256_TAG, InputFile, NullTracker, Tracker
from flannel_repro.training.model import pick_device
from flannel_repro.trajectory.content import short_digest
from flannel_repro.trajectory.file import load_trajectory, manifest
from flannel_repro.trajectory.provenance import dvc_tags, fingerprint_tags, git_tags

if TYPE_CHECKING:
    from flannel_repro.training.result import TrainResult

SUMMARY_METRICS = ("final_loss", "runtime_s", "steps_per_s")  # metrics/train.json's, logged at the last step
TOKEN_COUNTS = ("n_live", "n_dead", "dead_share", "n_dead_bytes", "n_dead_merges")  # ... logged as tokens.* params


@contextlib.contextmanager
def tracked_run(params: Params, root: Path, *, resume: bool = False) -> Iterator[tuple[Tracker, list[StepMetrics]]]:
    """The tracking run of one `train` and its per-step metrics observer (none when tracking is off).

    Opened before any training (an unreachable server fails here, in seconds), with the params and tags logged;
    from then on a store outage is one warning line and what the store misses is kept (tracking/spool.py). Closed
    FINISHED when the block ends, KILLED with the reason as a tag when a signal stops it, FAILED with the error
    when it raises. A resumed run is a new tracking run tagged `flannel.resumed_from` with the interrupted one."""
    masks = None
    if params.tracking.enabled:  # read before a run exists, so a missing masks file leaves no run behind
        masks = load_masks(params.paths.under(root).masks, params.model.vocab_size)
    device_type = pick_device(params.train.device).type
    tracker = open_tracker(params, root, device_type)
    metrics = [StepMetrics(tracker, masks)] if masks is not None else []
    try:
        log_run_start(tracker, params, root, device_type)
        if resume:
            tracker.set_tags({"flannel.resumed": "true"})
        tracker.tolerate_outages()
        yield tracker, metrics
    except BaseException as e:
        _close_failed(tracker, e)
        raise
    tracker.finish("FINISHED")


class StepMetrics:
    """The per-step sink: loss, gradient norm and learning rate (steps 1..N), the mean L2 norm of the live and of
    the dead rows of W (steps 0..N, when W is recorded), computed in float32, and the token motion that train()'s
    `motion.TokenMotion` and `indicators.TokenIndicators` put in the record (drift, speed, force and the
    under-training indicators; steps 0..N)."""

    def __init__(self, tracker: Tracker, masks: Masks) -> None:
        self.tracker = tracker
        self.names = [n for n, count in (("W_norm_live", masks.n_live), ("W_norm_dead", masks.n_dead)) if count]
        self.token_sets = token_sets(masks)

    def __call__(self, rec: StepRecord) -> None:
        metrics: dict[str, float] = {}
        if rec.step > 0:
            metrics.update(loss=rec.loss, grad_norm=rec.grad_norm, learning_rate=rec.learning_rate)
        w = rec.tensors.get("W")
        if w is not None:
            live, dead = set_means(w.float().norm(dim=1).numpy(), self.token_sets)
            metrics.update({n: v for n, v in (("W_norm_live", live), ("W_norm_dead", dead)) if n in self.names})
        metrics.update({n: v for n, v in rec.motion.items() if not math.isnan(v)})  # NaN: no tokens of that kind
        if metrics:
            self.tracker.log_metrics(metrics, rec.step)

    def abandoned(self) -> None:
        """The recording ring stopped while this observer's call was still in progress (ring.py)."""
        self.tracker.stop_waiting()


def run_names(params: Params, device_type: str, exp_name: str | None = None,
              content_digest: str | None = None) -> tuple[str, dict[int, str] | None]:
    """`flannel7-seed42-500steps-cpu` for one run, renamed `flannel7-seed42-500steps-cpu-3f2a9c1b04de` once the
    content digest of its numbers is known; under `dvc exp run` the DVC experiment's name replaces `flannel7`. With
    num_runs > 1 the parent is `flannel7-seeds42-44-...` and each child is named for its own seed. A label mode
    other than the notebook's is appended to the device. Two runs share a name only if they recorded the same
    numbers (in the same DVC experiment)."""
    t = params.train
    base = exp_name or "flannel7"
    suffix = f"{t.steps}steps-{device_type}" + ("" if t.label_mode == "notebook" else f"-{t.label_mode}")
    if content_digest:
        suffix += f"-{short_digest(content_digest)}"
    if t.num_runs == 1:
        return f"{base}-seed{t.train_seed}-{suffix}", None
    children = {r: f"{base}-seed{t.train_seed + r}-{suffix}" for r in range(t.num_runs)}
    return f"{base}-seeds{t.train_seed}-{t.train_seed + t.num_runs - 1}-{suffix}", children


def dvc_exp_name() -> str | None:
    """The DVC experiment this process runs in: `dvc exp run` (queued or not) sets DVC_EXP_NAME."""
    return os.environ.get("DVC_EXP_NAME") or None


def open_tracker(params: Params, root: Path, device_type: str) -> Tracker:
    """The run's tracker, opened before training: an unreachable server or unusable store fails here."""
    cfg = params.tracking
    if not cfg.enabled:
        return NullTracker()
    from flannel_repro.core.store_uri import tracking_uri
    from flannel_repro.tracking.mlflow_store import MlflowTracker
    from flannel_repro.tracking.spool import spool_folder

    name, children = run_names(params, device_type, dvc_exp_name())
    spool = spool_folder(project_root(Path(root)))
    return MlflowTracker(tracking_uri(cfg, root), cfg.experiment, name, children, spool=spool,
                         system_metrics=cfg.system_metrics)


def log_run_start(tracker: Tracker, params: Params, root: Path, device_type: str) -> None:
    """Before training: every resolved param (as params.yaml writes it: `[]`, `null`, `true`), where the trajectory
    goes, the code (git), the DVC experiment, and a first description."""
    tracker.log_params(params.flat())
    tracker.set_tags({"trajectory.path": params.paths.trajectory, **git_tags(Path(root)), **dvc_tags(os.environ)})
    if tracker.run_id is not None:
        tracker.set_note(run_note(params, tracker.run_id, device_type))


def run_note(params: Params, run_id: str, device: str, run: int | None = None,
             result: TrainResult | None = None) -> str:
    """A run's description (markdown): its seeds, steps and device, what it wrote once finished (file sha256 and the
    content digest of its numbers), and the command that audits it. `run_id` is the file's
    run; `run` names one seed of a file that holds several (its child run is audited through the file's run)."""
    t = params.train
    if run is not None:
        what = f"seed {t.train_seed + run}, run {run + 1} of {t.num_runs} in the file of run `{run_id}`"
    elif t.num_runs > 1:
        what = f"{t.num_runs} runs, seeds {t.train_seed}-{t.train_seed + t.num_runs - 1} (one child run each)"
    else:
        what = f"seed {t.train_seed}"
    path = params.paths.trajectory
    lines = [f"Flannel 7 training: {what}; {t.steps} steps, init seed {t.init_seed}; on {device}.", ""]
    if result is None:
        lines.append(f"- trajectory: `{path}` (recording)")
    else:
        lines.append(f"- trajectory: `{path}`, sha256 `{result.sha256}`")
        if result.content_digest:  # equal for two runs if and only if they recorded the same numbers
            lines.append(f"- content digest of its numbers: `{result.content_digest}`")
    exp = dvc_exp_name()
    if exp is None:
        lines.append(f"- audit it: `flannel-repro verify {path}` or `flannel-repro verify --run-id {run_id}`")
    else:  # the workspace's file is another experiment's once the next one runs
        lines.append(f"- audit it: `dvc exp apply {exp}` (its params and trajectory into the workspace), then "
                     f"`flannel-repro verify {path}`; or `flannel-repro verify --run-id {run_id}` from anywhere")
    return "\n".join(lines)


def log_train_result(tracker: Tracker, params: Params, root: Path, result: TrainResult) -> None:
    """After the reports are written: hashes, provenance, inputs, summary metrics and artifacts."""
    if tracker.run_id is None:
        return
    paths = params.paths.under(root)
    with load_trajectory(result.trajectory) as traj:
        doc = manifest(traj)
    inputs = [InputFile(name, path, doc["inputs"][f"{name}_sha256"]) for name, path in paths.inputs().items()]
    _describe_finished(tracker, params, result)
    tracker.set_name(*run_names(params, result.fingerprint["device_type"], dvc_exp_name(), result.content_digest))
    tracker.set_tags({
        SHA256_TAG: result.sha256,
        DIGEST_TAG: result.content_digest,  # equal iff the recorded numbers are bit-identical
        **fingerprint_tags(result.fingerprint),
        **{f"version.{k}": v for k, v in doc["versions"].items()},
        **{f"inputs.{f.name}.sha256": f.sha256 for f in inputs},
    })
    tracker.log_inputs(inputs)
    # The dead set is a constant of the run's data: params, not one-point charts. The rest is the run's summary.
    found = result.metrics()
    tracker.log_params({f"tokens.{k}": found[k] for k in TOKEN_COUNTS})
    summary = {k: found[k] for k in SUMMARY_METRICS if isinstance(found[k], (int, float)) and math.isfinite(found[k])}
    tracker.log_metrics(summary, step=params.train.steps)
    with tempfile.TemporaryDirectory(prefix="flannel-tracking-") as tmp:
        staged = Path(tmp)
        (staged / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False), encoding="utf-8")
        (staged / "digests.json").write_text(json.dumps(doc, sort_keys=True), encoding="utf-8")
        name, _ = run_names(params, result.fingerprint["device_type"], dvc_exp_name(), result.content_digest)
        loss_curve_png(result.losses, params.train.train_seed, staged / "loss_curve.png", title=name)
        for name in ("params.yaml", "digests.json", "loss_curve.png"):
            tracker.log_artifact(staged / name)
    tracker.log_artifact(paths.metrics, "metrics")
    tracker.log_artifact(paths.loss_curve, "metrics")
    if paths.trace.is_file():
        tracker.log_artifact(paths.trace, "trace")  # the op traces of record.trace_steps (docs/traces.md)
    if params.tracking.upload_trajectory:
        tracker.log_artifact(result.trajectory, "trajectory")


def _describe_finished(tracker: Tracker, params: Params, result: TrainResult) -> None:
    """The final descriptions: the file's run, and with several seeds each seed's child run."""
    device = f"{result.device}, {result.fingerprint.get('torch_threads')} torch threads"
    tracker.set_note(run_note(params, tracker.run_id, device, result=result))
    if params.train.num_runs > 1:
        for run in range(params.train.num_runs):
            tracker.set_note(run_note(params, tracker.run_id, device, run=run, result=result), run=run)


def _close_failed(tracker: Tracker, error: BaseException) -> None:
    """End the run KILLED (a stop signal, Ctrl-C) or FAILED, with the reason in the `flannel.error` tag."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    try:
        tracker.finish(status, error=what)
    except Exception as e:  # the store failing too must not hide the training error, which is re-raised
        print(f"tracking: could not mark run {tracker.run_id} {status} ({e})", file=sys.stderr)
        return
    if tracker.pending is not None:
        print(f"tracking: run {tracker.run_id} is incomplete; what the store missed is kept in {tracker.pending}: "
              "send it with `flannel-repro sync`", file=sys.stderr)
