"""Benchmark: `flannel-repro train` against the notebook's own procedure, side by side in one run.

Runs, on the same machine and thread count, alternating their order from one round to the next:
  1. the notebook's code (tests/notebook_reference.py) on the project's data, as the notebook runs (no settings),
  2. `flannel-repro train` (recording W, grad_W, losses; tracking off), with the start-up settings of runtime.py,
  3. the same training with recording off (the recording overhead's baseline), with the same settings;
then two small-batch runs of 500 and 2,000 steps at the default vocabulary, to show peak RSS is flat in steps, and
the tiny-step case (batch 1, 16 tokens, 300 steps: a step takes milliseconds, so recording 2.56 MB of W and grad_W
per step shows, as on a fast GPU): recording off, synchronous recording (ring_slots=0) and the recording ring,
rotated over --tiny-rounds rounds; the two recording variants must write the same bytes.
It checks the notebook's keys of both default files are byte-identical and prints ratios, medians over the rounds.
Wall, user and sys CPU, minor page faults and peak RSS are each child process's own (wait4 rusage); for
`flannel-repro train` peak RSS is also read at each progress line, so its growth along the run shows too.

    python bench/bench_train.py                   # the default 500 steps (about 15 minutes on 2 cores)
    python bench/bench_train.py --steps 40 --rounds 3 --no-flat   # a quicker comparison, 3 rounds
    python bench/bench_train.py --fidelity-only   # 1. and 2. only, and the byte comparison (exit 1 if any differs)
    python bench/bench_train.py --tiny-only       # the tiny-step case only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flannel_repro.trajectory.provenance import cpu_model

REPO = Path(__file__).resolve().parents[1]
# train() in a child, with the start-up settings the command line applies first: argv[1] is train()'s keyword
# arguments as JSON (record, ring_slots), the rest are -S overrides.
TRAIN = (
    "import sys, json; from pathlib import Path; from flannel_repro.core.runtime import configure; rt = configure(); "
    "from flannel_repro.core.config import load_params; from flannel_repro.training.loop import train; "
    "p = load_params('params.yaml', sys.argv[2:]); "
    "r = train(p, Path('.'), progress=False, **json.loads(sys.argv[1])); "
    "print(json.dumps({'train_s': r.runtime_s, 'sha256': r.sha256, 'allocator': rt.allocator}))"
)
TINY = ["train.batch_size=1", "model.max_seq_len=16", "tracking.enabled=false", "train.checkpoint_every=0",
        "paths.trajectory=tensors/tiny.safetensors"]
TINY_CASES = {"recording off": {"record": False}, "synchronous recording": {"ring_slots": 0}, "recording ring": {}}
LABELS = {"notebook": "notebook procedure", "flannel_repro": "flannel-repro train",
          "recording_off": "flannel-repro, no record"}


def _hwm_mb(pid: int) -> float | None:
    """The child's peak RSS so far, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(cmd: list[str], cwd: Path) -> dict:
    """Run a child; return its wall seconds, CPU seconds, minor page faults and peak RSS in MB, its peak RSS at each
    `step N/M` progress line on stderr, and its last stdout line (JSON if it is)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines, rss_at_step = [], {}
    for line in proc.stderr:  # progress lines as they come; the child's stdout is a few short lines
        err_lines.append(line)
        words = line.split()
        if len(words) >= 2 and words[0] == "step" and "/" in words[1]:
            hwm = _hwm_mb(proc.pid)
            if hwm is not None:
                rss_at_step[int(words[1].split("/")[0])] = round(hwm, 1)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{''.join(err_lines)[-3000:]}")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        info = json.loads(last)
    except json.JSONDecodeError:
        info = {}
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "peak_rss_mb": usage.ru_maxrss / 1024, **({"peak_rss_mb_at_step": rss_at_step} if rss_at_step else {}),
            **info}


def same_bytes(a: Path, b: Path) -> dict[str, bool]:
    import torch
    from safetensors import safe_open

    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    out = {}
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            out[key] = x.dtype == y.dtype and x.shape == y.shape and raw(x) == raw(y)
    return out


def make_data(wd: Path) -> None:
    """The default params and the data stages' outputs (corpus, tokenizer, masks) in the work folder `wd`."""
    wd.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", wd / "params.yaml")
    for stage in ("corpus", "tokenizer-corpus", "tokenizer", "masks"):
        run([sys.executable, "-m", "flannel_repro", stage], wd)


