"""Benchmark: `flannel-repro train` against the notebook's own procedure, side by side in one run.

Runs, one after the other on the same machine and thread count:
  1. the notebook's code (tests/notebook_reference.py) on the project's data,
  2. `flannel-repro train` (recording W, grad_W, losses; tracking off),
  3. the same training with recording off (the recording overhead's baseline),
  4. two small-batch runs of 500 and 2,000 steps at the default vocabulary, to show peak RSS is flat in steps,
  5. the tiny-step case (batch 1, 16 tokens, 300 steps: a step takes milliseconds, so recording 2.56 MB of W and
     grad_W per step shows, as on a fast GPU): recording off, synchronous recording (ring_slots=0) and the recording
     ring, interleaved for --rounds rounds (medians); the two recording runs must write the same bytes,
then checks the notebook's keys of both files are byte-identical and prints ratios. Peak RSS and CPU time are each
child process's own (wait4 rusage).

    python bench/bench_train.py                   # the default 500 steps (about 15 minutes on 2 cores)
    python bench/bench_train.py --steps 20        # a quick smoke run
    python bench/bench_train.py --fidelity-only   # 1. and 2. only, and the byte comparison (about 8 minutes)
    python bench/bench_train.py --tiny-only       # 5. only, the tiny-step case
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

REPO = Path(__file__).resolve().parents[1]
# train() in a child: argv[1] is its keyword arguments as JSON (record, ring_slots), the rest -S overrides.
TRAIN = (
    "import sys, json; from pathlib import Path; from flannel_repro.config import load_params; "
    "from flannel_repro.train import train; p = load_params('params.yaml', sys.argv[2:]); "
    "r = train(p, Path('.'), progress=False, **json.loads(sys.argv[1])); "
    "print(json.dumps({'train_s': r.runtime_s, 'sha256': r.sha256}))"
)
TINY = ["train.batch_size=1", "model.max_seq_len=16", "tracking.enabled=false",
        "paths.trajectory=tensors/tiny.safetensors"]
TINY_CASES = {"recording off": {"record": False}, "synchronous recording": {"ring_slots": 0}, "recording ring": {}}


def run(cmd: list[str], cwd: Path) -> dict:
    """Run a child; return wall seconds, its peak RSS in MB and its last stdout line (JSON if it is)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        info = json.loads(last)
    except json.JSONDecodeError:
        info = {}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, **info}


def same_bytes(a: Path, b: Path) -> dict[str, bool]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            out[key] = x.dtype == y.dtype and x.shape == y.shape and bytes(
                x.contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
            ) == bytes(y.contiguous().reshape(-1).view(__import__("torch").uint8).numpy())
    return out


def fidelity_report(results: dict, wd: Path, out: Path) -> None:
    """Compare the notebook's keys of the two files, print the verdict, exit 1 if any key differs."""
    identical = same_bytes(wd / "notebook.safetensors", wd / "tensors/Flannel/1.20h_flannel_7.safetensors")
    results["bit_identical_keys"] = identical
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    metrics = json.loads((wd / "metrics/train.json").read_text())
    print(f"data: n_live {metrics['n_live']}, n_dead {metrics['n_dead']} ({metrics['dead_share']:.1%}); "
          f"trajectory sha256 {metrics['trajectory_sha256']}")
    print(f"notebook keys bit-identical: {all(identical.values())} ({sum(identical.values())}/{len(identical)})")
    for key in sorted(k for k, same in identical.items() if not same):
        print(f"  differs: {key}")
    if not all(identical.values()):
        raise SystemExit(1)


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
    out = {name: {k: statistics.median(r[k] for r in rs) for k in ("train_s", "wall_s", "cpu_s", "peak_rss_mb")}
           for name, rs in runs.items()}
    off = out["recording off"]["train_s"]
    for r in out.values():
        r["overhead"] = r["train_s"] / off - 1
    return {"steps": steps, "rounds": rounds, "cases": out, "runs": runs, "recordings_identical": len(shas) == 1}


