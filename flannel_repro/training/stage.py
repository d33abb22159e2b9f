"""Stage 4, `flannel-repro train`: the training run (loop.py), tracked and reported.

`run_train_stage(params, root)` is the stage as the CLI, dvc.yaml and the tests run it: it checks the outputs and
inputs, holds the stop signals (recording/stopping.py), opens the tracking run (train_log.py), trains, writes the
DVC metrics and loss curve, and logs the results.

    result, run_id = run_train_stage(load_params("params.yaml"), root=Path("."))
    result.sha256, result.final_loss
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError, TrackingIncomplete
from flannel_repro.core.fsutil import atomic_output, write_json
from flannel_repro.recording.indicators import INDICATOR_NAMES
from flannel_repro.recording.motion import MOTION_NAMES
from flannel_repro.recording.stopping import StopSignals
from flannel_repro.training.loop import train
from flannel_repro.training.preflight import check_before_training, check_inputs
from flannel_repro.training.result import TrainResult
from flannel_repro.training.train_log import log_train_result, tracked_run


def run_train_stage(
    params: Params, root: Path, *, observers: Sequence[Any] = (), progress: bool = True, resume: bool = False
) -> tuple[TrainResult, str | None]:
    """The train stage: returns the training result and the tracking run id (None when tracking is disabled).

    observers: extra `train()` observers (tests). A resumed run (`resume=True`) is a new tracking run, tagged with
    the interrupted one: train() replays the steps before the resume point to the observers, so its metrics are
    complete. SIGINT, SIGTERM and SIGHUP raise `Interrupted` (stopping.py); a tracking store that stopped answering
    and did not come back raises `TrackingIncomplete` once everything else is done."""
    root = Path(root)
    # Before the tracking run exists: the outputs, room for the trajectory, and the inputs in pipeline order.
    check_before_training(params, root, write=True, resume=resume)
    check_inputs(params, root)
    with StopSignals() as stops, tracked_run(params, root, resume=resume) as (tracker, metrics):
        result = train(params, root, observers=[*metrics, *observers, tracker], progress=progress, resume=resume,
                       stops=stops, checked=True)
        try:
            write_reports(params, result, root)  # still inside the commit's critical section
        except FlannelError as e:
            raise FlannelError(f"{e}; the trajectory itself is complete and in place ({params.paths.trajectory}, "
                               f"sha256 {result.sha256}): run `flannel-repro train` again to write the reports once "
                               "they can be") from None
        stops.honour()
        log_train_result(tracker, params, root, result)
    if tracker.pending is not None:
        raise TrackingIncomplete(
            f"tracking run {tracker.run_id} is incomplete: the store did not answer again, so what it missed is kept "
            f"in {tracker.pending}; send it with `flannel-repro sync`", result=result, run_id=tracker.run_id)
    return result, tracker.run_id


def write_reports(params: Params, result: TrainResult, root: Path) -> None:
    """metrics/train.json (DVC metrics) and the per-step CSV (DVC plots): loss, gradient norm, learning rate and
    the token motion and the under-training indicators of live and dead tokens. The previous audit's verdict is
    removed: it was about another file."""
    paths = params.paths.under(root)
    drop_stale_verdicts(params, root)
    write_json(paths.metrics, result.metrics())
    with atomic_output(paths.loss_curve) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            curves = (*MOTION_NAMES, *INDICATOR_NAMES)
            w.writerow(["run", "step", "loss", "grad_norm", "learning_rate", *curves])
            for run, losses in enumerate(result.losses):
                for step in range(1, len(losses)):
                    w.writerow([run, step, repr(losses[step]), repr(result.grad_norms[run][step]),
                                repr(result.learning_rates[run][step]),
                                *(repr(result.motion[name][run][step]) for name in curves)])



def drop_stale_verdicts(params: Params, root: Path) -> None:
    """Remove the verdict files of the audit of the trajectory this run replaces (audit.report, audit.metrics), so
    that no verdict is shown beside a run it did not audit (`dvc exp run -S 'audit.verify=[]'` leaves the verify
    stage out). Only a file that reads as a verdict (a JSON object with a `verdict`) is removed."""
    for rel in (params.audit.report, params.audit.metrics):
        path = Path(root) / rel
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # absent, or not a verdict: not ours to remove
        if isinstance(doc, dict) and "verdict" in doc:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise FlannelError(f"{path}: cannot remove the previous audit's verdict ({e.strerror}); remove it "
                                   "by hand, it is about the file this run replaced") from None
    if _run_by_dvc(Path(root)):
        _drop_locked_audits(Path(root) / "dvc.lock")


def _run_by_dvc(root: Path) -> bool:
    """Whether this is the train stage of `dvc repro` or `dvc exp run` in `root` (DVC sets DVC_STAGE and DVC_ROOT
    for a stage's command). A plain `flannel-repro train` leaves dvc.lock to DVC: `dvc status` then shows both
    stages changed."""
    stage, dvc_root = os.environ.get("DVC_STAGE", ""), os.environ.get("DVC_ROOT")
    if stage.rsplit(":", 1)[-1] != "train" or not dvc_root:
        return False
    with contextlib.suppress(OSError):
        return Path(dvc_root).resolve() == root.resolve()
    return False


def _drop_locked_audits(lock: Path) -> None:
    """Remove dvc.lock's entries of the verify stage (`verify@rerun`): they record the audit of the file this run
    replaces. DVC writes the entry again when the verify stage reruns; with `audit.verify: []` there is none, and no
    entry stays behind for files that are gone. DVC (3.x, `Lockfile.dump_stages`) rereads dvc.lock before it records
    the train stage, so the entry stays removed and the file is written again in DVC's own layout."""
    try:
        doc = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # no pipeline here (a plain `flannel-repro train`), or not ours to fix
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        return
    stale = [name for name in stages if name == "verify" or name.startswith("verify@")]
    if stale:
        for name in stale:
            del stages[name]
        with atomic_output(lock) as tmp:
            tmp.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000), encoding="utf-8")
