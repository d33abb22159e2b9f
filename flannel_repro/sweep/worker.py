"""One point of a sweep, as it runs on a node: a workspace of its own, the train stage, a DVC experiment.

`run_point(task, node)` is what the Ray task calls (cluster.py); it only runs programs (git, dvc, flannel-repro) in
a scratch workspace, so nothing here needs Ray:

1. the workspace `<scratch>/<experiment name>`: a git clone of the project at the sweep's baseline commit, made
   under a temporary name and renamed into place, its DVC cache pointed at the shared cache (or its default remote
   set to the sweep's DVC remote), the train stage's inputs checked out (or pulled);
2. the point's values written into params.yaml by DVC's own `-S` code (as `dvc exp run -S` writes them);
3. `flannel-repro train --resume`, with DVC_EXP_NAME and DVC_EXP_BASELINE_REV set as `dvc exp run` sets them: a
   retry after a kill -9 continues from the last checkpoint the killed attempt left in this workspace (a retry on
   another node, without the workspace, starts from step 0); the killed attempt's tracking run is closed KILLED
   when the new one opens (mlflow_store.close_dead_runs);
4. `flannel-repro exposure` (the stage after train), then `dvc exp save` of both stages (the trajectory goes into
   the cache, the experiment commit names the params, metrics and lock), then `dvc exp push` to the project's git
   remote (and the outputs to the DVC remote, when there is one).

A train that exits 2 (a bad value) is a failed point, reported and not retried; a train killed by a signal is a lost
worker (`WorkerLost`), which Ray retries (cluster.py). The child process dies with this one (PR_SET_PDEATHSIG), so a
worker killed with kill -9 leaves no training behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flannel_repro.core.config import load_params

# How long a stopped train (Ctrl-C of the driver) may take to close its tracking run and keep its checkpoint.
STOP_GRACE_S = 60
PR_SET_PDEATHSIG = 1


class WorkerLost(Exception):
    """The point's train was killed by a signal (kill -9, the OOM killer): retried by Ray."""


class PointFailed(Exception):
    """The point itself is wrong (a bad value, exit 2) or its record could not be made: reported, not retried."""


@dataclass(frozen=True)
class PointTask:
    name: str  # the DVC experiment's name (sweep-<digest of baseline and overrides>)
    overrides: tuple[str, ...]  # section.key=value, as `dvc exp run -S` takes them
    git_url: str  # the project's git repository (a path or URL every node reaches): cloned, and pushed to
    baseline_rev: str  # the commit every point starts from
    scratch: str  # where the node keeps its workspaces
    inputs: tuple[str, ...]  # the train stage's DVC-tracked inputs (corpus, tokenizer, masks)
    cache_dir: str | None  # a DVC cache every node shares; None: the DVC remote below
    dvc_remote: str | None  # the DVC remote's URL, for a cluster without a shared cache
    tracking_uri: str | None  # MLFLOW_TRACKING_URI for the train (None: params.yaml's tracking.uri)


@dataclass(frozen=True)
class PointResult:
    name: str
    overrides: tuple[str, ...]
    node: str
    status: str  # "finished", "done before" (not rerun), "failed", "stopped"
    content_digest: str | None = None
    trajectory_sha256: str | None = None
    final_loss: float | None = None
    dead_share: float | None = None
    wall_s: float | None = None
    resumed: bool = False
    fingerprint: str | None = None  # the device fingerprint's short digest
    message: str | None = None
    phases: dict[str, float] | None = None  # seconds: workspace (clone, inputs), train (process), record (DVC)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": list(self.overrides)}


def run_point(task: PointTask, node: str) -> PointResult:
    """Train one point in its workspace on this node and push it as a DVC experiment."""
    start = time.monotonic()
    ws = workspace(task)
    apply_overrides(ws / "params.yaml", task.overrides)
    resumed = any((ws / ".flannel" / "checkpoints").rglob("resume.json"))
    trained = time.monotonic()
    if not trained_already(ws):  # an attempt stopped after its train ended and before the record was made
        train(ws, task, resume=resumed)
    recorded = time.monotonic()
    # The stages after train that the point's experiment holds too (the audit is left to --audit)
    run([sys.executable, "-m", "flannel_repro", "exposure"], ws, "count the point's exposure")
    params = load_params(ws / "params.yaml")
    metrics = json.loads((ws / params.paths.metrics).read_text(encoding="utf-8"))
    fingerprint = _fingerprint(ws / params.paths.trajectory)
    save_and_push(ws, task, node, fingerprint, (params.paths.metrics, params.paths.loss_curve))
    end = time.monotonic()
    phases = {"workspace": trained - start, "train": recorded - trained, "record": end - recorded}
    return PointResult(
        name=task.name, overrides=task.overrides, node=node, status="finished",
        content_digest=metrics.get("content_digest"), trajectory_sha256=metrics.get("trajectory_sha256"),
        final_loss=metrics.get("final_loss"), dead_share=metrics.get("dead_share"),
        wall_s=round(end - start, 3), resumed=resumed, fingerprint=fingerprint,
        phases={k: round(v, 3) for k, v in phases.items()},
    )


