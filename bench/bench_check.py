"""What `flannel-repro check` costs on a real trajectory: GB/s, and the whole process beside plain reads and hashes.

    python bench/bench_check.py [FILE] [--params params.yaml] [--rounds R]

FILE defaults to paths.trajectory of params.yaml (1.28 GB with the defaults: run `dvc repro` or `flannel-repro train`
first). With the page cache warm (one untimed read of the file first), it runs each of these as its own process
under /usr/bin/time -v, R times in turn (the fastest counts):
- `cat FILE > /dev/null`: reading every byte, the floor;
- `sha256sum FILE`: coreutils hashing every byte in one thread, the baseline;
- `flannel-repro check --threads 1 FILE` and `flannel-repro check FILE` (two threads, the default).
It prints wall, user and sys time, peak RSS, page faults and GB/s (file size / wall) of each, and each one's wall
time as a ratio to sha256sum's. Nothing here is asserted by a test; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from flannel_repro.core.config import load_params

FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
    "user_s": r"User time \(seconds\): (\S+)",
    "sys_s": r"System time \(seconds\): (\S+)",
    "peak_rss_mb": r"Maximum resident set size \(kbytes\): (\S+)",
    "minor_faults": r"Minor \(reclaiming a frame\) page faults: (\S+)",
    "major_faults": r"Major \(requiring I/O\) page faults: (\S+)",
}


def measure(argv: list[str]) -> dict[str, float]:
    """Run `argv` under /usr/bin/time -v; its figures, with the exit status."""
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    out = {"exit": proc.returncode}
    for key, pattern in FIELDS.items():
        raw = re.search(pattern, proc.stderr).group(1)
        if key == "wall_s":
            parts = [float(x) for x in raw.split(":")]
            value = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        else:
            value = float(raw)
        out[key] = round(value / 1024, 1) if key == "peak_rss_mb" else value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.params).resolve().parent
    path = Path(args.file) if args.file else root / load_params(args.params).paths.trajectory
    if not path.is_file():
        raise SystemExit(f"{path}: no trajectory; run `dvc repro` or `flannel-repro train` first, or name a file")
    size = path.stat().st_size
    check = [shutil.which("flannel-repro") or "flannel-repro", "check"]
    cases = {
        "cat (read only)": ["sh", "-c", f"cat '{path}' > /dev/null"],
        "sha256sum (1 thread)": ["sha256sum", str(path)],
        "check, 1 thread": [*check, "--threads", "1", str(path)],
        "check, 2 threads": [*check, str(path)],
    }
    measure(cases["cat (read only)"])  # warm the page cache
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, argv in cases.items():
            runs[name].append(measure(argv))
    best = {name: min(r, key=lambda x: x["wall_s"]) for name, r in runs.items()}
    for name, r in best.items():
        if r["exit"] != 0:
            raise SystemExit(f"{name} exited {r['exit']}")
        r["GB_per_s"] = round(size / r["wall_s"] / 1e9, 2) if r["wall_s"] else None
        r["wall_vs_sha256sum"] = round(r["wall_s"] / best["sha256sum (1 thread)"]["wall_s"], 3)
    print(json.dumps({"file": str(path), "bytes": size, "rounds": args.rounds, "python": sys.version.split()[0],
                      "cases": best}, indent=2))


if __name__ == "__main__":
    main()