def print_tiny(t: dict) -> None:
    print(f"\ntiny-step case ({t['steps']} steps, batch 1, 16 tokens; medians of {t['rounds']} rounds)")
    print(f"{'':24}{'train loop s':>14}{'steps/s':>10}{'process CPU s':>15}{'peak RSS MB':>13}{'overhead':>10}")
    for name, r in t["cases"].items():
        print(f"{name:24}{r['train_s']:>14.2f}{t['steps'] / r['train_s']:>10.1f}{r['cpu_s']:>15.1f}"
              f"{r['peak_rss_mb']:>13.0f}{100 * r['overhead']:>+9.1f}%")
    print(f"synchronous and ring recordings byte-identical: {t['recordings_identical']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--flat-steps", type=int, nargs=2, default=[500, 2000], metavar=("SHORT", "LONG"))
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "work")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    ap.add_argument("--fidelity-only", action="store_true",
                    help="only the notebook's code and flannel-repro train, and whether the notebook's keys are "
                    "byte-identical (exit 1 if not)")
    ap.add_argument("--tiny-steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the tiny-step case (medians)")
    ap.add_argument("--tiny-only", action="store_true", help="only the tiny-step case")
    args = ap.parse_args()

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", wd / "params.yaml")
    exe = [sys.executable, "-m", "flannel_repro"]
    for stage in ("corpus", "tokenizer-corpus", "tokenizer", "masks"):
        run([*exe, stage], wd)
    if args.tiny_only:
        tiny = tiny_case(wd, args.tiny_steps, args.rounds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"tiny_step": tiny}, indent=2) + "\n")
        print_tiny(tiny)
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

    results: dict = {"steps": args.steps, "cpu_threads": os.cpu_count()}
    print(f"notebook procedure, {args.steps} steps ...", flush=True)
    notebook = [sys.executable, str(REPO / "tests/notebook_reference.py"), str(wd / "notebook.json")]
    results["notebook"] = run(notebook, wd)
    print(f"flannel-repro train, {args.steps} steps ...", flush=True)
    ours = run([*exe, "train", "-q", *sum((["-S", s] for s in steps), [])], wd)
    ours["train_s"] = json.loads((wd / "metrics/train.json").read_text())["runtime_s"]
    results["flannel_repro"] = ours
    if args.fidelity_only:
        fidelity_report(results, wd, args.out)
        return
    print("recording off ...", flush=True)
    results["recording_off"] = run([sys.executable, "-c", TRAIN, '{"record": false}', *steps], wd)
    shutil.rmtree(wd / "notebook_scratch", ignore_errors=True)

    flat = {}
    for n in args.flat_steps:
        print(f"RSS flatness: {n} steps at batch 1 ...", flush=True)
        over = [f"train.steps={n}", "train.batch_size=1", "model.max_seq_len=16", "tracking.enabled=false",
                "paths.trajectory=tensors/flat.safetensors"]
        flat[n] = run([*exe, "train", "-q", *sum((["-S", s] for s in over), [])], wd)["peak_rss_mb"]
    (wd / "tensors/flat.safetensors").unlink(missing_ok=True)
    results["flat_peak_rss_mb"] = flat
    results["tiny_step"] = tiny_case(wd, args.tiny_steps, args.rounds)

    identical = same_bytes(wd / "notebook.safetensors", wd / "tensors/Flannel/1.20h_flannel_7.safetensors")
    results["bit_identical_keys"] = identical
    nb, fr, off = results["notebook"], results["flannel_repro"], results["recording_off"]
    results["speedup_train_loop"] = nb["train_s"] / fr["train_s"]
    results["speedup_process"] = nb["wall_s"] / fr["wall_s"]
    results["recording_overhead"] = fr["train_s"] / off["train_s"] - 1
    results["rss_ratio"] = fr["peak_rss_mb"] / nb["peak_rss_mb"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'':24}{'train loop s':>14}{'process s':>12}{'steps/s':>10}{'peak RSS MB':>13}")
    for name, r in (("notebook", nb), ("flannel-repro", fr), ("flannel-repro, no record", off)):
        print(f"{name:24}{r['train_s']:>14.1f}{r['wall_s']:>12.1f}{args.steps / r['train_s']:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}")
    print(f"\nspeed-up vs notebook: {results['speedup_train_loop']:.3f}x (training loop), "
          f"{results['speedup_process']:.3f}x (whole process)")
    print(f"recording overhead: {100 * results['recording_overhead']:+.2f}% vs the same run with recording off")
    print(f"peak RSS: {fr['peak_rss_mb']:.0f} MB vs notebook {nb['peak_rss_mb']:.0f} MB "
          f"({results['rss_ratio']:.2f}x); flat in steps: "
          + ", ".join(f"{k} steps {v:.0f} MB" for k, v in flat.items()))
    print(f"notebook keys bit-identical: {all(identical.values())} ({sum(identical.values())}/{len(identical)})")
    print_tiny(results["tiny_step"])


if __name__ == "__main__":
    main()
