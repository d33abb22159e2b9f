"""What a sweep costs on top of training: 8 tiny runs through `flannel-repro sweep` (Ray in the process, 2 points
at a time) against the same 8 run one after another in one process (`run_train_stage`, the train stage itself).

    python bench/sweep.py [--points 8] [--jobs 2] [-S train.steps=20 ...]

Both sides train the same seeds with the same params (the tiny configuration of the tests, tracking into a SQLite
store) in a scratch git+DVC project under bench/results/sweep/ (git-ignored), made and reproduced once. Each side is
a whole process tree, timed from outside: wall clock, user+sys CPU of every process in it (read from /proc), peak
RSS of the largest process. The sweep's own summary gives each point's phases (workspace: clone and inputs; train:
the train process; record: `dvc exp save` and `exp push`), from which the fixed cost per run follows. Prints the
summary and writes it to bench/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from flannel_repro.trajectory.provenance import cpu_model

PIPELINE = ["flannel_repro", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "pyproject.toml", ".gitignore"]
OUT = Path("bench/results")
BIN = Path(sys.executable).parent
TINY = {
    "corpus": {"n_words": 3000, "lexicon_size": 500},
    "tokenizer_corpus": {"n_words": 3000, "lexicon_size": 300},
    "model": {"vocab_size": 300, "hidden_dim": 16, "n_layer": 2, "n_head": 2, "max_seq_len": 16},
    "train": {"steps": 6, "batch_size": 4, "num_threads": 1, "log_every": 2},
    "tracking": {"enabled": True, "uri": None},
    "audit": {"verify": []},
}
SEQUENTIAL = """
import sys, time
from pathlib import Path
from flannel_repro.core.config import load_params
from flannel_repro.training.stage import run_train_stage
root = Path.cwd()
for seed in range(42, 42 + int(sys.argv[1])):
    run_train_stage(load_params(root / "params.yaml", [f"train.train_seed={seed}", *sys.argv[2:]]), root,
                    progress=False)
"""
ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def _tree(root: int) -> dict[int, tuple[float, float, int]]:
    """Every live process descended from `root` or in its session: pid -> (own CPU s, reaped children's CPU s,
    VmHWM KiB). Ray's workers and the git, dvc and train processes they start are all in it."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            hwm = next((int(x.split()[1]) for x in Path(f"/proc/{entry}/status").read_text().splitlines()
                        if x.startswith("VmHWM:")), 0)
        except (OSError, IndexError, ValueError):
            continue
        stats[int(entry)] = (int(f[1]), int(f[3]), (int(f[11]) + int(f[12])) / tick, (int(f[13]) + int(f[14])) / tick,
                             hwm)
    inside, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, sid, *_) in stats.items() if (ppid in inside or sid == root) and pid not in inside}
        inside |= more
        grew = bool(more)
    return {pid: stats[pid][2:] for pid in inside if pid in stats}


def timed(cmd: list[str], cwd: Path) -> dict:
    """Run `cmd` as a whole process tree; its wall, user+sys CPU and the largest peak RSS of any of its processes.

    Ray's workers are not reaped by the command (getrusage's RUSAGE_CHILDREN misses them), so the CPU is read from
    /proc every 0.1 s for every process of the tree (in the command's own session, or descended from it) and each
    process's last reading of its own user+sys counts. A process that lives less than 0.1 s (a quick `git`) is
    missed, and each loses what it ran after its last reading: an undercount of well under a second per point."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: dict[int, tuple[float, float, int]] = {}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid, (own, reaped, hwm) in _tree(proc.pid).items():
            # an exited process (a zombie) shows no VmHWM: keep the highest reading
            seen[pid] = (own, reaped, max(hwm, seen.get(pid, (0, 0, 0))[2]))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(out)}")
    cpu = sum(own for own, _, _ in seen.values())
    peak = max(hwm for *_, hwm in seen.values())
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(peak / 1024, 1),
            "processes_seen": len(seen)}


def project(root: Path, dst: Path, overrides: list[str]) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    for name in PIPELINE:
        src, out = root / name, dst / name
        out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, out))
    doc = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        doc[section].update(values)
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        doc[section][name] = yaml.safe_load(value)
    (dst / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([str(BIN / "dvc"), "repro", "-q", "masks"], cwd=dst, check=True, env={**os.environ, **ENV})
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=dst, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    root = Path.cwd()
    work = root / OUT / "sweep"
    scratch = work / "scratch"
    project(root, work / "project", args.overrides)
    seeds = f"train.train_seed=range(42,{42 + args.points})"

    sequential = timed([sys.executable, "-c", SEQUENTIAL, str(args.points)], work / "project")
    shutil.rmtree(scratch, ignore_errors=True)
    swept = timed([sys.executable, "-m", "flannel_repro", "sweep", "-S", seeds, "--jobs", str(args.jobs),
                   "--scratch", str(scratch)], work / "project")
    points = json.loads((work / "project/reports/sweep.json").read_text())["points"]
    assert all(p["status"] == "finished" for p in points), points
    phases = {k: round(sum(p["phases"][k] for p in points) / len(points), 2) for k in points[0]["phases"]}
    per_run_seq = sequential["wall_s"] / args.points
    # A point's slot: each of the `jobs` slots holds a point for wall * jobs / points seconds.
    slot = swept["wall_s"] * args.jobs / args.points
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "points": args.points, "jobs": args.jobs,
        "overrides": args.overrides, "sequential_one_process": sequential, "sweep_embedded_ray": swept,
        "per_point_phases_s": phases, "per_run_wall_sequential_s": round(per_run_seq, 2),
        "per_point_slot_s": round(slot, 2),
        "fixed_cost_per_run_s": round(slot - per_run_seq, 2),
        "fixed_cost_per_run_cpu_s": round((swept["cpu_s"] - sequential["cpu_s"]) / args.points, 2),
        "load_average_1min_at_end": os.getloadavg()[0],
        "speedup_wall": round(sequential["wall_s"] / swept["wall_s"], 2),
    }
    (root / OUT).mkdir(parents=True, exist_ok=True)
    (root / OUT / "sweep.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
