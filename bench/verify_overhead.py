"""What an audit costs: `train` against `verify` of its own output, and of a reference diverging at step k.

    python bench/verify_overhead.py [--params params.yaml] [-S train.steps=20 ...] [--k K] [--rounds R]

Trains the reference once (also the warm-up), then times, in this one process and R times each (the fastest
counts): a second `train` that writes its file, `verify` of the reference (expected identical, at most 1.1x a
train), and `verify` of a copy whose W digest at step k was changed (a corrupt reference: expected to end at step
k, about (k+1)/(steps+1) of a train). Also the part of an identical verify spent reading and hashing the
reference's own bytes (`reference_check_ms_per_step`). Files go to bench/results/verify_overhead/ under the project
root (git-ignored). Run it on the full configuration only on an otherwise idle machine; `-S` makes it tiny for a
smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
import time
from pathlib import Path

from flannel_repro.audit.reference import file_reference
from flannel_repro.audit.verify import verify
from flannel_repro.core.config import load_params
from flannel_repro.core.runtime import configure
from flannel_repro.core.safetensors_header import read_header
from flannel_repro.training.loop import train

OUT = Path("bench/results/verify_overhead")


def corrupt_digest(src: Path, dst: Path, step: int) -> None:
    """Copy `src` with digest_W[0, step] zeroed: verify must stop at step `step`, the first corrupt one."""
    shutil.copyfile(src, dst)
    header = read_header(dst)
    with open(dst, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + header["digest_W"]["data_offsets"][0] + step * 32)
        f.write(bytes(32))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--k", type=int, help="divergent step (default: steps // 2)")
    ap.add_argument("--rounds", type=int, default=1, help="time each case R times and keep the fastest")
    args = ap.parse_args()
    configure()  # the start-up settings `flannel-repro` applies, as this process stands for it

    base = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    steps = base.train.steps
    k = args.k if args.k is not None else steps // 2
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)

    def at(name: str):
        return dataclasses.replace(base, paths=dataclasses.replace(base.paths, trajectory=str(OUT / name)))

    warm_s, _ = timed(lambda: train(at("reference.safetensors"), root, progress=False))
    reference = out / "reference.safetensors"
    diverging = out / f"diverging_at_{k}.safetensors"
    corrupt_digest(reference, diverging, k)

    t_train, t_verify, t_div = [], [], []
    for _ in range(args.rounds):
        t_train.append(timed(lambda: train(at("train.safetensors"), root, progress=False))[0])
        s, report = timed(lambda: verify(file_reference(reference), root))
        if not report.identical:
            raise SystemExit(f"the rerun diverged from its own reference at step {report.first.step}: "
                             "not deterministic")
        t_verify.append(s)
        own = report.reruns[0].reference_check_s / report.reruns[0].steps_checked
        s, report = timed(lambda: verify(file_reference(diverging), root))
        first = report.corruption[0] if report.corruption else None
        if first is None or (first.key, first.step) != ("digest_W", k):
            raise SystemExit(f"expected corrupt digest_W at step {k}, got {first}")
        t_div.append(s)
        checked = report.reruns[0].steps_checked

    best = {"train": min(t_train), "verify": min(t_verify), "verify_divergent": min(t_div)}
    summary = {
        "steps": steps,
        "k": k,
        "warmup_train_s": round(warm_s, 3),
        **{f"{name}_s": round(v, 3) for name, v in best.items()},
        "verify_over_train": round(best["verify"] / best["train"], 3),
        "divergent_over_train": round(best["verify_divergent"] / best["train"], 3),
        "expected_divergent_over_train": round((k + 1) / (steps + 1), 3),
        "divergent_steps_checked": checked,  # k + 1: steps 0..k
        "reference_check_ms_per_step": round(own * 1000, 3),  # of the last identical verify
    }
    print(json.dumps(summary, indent=2))
    for p in (out / "train.safetensors", diverging):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
