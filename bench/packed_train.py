"""Benchmark: what writing the packed form while training costs (record.format: packed), side by side in one run.

Three cases, each its own process, rotated from round to round: recording off (the baseline), recording into the
safetensors file, recording straight into the packed file. Two workloads: the default model (V = 10,000, H = 64,
batch 32 x 128 tokens; --steps of them) and the tiny-step case of bench_train.py (batch 1, 16 tokens: a step of a
few milliseconds, as on a fast GPU, so the writer thread's compression is what shows). Prints the training loop's
seconds and its overhead against recording off (medians), the whole process's wall, user and sys CPU, minor page
faults and peak RSS, and the file sizes; checks that both recordings hold the same numbers (one content digest).

    python bench/packed_train.py                      # 60 default steps and 300 tiny steps, 3 rounds
    python bench/packed_train.py --steps 500 --rounds 1 --no-tiny

Peak RSS moves in steps of about 156 MiB from run to run, in every case: the allocator settings of
core/runtime.py keep freed logits-sized blocks in the heap, and where a small live block lands decides whether the
next step reuses a hole or grows the heap (docs/packed.md). So the table gives its range over the rounds too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _load, make_data, run  # noqa: E402

from flannel_repro.trajectory.provenance import cpu_model  # noqa: E402

TRAIN = (
    "import sys, json, os; from pathlib import Path; from flannel_repro.core.runtime import configure; "
    "rt = configure(); "
    "from flannel_repro.core.config import load_params; from flannel_repro.training.loop import train; "
    "p = load_params('params.yaml', sys.argv[2:]); "
    "r = train(p, Path('.'), progress=False, **json.loads(sys.argv[1])); "
    "print(json.dumps({'train_s': r.runtime_s, 'content': r.content_digest, "
    "'bytes': r.file_bytes}))"
)
COMMON = ["tracking.enabled=false", "train.checkpoint_every=0", "record.trace_steps=[]"]  # the recording alone
TINY = ["train.batch_size=1", "model.max_seq_len=16"]
CASES = {
    "recording off": ({"record": False}, ["paths.trajectory=tensors/off.safetensors"]),
    "safetensors": ({}, ["paths.trajectory=tensors/b.safetensors"]),
    "packed": ({}, ["record.format=packed", "paths.trajectory=tensors/b.flpack"]),
}
KEYS = ("train_s", "wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mb")


def workload(wd: Path, label: str, steps: int, rounds: int, extra: list[str]) -> dict:
    names = list(CASES)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % 3:] + names[: i % 3]:
            kwargs, overrides = CASES[name]
            print(f"{label}, {name}, round {i + 1}/{rounds} (load {_load()}) ...", flush=True)
            cmd = [sys.executable, "-c", TRAIN, json.dumps(kwargs), f"train.steps={steps}", *COMMON, *extra,
                   *overrides]
            runs[name].append(run(cmd, wd))
    out = {n: {k: statistics.median(r[k] for r in rs) for k in KEYS} for n, rs in runs.items()}
    base = out["recording off"]["train_s"]
    for n, r in out.items():
        r["overhead"] = r["train_s"] / base - 1
        r["bytes"] = runs[n][-1].get("bytes")
        r["peak_rss_range_mb"] = [min(x["peak_rss_mb"] for x in runs[n]), max(x["peak_rss_mb"] for x in runs[n])]
    digests = {r["content"] for n in ("safetensors", "packed") for r in runs[n]}
    return {"steps": steps, "rounds": rounds, "cases": out, "runs": runs, "same_numbers": len(digests) == 1}


def show(label: str, w: dict) -> None:
    print(f"\n{label}: {w['steps']} steps, medians of {w['rounds']} rounds")
    print(f"{'':16}{'loop s':>9}{'overhead':>10}{'wall s':>9}{'user s':>8}{'sys s':>7}{'faults':>10}{'RSS MB':>8}"
          f"{'RSS min-max':>13}{'file bytes':>14}")
    for name, r in w["cases"].items():
        size = f"{r['bytes']:,}" if r["bytes"] else "-"
        lo, hi = r["peak_rss_range_mb"]
        print(f"{name:16}{r['train_s']:>9.2f}{100 * r['overhead']:>+9.1f}%{r['wall_s']:>9.2f}{r['user_s']:>8.1f}"
              f"{r['sys_s']:>7.1f}{r['minor_faults']:>10,.0f}{r['peak_rss_mb']:>8.0f}{f'{lo:.0f}-{hi:.0f}':>13}"
              f"{size:>14}")
    s, p = w["cases"]["safetensors"]["bytes"], w["cases"]["packed"]["bytes"]
    print(f"packed file {s / p:.2f}x smaller; both recordings one content digest: {w['same_numbers']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="default-model steps (default 60)")
    ap.add_argument("--tiny-steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--no-default", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("bench_work/packed_train"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    make_data(args.work)
    threads = [f"train.num_threads={args.threads}"]
    print(f"CPU: {cpu_model()}; {args.threads} torch threads")
    results = {}
    if not args.no_default:
        results["default"] = workload(args.work, "default model", args.steps, args.rounds, threads)
    if not args.no_tiny:
        results["tiny"] = workload(args.work, "tiny step", args.tiny_steps, args.rounds, [*threads, *TINY])
    for label, w in results.items():
        show(label, w)
    (args.work / "packed_train.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