def _overrides(pairs: list[str]) -> list[str]:
    return sum((["-S", s] for s in pairs), [])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def tiny_case(wd: Path, steps: int, rounds: int) -> dict:
    """The tiny-step case, each variant once per round in a rotating order; medians over the rounds."""
    names = list(TINY_CASES)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % 3:] + names[: i % 3]:
            print(f"tiny-step case, {name}, round {i + 1}/{rounds} ...", flush=True)
            runs[name].append(run([sys.executable, "-c", TRAIN, json.dumps(TINY_CASES[name]), f"train.steps={steps}",
                                   *TINY], wd))
    (wd / "tensors/tiny.safetensors").unlink(missing_ok=True)
    shas = {r["sha256"] for name in names[1:] for r in runs[name]}
    keys = ("train_s", "wall_s", "user_s", "sys_s", "peak_rss_mb")
    out = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    off = out["recording off"]["train_s"]
    for r in out.values():
        r["overhead"] = r["train_s"] / off - 1
    return {"steps": steps, "rounds": rounds, "cases": out, "runs": runs, "recordings_identical": len(shas) == 1}


def print_tiny(t: dict) -> None:
    print(f"\ntiny-step case ({t['steps']} steps, batch 1, 16 tokens; medians of {t['rounds']} rounds)")
    print(f"{'':24}{'train loop s':>14}{'steps/s':>10}{'user s':>8}{'sys s':>7}{'peak RSS MB':>13}{'overhead':>10}")
    for name, r in t["cases"].items():
        print(f"{name:24}{r['train_s']:>14.2f}{t['steps'] / r['train_s']:>10.1f}{r['user_s']:>8.1f}{r['sys_s']:>7.1f}"
              f"{r['peak_rss_mb']:>13.0f}{100 * r['overhead']:>+9.1f}%")
    print(f"synchronous and ring recordings byte-identical: {t['recordings_identical']}")


