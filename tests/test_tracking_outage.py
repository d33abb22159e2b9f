"""A tracking outage costs neither the run nor its metrics: a real `mlflow server` on 127.0.0.1, killed mid-run.

Training goes on after one warning line; what the store missed is kept in a spool and sent when the run ends if the
store answers again, else by `flannel-repro sync`; the exit status and the last line say which.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_params
from mlflow import MlflowClient

from flannel_repro.core.config import load_params
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.training.stage import run_train_stage
from flannel_repro.trajectory.file import load_trajectory

STEPS = 120  # metrics go to the store every 50 steps, so the outage is met mid-run, before the step-50 checkpoint


class Server:
    """A real tracking server on a fixed port and store, killed and started again by the tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination",
             str(self.folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 240
        while True:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer /health"
                time.sleep(0.25)

    def kill(self) -> None:
        """The whole server (and its worker) at once, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    yield srv
    srv.kill()


def _losses(path: Path) -> list[float]:
    with load_trajectory(path) as traj:
        return [float(x) for x in traj["losses_f32"][0, 1:]]


def _loss_history(client: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def test_server_killed_mid_run_then_sync_delivers_everything(tiny_project, server):
    write_params(tiny_project, {"train": {"steps": STEPS, "checkpoint_every": 50, "log_every": 1},
                                "tracking": {"enabled": True, "uri": server.uri}})
    if server.proc.poll() is not None:
        server.start()
    proc = subprocess.Popen([sys.executable, "-m", "flannel_repro", "train"], cwd=tiny_project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stderr:
        if line.startswith("step 2/"):
            server.kill()
            break
    stdout, stderr = proc.communicate(timeout=300)
    # The run completes and says what happened: exit 3, the file in place, one warning, a last line naming sync.
    assert proc.returncode == 3, stderr
    out = tiny_project / "tensors/Flannel/1.20h_flannel_7.safetensors"
    sha = sha256_file(out)
    assert f"trajectory: tensors/Flannel/1.20h_flannel_7.safetensors (sha256 {sha})" in stdout
    notes = [ln for ln in stderr.splitlines() if not ln.startswith("step ")]
    run_id = stdout.split("mlflow: run ")[1].split()[0]
    spool = tiny_project.resolve() / f".flannel/tracking/{run_id}.jsonl"
    assert len(notes) == 2, notes
    assert notes[0] == (f"flannel-repro train: warning: tracking store {server.uri} stopped answering (connection "
                        f"refused); training goes on and what it logs is kept in {spool}, sent when the run ends if "
                        "the store answers again, else by `flannel-repro sync`")
    assert notes[1] == (f"flannel-repro train: tracking run {run_id} is incomplete: the store did not answer again, "
                        f"so what it missed is kept in {spool}; send it with `flannel-repro sync`")
    assert spool.is_file()

    server.start()  # the store is back: sync sends everything, and the run reads as if nothing had happened
    sync = subprocess.run([sys.executable, "-m", "flannel_repro", "sync"], cwd=tiny_project, capture_output=True,
                          text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr
    assert re.search(rf"^sync: sent the \d+ calls of run {run_id} kept in {re.escape(str(spool))} to "
                     rf"{re.escape(server.uri)}$", sync.stdout, re.M), sync.stdout
    assert not spool.exists()
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sha256"] == sha
    assert _loss_history(client, run_id) == _losses(out)  # all 120 steps, the file's float32 values exactly
    assert {a.path for a in client.list_artifacts(run_id)} == {"params.yaml", "digests.json", "loss_curve.png",
                                                              "metrics", "trace"}
    again = subprocess.run([sys.executable, "-m", "flannel_repro", "sync"], cwd=tiny_project, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.startswith("sync: nothing to send")


class Outage:
    """Kills the server at step 2 and brings it back at step 100, while training goes on."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __call__(self, rec) -> None:
        if rec.step == 2:
            self.server.kill()
        elif rec.step == 100:
            self.server.start()


def test_a_store_back_before_the_end_gets_everything_at_the_end(tiny_project, server, capfd):
    write_params(tiny_project, {"train": {"steps": STEPS, "checkpoint_every": 50},
                                "tracking": {"enabled": True, "uri": server.uri}})
    if server.proc.poll() is not None:
        server.start()
    params = load_params(tiny_project / "params.yaml")
    result, run_id = run_train_stage(params, tiny_project, observers=[Outage(server)], progress=False)
    err = capfd.readouterr().err.splitlines()
    assert [ln.split(" stopped answering")[0] for ln in err if "warning" in ln] == [
        f"flannel-repro train: warning: tracking store {server.uri}"]  # one warning line for the whole outage
    assert re.search(rf"^flannel-repro train: tracking store {re.escape(server.uri)} answers again; sent the \d+ "
                     r"calls kept during the outage$", "\n".join(err), re.M)
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sha256"] == result.sha256
    assert _loss_history(client, run_id) == _losses(result.trajectory)
    assert not (tiny_project / ".flannel/tracking" / f"{run_id}.jsonl").exists()


def test_a_hung_store_does_not_hold_up_a_second_ctrl_c(tiny_project, server):
    """The store stops answering without closing its connections (SIGSTOP): the recording thread's metric call
    hangs, the ring fills and training waits. A second Ctrl-C stops the run at once (not after the store's timeouts),
    and the end of the run (KILLED, with the reason) is kept for `flannel-repro sync`, which delivers it later."""
    write_params(tiny_project, {"train": {"steps": STEPS, "checkpoint_every": 0, "log_every": 1},
                                "tracking": {"enabled": True, "uri": server.uri}})
    if server.proc.poll() is not None:
        server.start()
    proc = subprocess.Popen([sys.executable, "-m", "flannel_repro", "train"], cwd=tiny_project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:
        if line.startswith("step 2/"):
            os.killpg(server.proc.pid, signal.SIGSTOP)
        if line.startswith("step 48/"):  # the metrics of steps 0-49 go out at step 49, before its progress line
            break
    try:
        time.sleep(3)  # the ring fills behind the hung call
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        stopped_in = time.monotonic() - start
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert proc.returncode == 130, err
    assert stopped_in < 15, err  # the store's timeouts (3 x 20 s) would take a minute
    assert err.splitlines()[-1].startswith("flannel-repro train: stopped by SIGINT"), err
    spools = list((tiny_project / ".flannel/tracking").glob("*.jsonl"))
    assert len(spools) == 1 and '"status": "KILLED"' in spools[0].read_text()
    sync = subprocess.run([sys.executable, "-m", "flannel_repro", "sync"], cwd=tiny_project, capture_output=True,
                          text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr
    assert MlflowClient(server.uri).get_run(spools[0].stem).info.status == "KILLED"


def _spool(project: Path, lines: list[str]) -> tuple[str, str, Path]:
    """A SQLite store with one RUNNING run, and a spool of `lines` (after its header) for that run."""
    uri = f"sqlite:///{project.resolve() / 'runs.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("flannel")).info.run_id
    spool = project / ".flannel/tracking" / f"{run_id}.jsonl"
    spool.parent.mkdir(parents=True)
    header = json.dumps({"format": "flannel-tracking-spool/1", "uri": uri, "run": run_id})
    spool.write_text("\n".join([header, *(ln.replace("RUN", run_id) for ln in lines)]))
    return uri, run_id, spool


def test_sync_skips_a_last_call_cut_short_and_refuses_a_corrupt_one(tmp_path):
    """A process killed while keeping a call leaves its last line cut short: that call was never kept, the rest is
    sent. A line that is not a call anywhere else is one line, exit 2, and nothing after it is sent."""
    loss = '{"op": "log_batch", "run": "RUN", "metrics": [["loss", 2.5, 1700000000000, 1]]}'
    end = '{"op": "set_terminated", "run": "RUN", "status": "KILLED"}'
    for name, lines, code in (("cut", [loss, end, '{"op": "log_batch", "run": "RU'], 0),
                              ("corrupt", [loss, '{"op": "log_ba', end], 2)):
        project = tmp_path / name
        uri, run_id, spool = _spool(project, lines)
        sync = subprocess.run([sys.executable, "-m", "flannel_repro", "sync"], cwd=project, capture_output=True,
                              text=True, timeout=300)
        assert sync.returncode == code, sync.stderr
        run = MlflowClient(uri).get_run(run_id)
        assert run.data.metrics == {"loss": 2.5}
        if code == 0:
            assert run.info.status == "KILLED" and not spool.exists()
        else:
            assert run.info.status == "RUNNING" and spool.exists()
            assert sync.stderr.strip() == (f"flannel-repro sync: error: {spool.resolve()}: line 3 is not a call the "
                                           "spool can send (not a JSON object: '{\"op\": \"log_ba'); remove that "
                                           "line and run `flannel-repro sync` again")
