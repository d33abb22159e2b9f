"""What tracing one step costs: the same training with no step traced against one step traced, side by side.

    python bench/trace_cost.py [--params params.yaml] [-S train.steps=2 ...] [--step 1] [--rounds R]

In this one process, R times each and alternating (the fastest counts): `train` recording to memory (write=False,
as verify's rerun) without a trace, and with `--step` traced op by op (tracing/). Reports wall and CPU (user+sys)
seconds of each, their difference (the cost of the traced step), the trace's ops and bytes as written, and the
process's peak RSS. The trace goes to bench/results/trace_cost/ under the project root (git-ignored). Use a short
run (`-S train.steps=2`): the cost is that of one step, the rest of the run is the same in both.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from flannel_repro.core.config import load_params
from flannel_repro.core.runtime import configure
from flannel_repro.tracing.callback import StepTraces, trace_header
from flannel_repro.tracing.file import write_trace
from flannel_repro.training.loop import train

OUT = Path("bench/results/trace_cost")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--step", type=int, default=1, help="the step traced (default 1)")
    ap.add_argument("--rounds", type=int, default=2, help="time each case R times and keep the fastest")
    args = ap.parse_args()
    configure()
    params = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)

    train(params, root, write=False, progress=False)  # warm-up: imports, first allocations
    cases: dict[str, list[tuple[float, float]]] = {"untraced": [], "traced": []}
    traces = None
    for _ in range(args.rounds):
        for name in cases:
            traces = StepTraces((args.step,)) if name == "traced" else None
            wall, cpu = time.perf_counter(), cpu_s()
            train(params, root, write=False, progress=False, traces=traces)
            cases[name].append((time.perf_counter() - wall, cpu_s() - cpu))
            if traces is not None:
                kept = traces
    path = out / f"step{args.step}.jsonl"
    write_trace(path, trace_header(None, {}, "bench"), kept.traced)
    best = {k: min(v) for k, v in cases.items()}
    doc = {
        "model": {"vocab_size": params.model.vocab_size, "hidden_dim": params.model.hidden_dim,
                  "n_layer": params.model.n_layer, "max_seq_len": params.model.max_seq_len,
                  "batch_size": params.train.batch_size},
        "steps": params.train.steps, "traced_step": args.step, "rounds": args.rounds,
        "untraced_wall_s": round(best["untraced"][0], 3), "untraced_cpu_s": round(best["untraced"][1], 3),
        "traced_wall_s": round(best["traced"][0], 3), "traced_cpu_s": round(best["traced"][1], 3),
        "trace_cost_wall_s": round(best["traced"][0] - best["untraced"][0], 3),
        "trace_cost_cpu_s": round(best["traced"][1] - best["untraced"][1], 3),
        "ops": sum(len(v) for v in kept.traced.values()), "trace_bytes": path.stat().st_size,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
