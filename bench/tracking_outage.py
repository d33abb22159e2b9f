"""What a tracking outage costs a train run: the same run against a real `mlflow server`, once with the server up
throughout and once with it killed at step 2, side by side in one invocation.

Each run is `flannel-repro train` in its own process, on the tiny test configuration (120 steps, a checkpoint every
50 steps, metrics sent every 50 steps), timed with /usr/bin/time; the time of every step is taken from its progress
line, so the stall of the one failed call (MLflow's retries, as bounded by flannel-repro) shows as the longest step.

    python bench/tracking_outage.py        # prints one JSON line per run; results in bench/results/
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import write_params  # noqa: E402  (the tiny test configuration)

from flannel_repro.core.config import load_params  # noqa: E402
from flannel_repro.data.corpus import corpus  # noqa: E402
from flannel_repro.data.masks import masks  # noqa: E402
from flannel_repro.data.tokenizer import tokenizer  # noqa: E402
from flannel_repro.data.tokenizer_corpus import tokenizer_corpus  # noqa: E402

STEPS = 120


def start_server(folder: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.25)


def run(project: Path, server_folder: Path, kill: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(server_folder, port)
    shutil.rmtree(project / ".flannel", ignore_errors=True)
    cmd = ["/usr/bin/time", "-f", "%e %U %S %M", sys.executable, "-m", "flannel_repro", "train", "-S",
           f"tracking.uri=http://127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, cwd=project, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stamps, last = {}, ""
    for line in proc.stderr:
        if line.startswith("step "):
            stamps[int(line.split()[1].split("/")[0])] = time.monotonic()
            if kill and len(stamps) == 2:
                os.killpg(server.pid, signal.SIGKILL)
        else:
            last = line.strip()
    proc.wait()
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    wall, user, sys_s, rss = last.split()
    steps = sorted((stamps[s] - stamps[s - 1], s) for s in stamps if s - 1 in stamps)
    return {"server_killed_at_step_2": kill, "exit": proc.returncode, "wall_s": float(wall),
            "cpu_s": float(user) + float(sys_s), "peak_rss_kb": int(rss),
            "longest_step_s": round(steps[-1][0], 3), "longest_step": steps[-1][1],
            "median_step_s": round(steps[len(steps) // 2][0], 3)}


def main() -> None:
    out = REPO / "bench" / "results" / "tracking_outage"
    shutil.rmtree(out, ignore_errors=True)
    project = out / "project"
    project.mkdir(parents=True)
    params = load_params(write_params(project, {"train": {"steps": STEPS, "checkpoint_every": 50, "log_every": 1},
                                                "tracking": {"enabled": True}}))
    corpus(params, project)
    tokenizer_corpus(params, project)
    tokenizer(params, project)
    masks(params, project)
    results = []
    for kill in (False, True):
        folder = out / f"server-{int(kill)}"
        folder.mkdir()
        results.append(run(project, folder, kill))
        print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