def fidelity(wd: Path) -> dict[str, bool]:
    """The notebook's keys of the two default files, key by key: byte-identical or not."""
    identical = same_bytes(wd / "notebook.safetensors", wd / "tensors/Flannel/1.20h_flannel_7.safetensors")
    print(f"notebook keys bit-identical: {all(identical.values())} ({sum(identical.values())}/{len(identical)})")
    for key in sorted(k for k, same in identical.items() if not same):
        print(f"  differs: {key}")
    return identical


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1, help="run every default case R times, alternating the order")
    ap.add_argument("--flat-steps", type=int, nargs=2, default=[500, 2000], metavar=("SHORT", "LONG"))
    ap.add_argument("--no-flat", action="store_true", help="skip the small-batch RSS flatness runs")
    ap.add_argument("--tiny-steps", type=int, default=300)
    ap.add_argument("--tiny-rounds", type=int, default=3, help="rounds of the tiny-step case (medians)")
    ap.add_argument("--fidelity-only", action="store_true",
                    help="only the notebook's code and flannel-repro train, and whether the notebook's keys are "
                    "byte-identical (exit 1 if not)")
    ap.add_argument("--tiny-only", action="store_true", help="only the tiny-step case")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "work")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = ap.parse_args()

    wd = args.workdir
    make_data(wd)
    exe = [sys.executable, "-m", "flannel_repro"]
    results: dict = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_before": _load()}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    if args.tiny_only:
        results["tiny_step"] = tiny_case(wd, args.tiny_steps, args.tiny_rounds)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print_tiny(results["tiny_step"])
        return

    steps = [f"train.steps={args.steps}", "tracking.enabled=false"]
    nb_cfg = {
        "init_seed": 42, "train_seed": 42, "vocab_size": 10000, "hidden_dim": 64, "n_layer": 2, "n_head": 2,
        "max_seq_len": 128, "batch_size": 32, "steps": args.steps,
        "tokenizer": str(wd / "data/flannel_tokenizer_chars.json"), "corpus": str(wd / "data/flannel_model_corpus.txt"),
        "masks": str(wd / "tensors/Flannel/live_dead_tokens.safetensors"), "scratch_dir": str(wd / "notebook_scratch"),
        "output": str(wd / "notebook.safetensors"),
    }
    (wd / "notebook.json").write_text(json.dumps(nb_cfg))

    def notebook() -> dict:
        r = run([sys.executable, str(REPO / "tests/notebook_reference.py"), str(wd / "notebook.json")], wd)
        shutil.rmtree(wd / "notebook_scratch", ignore_errors=True)
        return r

    def flannel() -> dict:
        r = run([*exe, "train", *_overrides(steps)], wd)  # not -q: progress lines give peak RSS along the run
        r["train_s"] = json.loads((wd / "metrics/train.json").read_text())["runtime_s"]
        return r

    def record_off() -> dict:
        return run([sys.executable, "-c", TRAIN, '{"record": false}', *steps], wd)

    cases = {"notebook": notebook, "flannel_repro": flannel}
    if not args.fidelity_only:
        cases["recording_off"] = record_off
    results.update({"steps": args.steps, "rounds": args.rounds, "runs": {name: [] for name in cases}})
    for r in range(args.rounds):
        for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            print(f"round {r + 1}/{args.rounds}: {name}, {args.steps} steps ...", flush=True)
            results["runs"][name].append(cases[name]())

    if args.fidelity_only:
        results["bit_identical_keys"] = identical = fidelity(wd)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        if not all(identical.values()):
            raise SystemExit(1)
        return

    flat = {}
    if not args.no_flat:
        for n in args.flat_steps:
            print(f"RSS flatness: {n} steps at batch 1 ...", flush=True)
            over = [f"train.steps={n}", "train.batch_size=1", "model.max_seq_len=16", "tracking.enabled=false",
                    "paths.trajectory=tensors/flat.safetensors"]
            flat[n] = run([*exe, "train", "-q", *_overrides(over)], wd)["peak_rss_mb"]
        (wd / "tensors/flat.safetensors").unlink(missing_ok=True)
    results["flat_peak_rss_mb"] = flat
    results["tiny_step"] = tiny_case(wd, args.tiny_steps, args.tiny_rounds)
    results["load_average_after"] = _load()
    results["allocator"] = {"notebook": "system default (as the notebook runs)",
                            "flannel_repro": results["runs"]["recording_off"][0]["allocator"]}

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results["runs"][name])

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(results["runs"][a], results["runs"][b], strict=True)]

    speed = ratios("notebook", "flannel_repro", "train_s")
    results["speedup_train_loop"] = {"median": statistics.median(speed), "min": min(speed), "max": max(speed)}
    results["speedup_process"] = statistics.median(ratios("notebook", "flannel_repro", "wall_s"))
    results["recording_overhead"] = statistics.median(ratios("flannel_repro", "recording_off", "train_s")) - 1
    results["peak_rss_mb"] = {name: max(x["peak_rss_mb"] for x in results["runs"][name]) for name in cases}

    print(f"\n{results['cpu']}, {results['cpu_count']} CPUs; load average before {results['load_average_before']}, "
          f"after {results['load_average_after']}; medians of {args.rounds} round(s)")
    alloc = results["allocator"]
    print(f"allocator: notebook {alloc['notebook']}; flannel-repro {alloc['flannel_repro']}")
    print(f"\n{'':26}{'train loop s':>13}{'process s':>11}{'steps/s':>9}{'user s':>8}{'sys s':>7}{'faults':>10}"
          f"{'peak RSS MB':>13}")
    for name, label in LABELS.items():
        print(f"{label:26}{med(name, 'train_s'):>13.1f}{med(name, 'wall_s'):>11.1f}"
              f"{args.steps / med(name, 'train_s'):>9.2f}{med(name, 'user_s'):>8.1f}{med(name, 'sys_s'):>7.1f}"
              f"{med(name, 'minor_faults'):>10.0f}{results['peak_rss_mb'][name]:>13.0f}")
    s = results["speedup_train_loop"]
    print(f"\nspeed-up vs notebook: {s['median']:.3f}x training loop (rounds: {s['min']:.3f}-{s['max']:.3f}), "
          f"{results['speedup_process']:.3f}x whole process")
    print(f"recording overhead: {100 * results['recording_overhead']:+.2f}% vs the same run with recording off")
    along = results["runs"]["flannel_repro"][-1].get("peak_rss_mb_at_step", {})
    print(f"peak RSS: flannel-repro {results['peak_rss_mb']['flannel_repro']:.0f} MB, notebook "
          f"{results['peak_rss_mb']['notebook']:.0f} MB; along the run: "
          + ", ".join(f"step {k} {v:.0f} MB" for k, v in along.items()))
    if flat:
        print("flat in steps (batch 1): " + ", ".join(f"{k} steps {v:.0f} MB" for k, v in flat.items()))
    results["bit_identical_keys"] = fidelity(wd)
    print_tiny(results["tiny_step"])
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