def workspace(task: PointTask) -> Path:
    """The point's workspace on this node, made once: a later attempt on the same node finds its checkpoints."""
    ws = Path(task.scratch) / task.name
    if not (ws / ".git").is_dir():
        tmp = ws.with_name(f".{ws.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        run(["git", "clone", "--quiet", "--no-checkout", task.git_url, str(tmp)], tmp.parent, "clone the project")
        run(["git", "checkout", "--quiet", "--detach", task.baseline_rev], tmp, "check out the sweep's baseline")
        if task.cache_dir is not None:
            dvc(["config", "--local", "cache.dir", task.cache_dir], tmp)
        if task.dvc_remote is not None:
            dvc(["remote", "add", "--local", "--force", "--default", "sweep", task.dvc_remote], tmp)
        os.rename(tmp, ws)
    # The inputs: links from the shared cache, or pulled from the remote (a no-op once they are here).
    dvc(["pull" if task.cache_dir is None else "checkout", "--quiet", *task.inputs], ws)
    return ws


def trained_already(ws: Path) -> bool:
    """Whether the workspace holds the finished train of its params.yaml: the metrics name the trajectory's sha256,
    and the trajectory records these params. A retry then goes straight to the record, with no second run."""
    from flannel_repro.core.errors import FlannelError
    from flannel_repro.core.fsutil import sha256_file
    from flannel_repro.trajectory.file import load_trajectory

    params = load_params(ws / "params.yaml")
    metrics_path, trajectory = ws / params.paths.metrics, ws / params.paths.trajectory
    if not (metrics_path.is_file() and trajectory.is_file()):
        return False
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        if metrics.get("trajectory_sha256") != sha256_file(trajectory):
            return False
        with load_trajectory(trajectory) as traj:
            return traj.params == params
    except (FlannelError, OSError, ValueError, AttributeError):
        return False


def apply_overrides(params_file: Path, overrides: tuple[str, ...]) -> None:
    """Write the point's values into params.yaml with the code `dvc exp run -S` uses (the file's comments and order
    are kept). The workspace's file is first put back to the baseline's, so a retry applies them to the same text."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    run(["git", "checkout", "--quiet", "--", params_file.name], params_file.parent, "restore params.yaml")
    dvc_apply(str(params_file), list(overrides))


def train(ws: Path, task: PointTask, resume: bool) -> None:
    """`flannel-repro train --quiet [--resume]` in the workspace, as a child that dies with this process. Ctrl-C of
    the driver (Ray cancels the task with a KeyboardInterrupt here) stops it as Ctrl-C stops a train: at a step
    boundary, its tracking run ended KILLED, its checkpoint kept for the next attempt."""
    env = {**os.environ, "DVC_EXP_NAME": task.name, "DVC_EXP_BASELINE_REV": task.baseline_rev}
    if task.tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = task.tracking_uri
    argv = [sys.executable, "-m", "flannel_repro", "train", "--quiet", *(["--resume"] if resume else [])]
    log_path = ws / ".flannel" / "sweep-train.log"  # .flannel/ is git-ignored: not part of the experiment
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            while proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    last = tail[-1] if tail else "(no output)"
    if proc.returncode < 0:
        raise WorkerLost(f"train was killed by {signal.Signals(-proc.returncode).name}: {last}")
    if proc.returncode != 0:
        raise PointFailed(f"train exited {proc.returncode}: {last}")


def save_and_push(ws: Path, task: PointTask, node: str, fingerprint: str | None, reports: tuple[str, ...]) -> None:
    """The point as a DVC experiment (its outputs into the cache), pushed to the project's git remote; with a DVC
    remote, the outputs go there too (`dvc exp push` pushes them). `reports`: the train stage's outputs that git
    keeps (metrics, loss curve), named because `dvc exp save` leaves out files git does not track yet."""
    message = json.dumps({"flannel.sweep": task.name, "node": node, "fingerprint": fingerprint})
    include = [a for path in reports for a in ("--include-untracked", path)]
    dvc(["exp", "save", "--quiet", "--force", "--name", task.name, "--message", message, *include, "train",
         "exposure"], ws)
    cache = ["--no-cache"] if task.dvc_remote is None else ["--remote", "sweep"]
    dvc(["exp", "push", "--quiet", "--force", *cache, task.git_url, task.name], ws)


def _fingerprint(trajectory: Path) -> str | None:
    """The short digest of the device fingerprint the trajectory's header records (provenance.py)."""
    from flannel_repro.sweep.nodes import fingerprint_digest
    from flannel_repro.trajectory.file import load_trajectory

    with load_trajectory(trajectory) as traj:
        return fingerprint_digest(traj.meta_json("fingerprint"))


def node_name() -> str:
    return socket.gethostname()


def dvc(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return run([sys.executable, "-m", "dvc", *args], cwd, f"dvc {args[0]}", env)


def run(argv: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise PointFailed(f"could not {what} in {cwd}: {why[-1] if why else f'exit {proc.returncode}'}")
    return proc.stdout


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the worker that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
