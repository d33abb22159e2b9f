"""What DVC costs on top of training: `dvc repro` of the train stage against the bare `flannel-repro train`.

    python bench/dvc_overhead.py [--params params.yaml] [-S train.steps=20 ...] [--rounds R] [--keep]

Copies the pipeline (flannel_repro/, dvc.yaml, params.yaml with the -S overrides applied, .dvc/config) into a
scratch git repository under bench/results/dvc_overhead/ (git-ignored), runs `dvc repro` once there (the data
stages and a warm-up train), then times R times each, alternating: the stage's own command
`flannel-repro train`, and `dvc repro -f -s train` (the same command, plus DVC hashing the trajectory and linking it
into its cache). The fastest of each counts; the target is dvc / bare <= 1.10. Prints the summary and writes it to
bench/results/dvc_overhead.json. Run it on the full configuration only on an otherwise idle machine; `-S` makes it
tiny for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from flannel_repro.core.config import apply_overrides, params_from_dict, parse_yaml
from flannel_repro.trajectory.provenance import cpu_model

PIPELINE = ["flannel_repro", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "pyproject.toml", ".gitignore"]
OUT = Path("bench/results")
BIN = Path(sys.executable).parent  # the venv's `flannel-repro` and `dvc`


def run(cmd: list[str], cwd: Path) -> float:
    """Run `cmd` in `cwd` and return its wall-clock seconds; fail with its output if it fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds


def scratch_project(root: Path, params_path: Path, overrides: list[str], dst: Path) -> dict:
    """A git repository with the pipeline and the effective params; returns the params document."""
    shutil.rmtree(dst, ignore_errors=True)
    for name in PIPELINE:
        src, out = root / name, dst / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, out)
    doc = apply_overrides(parse_yaml(params_path.read_text(encoding="utf-8"), str(params_path)) or {}, overrides)
    params_from_dict(doc, str(params_path))  # fail here, before any work, on a bad override
    (dst / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "pipeline"]):
        subprocess.run(["git", *cmd], cwd=dst, check=True, capture_output=True)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=3, help="time each case R times and keep the fastest")
    ap.add_argument("--keep", action="store_true", help="keep the scratch project (it holds the trajectory twice)")
    args = ap.parse_args()

    params_path = Path(args.params)
    root = params_path.resolve().parent
    work = root / OUT / "dvc_overhead"
    doc = scratch_project(root, params_path, args.overrides, work)
    warm_s = run([str(BIN / "dvc"), "repro"], work)

    bare, dvc = [], []
    for _ in range(args.rounds):
        bare.append(run([str(BIN / "flannel-repro"), "train"], work))
        dvc.append(run([str(BIN / "dvc"), "repro", "-f", "-s", "train"], work))

    trajectory = work / doc["paths"]["trajectory"]
    summary = {
        "steps": doc["train"]["steps"],
        "overrides": args.overrides,
        "trajectory_bytes": trajectory.stat().st_size,
        "trajectory_links": trajectory.stat().st_nlink,  # 2: the workspace file is the cache's, not a copy
        "cache_type": subprocess.run([str(BIN / "dvc"), "config", "cache.type"], cwd=work, capture_output=True,
                                     text=True).stdout.strip(),
        "warmup_repro_s": round(warm_s, 3),
        "bare_train_s": [round(s, 3) for s in bare],
        "dvc_repro_train_s": [round(s, 3) for s in dvc],
        "dvc_over_bare": round(min(dvc) / min(bare), 4),
        "machine": f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} CPUs)",
    }
    print(json.dumps(summary, indent=2))
    (root / OUT / "dvc_overhead.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
