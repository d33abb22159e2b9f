"""Every way a train run ends is told, and no run is left RUNNING: real processes stopped by real signals.

SIGTERM and SIGHUP (a scheduler's preemption, a closed terminal) stop at the next step boundary with a checkpoint
of that step, end the tracking run KILLED and exit 128 + the signal; a kill -9 leaves a RUNNING run that the next
command opening the store closes; a resumed run links to the one it continues; a signal during the commit waits
for it, and the message says that the output was replaced.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_tiny_data, write_params
from mlflow import MlflowClient

from flannel_repro.core.config import load_params
from flannel_repro.core.fsutil import TMP_PREFIX, sha256_file
from flannel_repro.recording.checkpoint import checkpoint_root
from flannel_repro.training.loop import train

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
PREVIOUS = b"a previous trajectory that no stopped run may touch\n"
STEPS = 60
PARAMS = {"train": {"steps": STEPS, "checkpoint_every": 20, "log_every": 1},
          "tracking": {"enabled": True, "uri": "sqlite:///runs.db"}}


def _foreground() -> None:
    """In the child: SIGINT and SIGHUP at their defaults, as in a foreground shell (the tests may themselves run
    under `nohup`, whose ignored SIGHUP the train would otherwise inherit and keep)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`flannel-repro train ARGS` as a user runs it from a terminal."""
    return subprocess.Popen([sys.executable, "-m", "flannel_repro", "train", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            preexec_fn=_foreground)


def _signal_at_step(proc: subprocess.Popen, step: int, signum: int) -> list[str]:
    """Send `signum` once the progress line of `step` is out; return the lines stderr had until then."""
    seen = []
    for line in proc.stderr:
        seen.append(line.rstrip("\n"))
        if line.startswith(f"step {step}/"):
            proc.send_signal(signum)
            return seen
    raise AssertionError(f"train ended before step {step}:\n" + "\n".join(seen))


def _messages(stderr: str) -> list[str]:
    """stderr without progress lines and MLflow's own log lines (creating a fresh store)."""
    return [ln for ln in stderr.splitlines() if not (ln.startswith("step ") or re.match(r"\d{4}/\d\d/\d\d ", ln))]


