"""What MLflow tracking costs a train run: the time spent inside tracking code, against the run's total time.

Runs the train stage with tracking (`train.run_train_stage`, what `flannel-repro train` calls) once, in this
process, with a timer around every tracking entry point: opening the store (importing mlflow, creating the run),
the params/git/DVC tags, the per-step metrics sink, run start/end, the final hashes, inputs and artifacts, and
closing the run. Prints the tracking seconds and their share of the run; a fresh SQLite store in a scratch folder.
Beside them, the token motion that train() computes at every step for the CSV and tracking (`motion.TokenMotion`).

    python bench/tracking_overhead.py                    # the default 500 steps (about 4 minutes on 2 cores)
    python bench/tracking_overhead.py -S train.steps=20  # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from pathlib import Path

from flannel_repro.core.config import load_params
from flannel_repro.core.runtime import configure
from flannel_repro.recording import motion
from flannel_repro.tracking import mlflow_store as mlflow_tracker
from flannel_repro.training import stage as train
from flannel_repro.training import train_log

REPO = Path(__file__).resolve().parents[1]
SPENT: dict[str, float] = {}
MOTION: list[float] = []  # seconds of each TokenMotion call, one per step


def timed(name: str, fn):
    """`fn`, adding the seconds of each call to SPENT[name]."""
    return _timing(fn, lambda s: SPENT.__setitem__(name, SPENT.get(name, 0.0) + s))


def timed_motion(fn):
    """`fn`, appending the seconds of each call to MOTION."""
    return _timing(fn, MOTION.append)


def _timing(fn, add):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            add(time.perf_counter() - start)

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "tracking")
    ap.add_argument("--data", type=Path, default=None, help="folder with data/ and tensors/ to reuse")
    args = ap.parse_args()
    configure()  # the start-up settings `flannel-repro` applies, as this process stands for it

    wd = args.workdir
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", wd / "params.yaml")
    params = load_params(wd / "params.yaml", ["tracking.enabled=true", "tracking.uri=null", *args.overrides])
    if args.data:
        for sub in ("data", "tensors"):
            shutil.copytree(args.data / sub, wd / sub)
    else:
        from flannel_repro.data.corpus import corpus
        from flannel_repro.data.masks import masks
        from flannel_repro.data.tokenizer import tokenizer
        from flannel_repro.data.tokenizer_corpus import tokenizer_corpus

        corpus(params, wd)
        tokenizer_corpus(params, wd)
        tokenizer(params, wd)
        masks(params, wd)

    # Every way into tracking code during a run, each under its own timer.
    train_log.open_tracker = timed("open store and create run", train_log.open_tracker)
    train_log.log_run_start = timed("params, git and DVC tags", train_log.log_run_start)
    train.log_train_result = timed("hashes, inputs, artifacts", train.log_train_result)
    train_log.StepMetrics.__call__ = timed("per-step metrics", train_log.StepMetrics.__call__)
    for method in ("start_run", "end_run", "finish"):
        cls = mlflow_tracker.MlflowTracker
        setattr(cls, method, timed(f"run {method}", getattr(cls, method)))
    motion.TokenMotion.__call__ = timed_motion(motion.TokenMotion.__call__)

    start = time.perf_counter()
    result, run_id = train.run_train_stage(params, wd, progress=False)
    total = time.perf_counter() - start
    spent = sum(SPENT.values())
    doc = {
        "steps": params.train.steps,
        "total_s": total,
        "train_loop_s": result.runtime_s,
        "tracking_s": spent,
        "tracking_share": spent / total,
        "per_step_ms": 1000 * SPENT.get("per-step metrics", 0.0) / (params.train.steps + 1),
        "breakdown_s": SPENT,
        "motion_s": sum(MOTION),
        "motion_per_step_ms": 1000 * sum(MOTION) / len(MOTION),
        "motion_median_ms": 1000 * sorted(MOTION)[len(MOTION) // 2],
        "motion_share_of_loop": sum(MOTION) / result.runtime_s,
        "run_id": run_id,
    }
    out = REPO / "bench" / "results" / "tracking_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for name, s in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"{name:28}{s:8.3f} s")
    print(f"\ntracking: {spent:.2f} s of a {total:.1f} s run = {100 * spent / total:.2f}% "
          f"(per step {doc['per_step_ms']:.2f} ms)")
    print(f"token motion (train): {doc['motion_s']:.2f} s = {100 * doc['motion_share_of_loop']:.2f}% of the "
          f"{result.runtime_s:.1f} s training loop (per step {doc['motion_per_step_ms']:.2f} ms mean, "
          f"{doc['motion_median_ms']:.2f} ms median)")


if __name__ == "__main__":
    main()
