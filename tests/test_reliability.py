"""Crash safety and resume: kill -9 at a random step and during the resume, Ctrl-C, a full disk, concurrent runs.

Every faulted run must leave the output path untouched (a previous file there keeps its bytes), no temporary file
beyond the resumable partial trajectory, and `train --resume` must end in the same sha256 as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_tiny_data, write_params

from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import TMP_PREFIX, sha256_file
from flannel_repro.recording.checkpoint import Checkpoints, checkpoint_root
from flannel_repro.training.loop import train
from flannel_repro.training.stage import write_reports

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
PREVIOUS = b"a previous trajectory that no failed run may touch\n"
STEPS, EVERY = 36, 3
KILL_PARAMS = {"train": {"steps": STEPS, "checkpoint_every": EVERY, "log_every": 1}}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{TMP_PREFIX}*"))


def _start(cwd: Path, *args: str, quiet: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flannel_repro", "train", *(["-q"] if quiet else []), *args]
    # Ctrl-C reaches a foreground command with SIGINT at its default; a test runner started in the background
    # (as CI may be) would hand its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _marker_step(project: Path) -> tuple[int, int] | None:
    try:
        doc = json.loads((checkpoint_root(project, TRAJ) / "resume.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return doc["run"], doc["step"]


def _wait_for_marker(proc: subprocess.Popen, project: Path, at_least: int, timeout: float = 240) -> int:
    """Poll the resume marker until it names a step >= at_least; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _marker_step(project)
        if m is not None and m[1] >= at_least:
            return m[1]
        if proc.poll() is not None:
            raise AssertionError(f"train ended before step {at_least}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {at_least} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data) -> dict:
    """The uninterrupted run of KILL_PARAMS, in-process: its sha256 and loss-curve bytes."""
    root = tmp_path_factory.mktemp("reference")
    copy_tiny_data(tiny_data, root)
    params = load_params(write_params(root, KILL_PARAMS))
    result = train(params, root, progress=False)
    write_reports(params, result, root)
    return {"sha256": result.sha256, "loss_curve": (root / params.paths.loss_curve).read_bytes()}


@pytest.fixture
def project(tiny_project) -> Path:
    write_params(tiny_project, KILL_PARAMS)
    (tiny_project / TRAJ).write_bytes(PREVIOUS)
    return tiny_project


def test_kill_at_random_step_and_during_resume_then_resume_is_bitwise(project, reference):
    rng = random.Random()
    first = rng.randint(1, STEPS // 2)
    proc = _start(project)
    _wait_for_marker(proc, project, first)
    proc.kill()
    proc.wait()
    _, got = _marker_step(project)  # the checkpoint the kill left (it may be later than the one we waited for)
    out = project / TRAJ
    assert out.read_bytes() == PREVIOUS, f"killed after checkpoint {got}: output changed"
    partial = _temps(out.parent)
    assert len(partial) == 1, partial  # the resumable partial trajectory, nothing else

    # Kill the resumed run too, after it has made a checkpoint of its own.
    second = rng.randint(got + 1, STEPS - 2 * EVERY)
    proc = _start(project, "--resume")
    _wait_for_marker(proc, project, second)
    proc.kill()
    proc.wait()
    _, got2 = _marker_step(project)
    assert out.read_bytes() == PREVIOUS
    assert _temps(out.parent) == partial, "the resume must keep writing the same partial file"

    done = _start(project, "--resume")
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    assert f"resuming run 1/1 after step {got2}" in stderr
    assert sha256_file(out) == reference["sha256"], f"killed after checkpoints {got} and {got2}"
    assert reference["sha256"] in stdout
    # The steps before the resume point come back from the marker, so the reports match to the last digit too.
    assert (project / "metrics/train_loss.csv").read_bytes() == reference["loss_curve"]
    assert _temps(out.parent) == []
    assert not checkpoint_root(project, TRAJ).exists()


def test_sigint_stops_cleanly_with_one_line_and_no_temp_file(project):
    write_params(project, {"train": {"steps": STEPS, "checkpoint_every": 0, "log_every": 1}})
    out = project / TRAJ
    proc = _start(project, quiet=False)
    for line in proc.stderr:  # progress lines until step 3
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    [line] = [ln for ln in rest.splitlines() if not ln.startswith("step ")]
    m = re.fullmatch(r"flannel-repro train: stopped by SIGINT after step (\d+); no output was written; checkpoints are "
                     r"off \(train.checkpoint_every: 0\), so nothing can resume it", line)
    assert m and int(m.group(1)) >= 3, line  # at the step boundary after the signal
    assert out.read_bytes() == PREVIOUS
    assert _temps(out.parent) == []


def test_sigint_with_a_checkpoint_keeps_the_run_resumable(project):
    proc = _start(project)
    step = _wait_for_marker(proc, project, EVERY)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    [line] = stderr.splitlines()
    # Ctrl-C stops at the next step boundary, with a checkpoint of that step; the resume command is the one typed.
    m = re.fullmatch(r"flannel-repro train: stopped by SIGINT after step (\d+); no output was written; "
                     r"`flannel-repro train -q --resume` continues after run 1, step (\d+)", line)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= step, line
    assert _marker_step(project) == (0, int(m.group(1)))
    assert (project / TRAJ).read_bytes() == PREVIOUS
    assert len(_temps((project / TRAJ).parent)) == 1


def test_fresh_run_removes_temp_files_of_dead_runs_only(tiny_project, tiny_data):
    folder = (tiny_project / TRAJ).parent
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale = folder / f"{TMP_PREFIX}{Path(TRAJ).name}.{dead.pid}.abc123"
        live = folder / f"{TMP_PREFIX}{Path(TRAJ).name}.{alive.pid}.def456"
        stale.write_bytes(b"x")
        live.write_bytes(b"y")
        train(load_params(tiny_project / "params.yaml"), tiny_project, progress=False)
        assert _temps(folder) == [live.name]
    finally:
        alive.kill()
        alive.wait()


def test_resume_refuses_other_params_and_a_tampered_marker(project):
    params = load_params(project / "params.yaml")

    class Stop:
        def __call__(self, rec):
            if rec.step == 2 * EVERY + 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(params, project, progress=False, observers=[Stop()])
    changed = load_params(project / "params.yaml", ["train.learning_rate=0.002"])
    with pytest.raises(FlannelError, match=r"resume.json: the interrupted run used other params "
                                           r"\(train.learning_rate: 0.001 -> 0.002\)"):
        train(changed, project, progress=False, resume=True)

    marker = checkpoint_root(project, TRAJ) / "resume.json"
    doc = json.loads(marker.read_text())
    doc["temp"] = "../../../etc/passwd"
    marker.write_text(json.dumps(doc))
    with pytest.raises(FlannelError, match=r"resume marker is corrupt \(bad or missing temp\); run `flannel-repro "
                                           r"train` without --resume"):
        train(params, project, progress=False, resume=True)
    marker.write_bytes(b"\x00garbage")
    with pytest.raises(FlannelError, match=r"resume marker is corrupt \(not JSON\)"):
        train(params, project, progress=False, resume=True)
    assert (project / TRAJ).read_bytes() == PREVIOUS


def test_second_run_into_the_same_output_is_refused(project):
    holder = Checkpoints(project, TRAJ, project / TRAJ)
    holder.acquire()
    try:
        with pytest.raises(FlannelError, match=rf"another `flannel-repro train` \(pid {os.getpid()}\) is writing"):
            train(load_params(project / "params.yaml"), project, progress=False)
    finally:
        holder.release()
    assert (project / TRAJ).read_bytes() == PREVIOUS


def test_full_disk_is_one_clear_error_at_the_start(tiny_project, tmp_path):
    """A real 64 KiB tmpfs; the trajectory needs more. Skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "traj.safetensors"
        out.write_bytes(PREVIOUS)
        params = load_params(tiny_project / "params.yaml", [f"paths.trajectory={out}"])
        with pytest.raises(FlannelError) as e:
            train(params, tiny_project, progress=False)
        msg = str(e.value)
        assert msg.startswith(f"{mount}: cannot reserve ") and "No space left on device" in msg
        assert "free space there or set paths.trajectory" in msg
        assert out.read_bytes() == PREVIOUS
        assert _temps(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_file_size_limit_is_one_clear_error_through_the_cli(tiny_project):
    """RLIMIT_FSIZE makes the reservation fail with EFBIG, as a quota would: one line, exit 2, nothing left."""
    out = tiny_project / TRAJ
    out.write_bytes(PREVIOUS)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run(
        [sys.executable, "-m", "flannel_repro", "train", "-q"], cwd=tiny_project, capture_output=True, text=True,
        preexec_fn=limit, timeout=300,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"flannel-repro train: error: {out.parent}: cannot reserve ") and "File too large" in line
    assert out.read_bytes() == PREVIOUS
    assert _temps(out.parent) == []


def test_two_runs_into_different_outputs_at_once_match_solo_runs(tiny_project, tmp_path_factory):
    overrides = {seed: [f"train.train_seed={seed}", f"paths.trajectory=t{seed}.st", f"paths.metrics=m{seed}.json",
                        f"paths.loss_curve=c{seed}.csv", "tracking.enabled=true"] for seed in (1, 2)}
    solo = {seed: train(load_params(tiny_project / "params.yaml", o), tiny_project, progress=False).sha256
            for seed, o in overrides.items()}
    assert solo[1] != solo[2]
    both = tmp_path_factory.mktemp("both")
    for sub in ("data", "tensors"):
        shutil.copytree(tiny_project / sub, both / sub)
    shutil.copy(tiny_project / "params.yaml", both / "params.yaml")
    # Both log to the same default tracking store (mlflow.db at the project root), which neither has created yet.
    assert not (both / "mlflow.db").exists()
    procs = {seed: _start(both, *[a for o in overrides[seed] for a in ("-S", o)]) for seed in (1, 2)}
    for seed, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert sha256_file(both / f"t{seed}.st") == solo[seed]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{both / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flannel").experiment_id])
    assert sorted(r.data.params["train.train_seed"] for r in runs) == ["1", "2"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["sha256"] == solo[int(r.data.params["train.train_seed"])]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == list(range(1, 7))


def test_one_output_has_one_writer_however_its_path_is_spelled(project, tmp_path):
    """A relative spelling holds the output (paused inside its commit); an absolute spelling and one through a
    symlinked folder, trained at the same time, are refused: the lock is the file's real location."""
    (project / "linked").symlink_to(project / "tensors/Flannel", target_is_directory=True)
    hold = tmp_path / "hold"
    first = subprocess.Popen([sys.executable, "-m", "flannel_repro", "train", "-q", "-S", f"paths.trajectory=./{TRAJ}"],
                             cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "FLANNEL_TEST_HOLD_COMMIT": str(hold)})
    deadline = time.monotonic() + 300
    while not hold.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    spellings = [str(project.resolve() / TRAJ), f"linked/{Path(TRAJ).name}"]
    others = [_start(project, "-S", f"paths.trajectory={s}") for s in spellings]
    for spelling, proc in zip(spellings, others, strict=True):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        out = Path(spelling) if spelling.startswith("/") else project / spelling
        assert stderr.splitlines() == [
            f"flannel-repro train: error: {out}: another `flannel-repro train` (pid {first.pid}) is writing this "
            "trajectory; wait for it to finish or set another paths.trajectory"]
    hold.unlink()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert f"(sha256 {sha256_file(project / TRAJ)})" in stdout  # what it printed is the file on disk