def _runs(project: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{project.resolve() / 'runs.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flannel").experiment_id],
                              order_by=["attributes.start_time ASC"])
    return {r.info.run_id: r for r in runs}


def _holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open. Its fds come and go while it starts (imports open and close files):
    one that closes between listing and reading it is not the one looked for."""
    target = str(path.resolve())
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # the process has ended: the caller's poll() says how
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except FileNotFoundError:
            continue
    return False


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{TMP_PREFIX}*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data) -> str:
    """The sha256 of the uninterrupted run of PARAMS (trained in-process: the file does not depend on tracking)."""
    root = tmp_path_factory.mktemp("reference")
    copy_tiny_data(tiny_data, root)
    return train(load_params(write_params(root, PARAMS)), root, progress=False).sha256


@pytest.fixture
def project(tiny_project) -> Path:
    write_params(tiny_project, PARAMS)
    (tiny_project / TRAJ).write_bytes(PREVIOUS)
    return tiny_project


def test_kill_9_then_sigterm_then_resume_each_told_and_closed(project, reference):
    out = project / TRAJ
    marker = checkpoint_root(project, TRAJ) / "resume.json"
    # 1. kill -9 after the first checkpoint: the process can say nothing, and its run stays RUNNING.
    proc = _start(project)
    _signal_at_step(proc, 25, signal.SIGKILL)
    proc.communicate(timeout=60)
    [killed] = _runs(project).values()
    assert killed.info.status == "RUNNING"
    assert killed.data.tags["flannel.pid"] == str(proc.pid) and killed.data.tags["flannel.host"]

    proc_pid = proc.pid
    # 2. The resume opens the store, which closes the dead process's run; SIGTERM then stops it at a step boundary
    #    with a checkpoint of exactly that step.
    proc = _start(project, "--resume")
    seen = _signal_at_step(proc, 30, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    notes = _messages("\n".join(seen) + "\n" + stderr)
    assert notes[0] == (f"tracking: run {killed.info.run_id} was left RUNNING by process {proc_pid}, which is gone; "
                        "closed it as KILLED")
    assert notes[1] == "flannel-repro train: resuming run 1/1 after step 20"
    [stop] = notes[2:]
    m = re.fullmatch(r"flannel-repro train: stopped by SIGTERM after step (\d+); no output was written; "
                     r"`flannel-repro train --resume` continues after run 1, step (\d+)", stop)
    assert m and m.group(1) == m.group(2), stop
    step = int(m.group(1))
    assert step >= 30 and json.loads(marker.read_text())["step"] == step  # the checkpoint is of that very step
    assert out.read_bytes() == PREVIOUS and len(_temps(out.parent)) == 1

    runs = _runs(project)
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert "ended without closing this run" in runs[killed.info.run_id].data.tags["flannel.error"]
    [stopped] = [r for r in runs.values() if r.info.run_id != killed.info.run_id]
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["flannel.error"].startswith(f"Interrupted: stopped by SIGTERM after step {step}")
    assert stopped.data.tags["flannel.resumed_from"] == killed.info.run_id

    # 3. The last resume ends FINISHED, linked to the stopped run, with the uninterrupted run's bytes.
    done = _start(project, "-q", "--resume")
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    assert sha256_file(out) == reference and reference in stdout
    runs = _runs(project)
    [last] = [r for r in runs.values() if r.info.run_id not in (killed.info.run_id, stopped.info.run_id)]
    assert last.info.status == "FINISHED" and last.data.tags["flannel.resumed_from"] == stopped.info.run_id
    assert all(r.info.status != "RUNNING" for r in runs.values())


def test_sighup_without_checkpoints_stops_with_one_line_and_leaves_nothing(project):
    # Steps enough that the run cannot end before the signal lands, however busy the machine: a run that stops
    # reading nothing blocks on its own progress lines (a pipe holds about 1,000 of them) long before step 3,000.
    steps = 3000
    write_params(project, {**PARAMS, "train": {**PARAMS["train"], "steps": steps, "checkpoint_every": 0}})
    proc = _start(project)
    _signal_at_step(proc, 3, signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP
    [line] = _messages(stderr)
    m = re.fullmatch(r"flannel-repro train: stopped by SIGHUP after step (\d+); no output was written; checkpoints "
                     r"are off \(train.checkpoint_every: 0\), so nothing can resume it", line)
    assert m and 3 <= int(m.group(1)) < steps, line
    assert (project / TRAJ).read_bytes() == PREVIOUS and _temps((project / TRAJ).parent) == []
    [run] = _runs(project).values()
    assert run.info.status == "KILLED"


def test_a_signal_during_the_commit_waits_for_it_and_says_the_output_was_replaced(project, reference, tmp_path):
    hold = tmp_path / "hold"
    proc = _start(project, "-q", env={"FLANNEL_TEST_HOLD_COMMIT": str(hold)})
    deadline = time.monotonic() + 300
    while not hold.exists():  # the run is inside its commit's critical section, before the rename
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.send_signal(signal.SIGTERM)  # and a second signal on top: the commit still completes
    time.sleep(0.5)
    assert proc.poll() is None
    hold.unlink()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT  # the first request is the one honoured
    out = project / TRAJ
    assert _messages(stderr) == [f"flannel-repro train: stopped by SIGINT after the output was written: {out} (sha256 "
                                 f"{reference})"]
    assert sha256_file(out) == reference  # replaced, as the message says, with the complete file
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["trajectory_sha256"] == reference  # and the reports written with it
    assert _temps(out.parent) == [] and not checkpoint_root(project, TRAJ).exists()
    [run] = _runs(project).values()  # the run's results were not logged: it ends KILLED, saying why
    assert run.info.status == "KILLED" and "sha256" not in run.data.tags
    assert run.data.tags["flannel.error"] == f"Interrupted: {_messages(stderr)[0].split(': ', 1)[1]}"


def test_a_signal_during_start_up_stops_at_once_and_closes_the_run(project):
    """The run waits for the tracking store's lock (held here) during start-up; SIGTERM arrives there."""
    lock = open(project / "runs.db.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        proc = _start(project, "-q")
        deadline = time.monotonic() + 300
        while not _holds_open(proc.pid, project / "runs.db.lock"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        lock.close()
    assert proc.returncode == 128 + signal.SIGTERM
    assert _messages(stderr) == ["flannel-repro train: stopped by SIGTERM; no output was written"]
    assert (project / TRAJ).read_bytes() == PREVIOUS and _temps((project / TRAJ).parent) == []


def test_a_signal_the_caller_ignores_stays_ignored(tiny_project, reference):
    """Under `nohup` SIGHUP is ignored: closing the terminal must not stop the run, which completes as if untouched."""
    write_params(tiny_project, PARAMS)
    (tiny_project / TRAJ).write_bytes(PREVIOUS)

    def nohup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-m", "flannel_repro", "train"], cwd=tiny_project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=nohup)
    _signal_at_step(proc, 5, signal.SIGHUP)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert sha256_file(tiny_project / TRAJ) == reference
    assert [r.info.status for r in _runs(tiny_project).values()] == ["FINISHED"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_exiting_ends_with_the_commands_own_status(tiny_project, signum):
    """Once a command has finished, a stop signal during its exit handlers (held open here by one that sleeps) ends
    the process at once with the command's status and one line; nothing is left to the interpreter's teardown."""
    child = ("import atexit, sys, time; atexit.register(time.sleep, 60); from flannel_repro.cli import entry; "
             "sys.argv = ['flannel-repro', 'masks']; entry()")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=tiny_project, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("masks: ")  # the command has run
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10  # not the 60 s of the exit handler
    assert proc.returncode == 0
    assert err.splitlines()[-1] == f"flannel-repro: {signal.Signals(signum).name} while exiting; the command had " \
                                   "finished (exit 0)"


def test_killed_right_after_the_rename_resume_says_the_file_is_complete(tiny_project, reference):
    """kill -9 between putting the trajectory in place and writing its metrics: the file is the complete run, and
    `--resume` says so, names the check, and keeps it (there is no partial file left to continue)."""
    write_params(tiny_project, PARAMS)
    child = ("import os, signal, sys; import flannel_repro.trajectory.file as t; rename = t.commit_file\n"
             "def commit_file(tmp, out):\n"
             "    rename(tmp, out)\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "t.commit_file = commit_file\n"
             "from flannel_repro.cli import main; main(['train', '-q'])")
    killed = subprocess.run([sys.executable, "-c", child], cwd=tiny_project, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert sha256_file(tiny_project / TRAJ) == reference
    assert not (tiny_project / "metrics/train.json").exists()

    proc = _start(tiny_project, "-q", "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert _messages(err)[-1] == (
        f"flannel-repro train: error: {(tiny_project / TRAJ).resolve()}: the interrupted run had already put its "
        "complete trajectory here and was stopped before its metrics were written; `flannel-repro check` confirms "
        "the file, and `flannel-repro train` without --resume writes them (training again)")
    assert sha256_file(tiny_project / TRAJ) == reference
