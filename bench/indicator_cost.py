"""The CPU cost per step of the in-flight analysis sinks, side by side: token motion (the baseline) and the
under-training indicators, each fed the same (V, H) bf16 W and grad_W slices one step at a time, with one torch
thread, as on the recording ring's writer thread.

Each sink runs in its own process (so one cannot warm the other's caches or allocator) and prints, per step, the
median and 90th percentile of its wall time and of its process CPU time (user + sys), and the process's peak RSS.

    python bench/indicator_cost.py                    # V = 10,000, H = 64, 37% dead, 200 steps
    python bench/indicator_cost.py --vocab 50257 --hidden 768
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SINKS = ("motion", "indicators")


def measure(sink_name: str, vocab: int, hidden: int, steps: int) -> dict[str, float]:
    import torch

    from flannel_repro.data.masks import Masks
    from flannel_repro.recording.indicators import TokenIndicators
    from flannel_repro.recording.motion import TokenMotion
    from flannel_repro.recording.records import StepRecord

    torch.set_num_threads(1)  # the writer thread's
    gen = torch.Generator().manual_seed(0)
    dead = torch.zeros(vocab, dtype=torch.bool)
    dead[torch.randperm(vocab, generator=gen)[: vocab * 37 // 100]] = True
    masks = Masks(~dead, dead, torch.zeros(vocab, dtype=torch.int64))
    sink = (TokenMotion if sink_name == "motion" else TokenIndicators)(masks, 1, steps)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).bfloat16()
    g = (torch.randn(vocab, hidden, generator=gen) * 1e-3).bfloat16()
    walls, cpus = [], []
    for t in range(steps + 1):
        step_w = w + (t * 1e-4)  # another slice each step
        rec = StepRecord(0, t, 0.0, 0.0, 0.0, {"W": step_w, "grad_W": g})
        wall, cpu = time.perf_counter(), time.process_time()
        sink(rec)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    walls.sort()
    cpus.sort()
    return {
        "wall_ms_median": walls[len(walls) // 2] * 1e3, "wall_ms_p90": walls[len(walls) * 9 // 10] * 1e3,
        "cpu_ms_median": cpus[len(cpus) // 2] * 1e3, "cpu_ms_p90": cpus[len(cpus) * 9 // 10] * 1e3,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=10_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--one", choices=SINKS, help=argparse.SUPPRESS)  # a child process: measure one sink
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.vocab, args.hidden, args.steps)))
        return
    print(f"V = {args.vocab:,}, H = {args.hidden}, {args.steps} steps, one torch thread")
    for name in SINKS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--vocab", str(args.vocab), "--hidden",
                              str(args.hidden), "--steps", str(args.steps)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout)
        print(f"{name:>10}: wall {r['wall_ms_median']:6.2f} ms/step (p90 {r['wall_ms_p90']:6.2f}), CPU "
              f"{r['cpu_ms_median']:6.2f} ms/step (p90 {r['cpu_ms_p90']:6.2f}), peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
