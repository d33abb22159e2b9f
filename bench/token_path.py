"""Reading one token's path out of a trajectory: `Trajectory.token_rows` against the ways around it.

Each case runs in its own process on the same file and prints its time, the anonymous memory it added (RssAnon;
the mapped file's pages are page cache, not counted), the page faults of the read and the bytes it read from disk:
`token_rows` for one token and for ten, `step_block` of ten steps, the same row gathered with `step()` in a loop,
and W materialised in memory first. With `--cold` the file's pages are dropped from the page cache before each case
(posix_fadvise on this file only), so every read comes from disk.

    python bench/token_path.py                                        # paths.trajectory of params.yaml
    python bench/token_path.py tensors/Flannel/1.20h_flannel_7.safetensors --cold
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

CASES = ("token_rows", "token_rows_10", "step_block_10", "step_loop", "materialise_W")


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("RssAnon:")).split()[1]) / 1024


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def read(path: str, case: str) -> None:
    import torch

    from flannel_repro import load_trajectory

    traj = load_trajectory(path)
    before, disk, anon = resource.getrusage(resource.RUSAGE_SELF), disk_read_bytes(), rss_anon_mb()
    start = time.perf_counter()
    if case == "token_rows":
        x = traj.token_rows("W", 42)
    elif case == "token_rows_10":
        x = traj.token_rows("W", list(range(100, 1100, 100)))
    elif case == "step_block_10":
        x = traj.step_block("W", 100, 110)
    elif case == "step_loop":  # without token_rows: every (V, H) slice read, one row kept
        x = torch.stack([traj.step("W", t)[42].clone() for t in range(traj.n_steps + 1)])
    else:  # the whole W in memory, then one row
        x = traj["W"].clone()[0, :, 42]
    wall = time.perf_counter() - start
    after, disk, anon = resource.getrusage(resource.RUSAGE_SELF), disk_read_bytes() - disk, rss_anon_mb() - anon
    faults = after.ru_minflt - before.ru_minflt + after.ru_majflt - before.ru_majflt
    print(f"{case:15}{str(tuple(x.shape)):17}{wall * 1e3:9.1f} ms{anon:+9.1f} MB anon{faults:9} page faults"
          f"{disk / 2**20:9.1f} MB from disk")


def drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trajectory", nargs="?", help="trajectory file (default: paths.trajectory of params.yaml)")
    ap.add_argument("--cold", action="store_true", help="drop the file from the page cache before each case")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    args = ap.parse_args()
    path = args.trajectory
    if path is None:
        from flannel_repro.core.config import load_params

        path = load_params("params.yaml").paths.trajectory
    if args.case:
        read(path, args.case)
        return
    for case in CASES:
        if args.cold:
            drop_from_page_cache(path)
        subprocess.run([sys.executable, __file__, path, "--case", case], check=True)


if __name__ == "__main__":
    main()
