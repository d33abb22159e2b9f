"""The packed trajectory against the safetensors file it packs, side by side in one run (docs/packed.md).

Every case runs in its own process; for each the table gives what the case itself timed and the whole process: wall,
user and sys CPU, peak RSS (os.wait4). On one trajectory file:
- size per key: safetensors bytes, packed bytes, zstd -3 on that key's raw bytes, ZipNN (if the `zipnn` package is
  installed) on them; and the whole file against zstd -3 on the raw file;
- `flannel-repro pack` and `unpack` (the unpacked file's sha256 against the original's) and their throughput;
- reads, packed against safetensors, page cache warm: W at one step (a key frame; a typical step; the step with
  the longest chain, the worst case), a block of 10 steps, one token's path over every step.

    python bench/packed.py tensors/Flannel/1.20h_flannel_7.safetensors [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def case(name: str, path: str, out: str) -> None:
    """One measured case, in this process; prints its JSON on stdout (last line)."""
    result: dict = {}
    start = time.perf_counter()
    if name == "pack":
        from flannel_repro.trajectory.packed import pack

        r = pack(Path(path), Path(out))
        result = {"packed_bytes": r.packed_bytes, "source_bytes": r.source_bytes, "per_key": r.per_key}
    elif name == "unpack":
        from flannel_repro.trajectory.packed import unpack

        unpack(Path(path), Path(out))
    elif name == "zstd_file":
        import zstandard

        with open(path, "rb") as f:
            result = {"bytes": len(zstandard.ZstdCompressor(level=3).compress(f.read()))}
    elif name in ("zstd_keys", "zipnn_keys"):
        from flannel_repro.core.safetensors_header import read_checked_header

        raw = read_checked_header(Path(path))
        if name == "zstd_keys":
            import zstandard

            compress = zstandard.ZstdCompressor(level=3).compress
        else:
            from zipnn import ZipNN

            z = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=1)
            compress = z.compress
        sizes = {}
        with open(path, "rb") as f:
            for key, e in raw.entries().items():
                if e["dtype"] != "BF16" and name == "zipnn_keys":
                    continue
                lo, hi = e["data_offsets"]
                f.seek(raw.data_start + lo)
                sizes[key] = len(compress(f.read(hi - lo)))
        result = {"per_key": sizes}
    else:
        from flannel_repro.trajectory.file import load_trajectory

        kind, _, what = name.partition(":")
        start = time.perf_counter()
        traj = load_trajectory(path)
        k, (key, mid, worst) = traj.params.train.steps, read_steps(traj.params.train.steps, int(out))
        read = {
            "step_key": lambda: traj.step("W", key),
            "step_worst": lambda: traj.step("W", worst),
            "step_mid": lambda: traj.step("W", mid),
            "block_10": lambda: traj.step_block("W", k // 2, k // 2 + 10),
            "token_path": lambda: traj.token_rows("W", 42),
        }[what]
        opened = time.perf_counter()
        cpu = time.process_time()
        read()
        first, first_cpu = time.perf_counter() - opened, time.process_time() - cpu
        again = []
        for _ in range(5):  # the same read again, with nothing decoded kept (the packed reader's last chains)
            getattr(traj, "clear_cache", lambda: None)()
            t0 = time.process_time()
            read()
            again.append(time.process_time() - t0)
        result = {"open_s": opened - start, "first_s": first, "first_cpu_s": first_cpu, "again_cpu_s": min(again)}
        start = opened
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def read_steps(steps: int, key_every: int) -> tuple[int, int, int]:
    """Steps of W to read: a key frame (1 frame per chunk), one of a typical chain (offset 19 in a span of 32: 4
    frames) and the longest chain (offset key_every - 1: 1 + log2(key_every) frames), in the second span where the
    run has one."""
    base = key_every if steps >= 2 * key_every else 0
    return (min(base, steps), min(base + min(19, key_every - 1), steps), min(base + key_every - 1, steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each read case; the fastest is shown")
    ap.add_argument("--case", nargs=3, metavar=("NAME", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        case(*args.case)
        return
    # No torch here: a forked child's peak RSS starts at its parent's (Linux keeps the high-water mark over exec).
    from flannel_repro.core.safetensors_header import read_checked_header
    from flannel_repro.trajectory.packed import KEY_EVERY, chain

    src = Path(args.file)
    me = str(Path(__file__).resolve())
    shape = read_checked_header(src).header["W"]["shape"]
    steps = shape[1] - 1
    size = src.stat().st_size
    print(f"file: {src} ({size:,} bytes; W {list(shape)}, {steps} steps); CPU: {cpu_name()}, {os.cpu_count()} "
          f"cores; python {platform.python_version()}")
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".bench-packed-") as tmp:
        packed, back = Path(tmp) / "p.flpack", Path(tmp) / "back.safetensors"
        print(f"\n{'case':34}{'own s':>9}{'wall s':>9}{'user s':>9}{'sys s':>8}{'peak RSS MB':>13}  throughput")

        def show(label: str, measured, mb: float | None = None) -> dict:
            doc, wall, user, sys_, rss = measured
            rate = f"  {mb / doc['seconds']:.0f} MB/s of safetensors" if mb else ""
            print(f"{label:34}{doc['seconds']:9.3f}{wall:9.2f}{user:9.2f}{sys_:8.2f}{rss:13.0f}{rate}", flush=True)
            return doc

        p = show("pack", measure([me, "--case", "pack", str(src), str(packed)]), size / 1e6)
        show("unpack", measure([me, "--case", "unpack", str(packed), str(back)]), size / 1e6)
        same = hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
        back.unlink()
        z = show("zstd -3, raw file (one thread)", measure([me, "--case", "zstd_file", str(src), "-"]), size / 1e6)
        zk = measure([me, "--case", "zstd_keys", str(src), "-"])[0]["per_key"]
        try:
            import zipnn  # noqa: F401

            zn = measure([me, "--case", "zipnn_keys", str(src), "-"])[0]["per_key"]
        except ImportError:
            zn = {}
            print("zipnn is not installed: its column is left out")
        print(f"\nunpacked sha256 equals the original's: {same}")
        print(f"whole file: safetensors {size:,}; packed {p['packed_bytes']:,} ({size / p['packed_bytes']:.2f}x); "
              f"zstd -3 {z['bytes']:,} ({size / z['bytes']:.2f}x)")
        print(f"\n{'key':10}{'safetensors':>14}{'packed':>14}{'ratio':>7}{'zstd -3':>14}{'ratio':>7}{'ZipNN':>14}"
              f"{'ratio':>7}")
        for key, (plain, ours) in sorted(p["per_key"].items(), key=lambda kv: -kv[1][0])[:6]:
            zipped = f"{zn[key]:>14,}{plain / zn[key]:7.2f}" if key in zn else f"{'-':>14}{'':7}"
            print(f"{key:10}{plain:>14,}{ours:>14,}{plain / ours:7.2f}{zk[key]:>14,}{plain / zk[key]:7.2f}{zipped}")
        print(f"\nreads of W, warm page cache, ms, fastest of {args.repeat} processes: the first read after opening "
              "the file (wall), the same read again (CPU time of this process, best of 5), opening the file (wall); "
              "the whole process's wall, s")
        print(f"{'case':32}{'1st st':>9}{'1st pk':>9}{'pk/st':>7}{'cpu st':>9}{'cpu pk':>9}{'pk/st':>7}"
              f"{'open st':>9}{'open pk':>9}{'wall st':>8}{'wall pk':>8}")
        chains = [len(chain(t, KEY_EVERY)) for t in read_steps(steps, KEY_EVERY)]
        for what, label in (("step_key", f"one step ({chains[0]} frame per chunk)"),
                            ("step_mid", f"one step ({chains[1]} frames per chunk)"),
                            ("step_worst", f"one step ({chains[2]} frames per chunk)"),
                            ("block_10", "a block of 10 steps"), ("token_path", "one token's path, all steps")):
            best = {}
            for form, path in (("st", src), ("pk", packed)):
                runs = [measure([me, "--case", f"{form}:{what}", str(path), str(KEY_EVERY)])
                        for _ in range(args.repeat)]
                best[form] = min(runs, key=lambda m: m[0]["first_s"])  # the least disturbed run
            (st, st_wall, *_), (pk, pk_wall, *_) = best["st"], best["pk"]
            print(f"{label:32}{st['first_s'] * 1e3:9.2f}{pk['first_s'] * 1e3:9.2f}{pk['first_s'] / st['first_s']:7.1f}"
                  f"{st['again_cpu_s'] * 1e3:9.2f}{pk['again_cpu_s'] * 1e3:9.2f}"
                  f"{pk['again_cpu_s'] / max(st['again_cpu_s'], 1e-6):7.1f}"
                  f"{st['open_s'] * 1e3:9.1f}{pk['open_s'] * 1e3:9.1f}{st_wall:8.2f}{pk_wall:8.2f}", flush=True)


def measure(argv: list[str]) -> tuple[dict, float, float, float, float]:
    """One case in its own process: its JSON line (through a pipe) and the process's wall, CPU and peak RSS."""
    r, w = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.execv(sys.executable, [sys.executable, *argv])
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed (status {status})")
    return json.loads(text.strip().splitlines()[-1]), wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024


if __name__ == "__main__":
    main()
