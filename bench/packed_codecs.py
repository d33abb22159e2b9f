"""Which container and transform make a trajectory small: the measurements behind the packed form (docs/packed.md).

On one safetensors trajectory, one core, each candidate's bytes for W and grad_W (all steps) and the ratio against
their safetensors bytes:
- zstd on the raw file (python-zstandard, levels 3 and 9), the general-purpose anchor;
- per step: byte planes + zstd; W XOR the previous step, byte planes + zstd; XOR the step the packed form's
  version 2 refers to (the offset in the span with its lowest set bit cleared: at most 1 + log2(K) frames per
  step read); with key frames every K steps and frames of R rows (the packed form's own layout);
- blosc bitshuffle + zstd (numcodecs, what zarr v3 would store per chunk), on the slices and on the XOR deltas;
- ZipNN (the `zipnn` package, byte grouping + entropy coding for bf16), on the slices and on the XOR deltas.
A codec whose package is not installed is skipped, with a line saying so.

    python bench/packed_codecs.py tensors/Flannel/1.20h_flannel_7.safetensors
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import zstandard

from flannel_repro.trajectory.file import load_trajectory
from flannel_repro.trajectory.packed import reference, to_planes


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def slices(traj, name: str) -> list[np.ndarray]:
    """Every (V, H) slice of run 0 as uint16 words."""
    return [traj.step(name, t).view(torch.int16).numpy().view(np.uint16)
            for t in range(traj.n_steps + 1)]


def framed(words: list[np.ndarray], key_every: int, rows: int, delta: bool, level: int, to: str = "prev") -> int:
    """Bytes of the packed layout: frames of `rows` rows, byte planes, XOR with the step before (`to` "prev"), the
    span's key frame ("key") or the packed form's reference step ("ref") unless a key frame."""
    c = zstandard.ZstdCompressor(level=level)
    total = 0
    for t, w in enumerate(words):
        r = {"prev": t - 1, "key": t - t % key_every, "ref": reference(t, key_every)}[to]
        src = w ^ words[r] if delta and t % key_every else w
        for a in range(0, w.shape[0], rows):
            total += len(c.compress(to_planes(np.ascontiguousarray(src[a : a + rows]).reshape(-1))))
    return total


def deltas(words: list[np.ndarray]) -> list[np.ndarray]:
    return [words[0]] + [words[t] ^ words[t - 1] for t in range(1, len(words))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    args = ap.parse_args()
    size = os.path.getsize(args.file)
    traj = load_trajectory(args.file)
    print(f"file: {args.file} ({size:,} bytes; {traj.n_steps} steps, V x H = {traj.shapes['W'][2:]}); "
          f"CPU: {cpu_name()}, {os.cpu_count()} cores; one thread per codec")
    rows: list[tuple[str, str, int, float]] = []

    def row(what: str, key: str, nbytes: int, seconds: float) -> None:
        base = size if key == "file" else traj.shapes[key][1] * np.prod(traj.shapes[key][2:]) * 2
        rows.append((what, key, nbytes, seconds))
        print(f"{what:58}{key:8}{nbytes:>14,} bytes {base / nbytes:6.2f}x {seconds:7.1f} s", flush=True)

    raw = open(args.file, "rb").read()
    for level in (3, 9):
        start = time.perf_counter()
        n = len(zstandard.ZstdCompressor(level=level).compress(raw))
        row(f"zstd -{level} on the raw file", "file", n, time.perf_counter() - start)
    del raw
    data = {name: slices(traj, name) for name in ("W", "grad_W") if name in traj}
    for name, words in data.items():
        for level in (3,):
            start = time.perf_counter()
            c = zstandard.ZstdCompressor(level=level)
            n = sum(len(c.compress(w.tobytes())) for w in words)
            row(f"zstd -{level} per step", name, n, time.perf_counter() - start)
        for delta in (False, True):
            for key_every, chunk, level in ((10**9, 10**9, 3), (25, 1024, 3), (10, 1024, 3), (50, 1024, 3),
                                            (25, 10**9, 3), (25, 256, 3), (25, 1024, 1), (25, 1024, 9)):
                if not delta and key_every != 10**9 and (key_every, chunk) != (25, 1024):
                    continue
                start = time.perf_counter()
                n = framed(words, key_every, chunk, delta, level)
                k = "never" if key_every == 10**9 else key_every
                r = "whole slices" if chunk == 10**9 else f"{chunk} rows"
                label = f"{'xor prev, ' if delta else ''}planes, zstd -{level}, key {k}, {r}"
                row(label, name, n, time.perf_counter() - start)
    for name, words in data.items():
        for key_every in (5, 10, 25):
            start = time.perf_counter()
            n = framed(words, key_every, 1024, True, 3, to="key")
            row(f"xor key frame, planes, zstd -3, key {key_every}, 1024 rows", name, n, time.perf_counter() - start)
        for key_every in (8, 16, 32, 64):
            start = time.perf_counter()
            n = framed(words, key_every, 1024, True, 3, to="ref")
            row(f"xor ref step (v2), planes, zstd -3, key {key_every}, 1024 rows", name, n,
                time.perf_counter() - start)
        start = time.perf_counter()
        n = framed(words, 32, 1024, True, 3)
        row("xor prev, planes, zstd -3, key 32, 1024 rows", name, n, time.perf_counter() - start)
    try:
        from numcodecs import Blosc, blosc
    except ImportError:
        print("numcodecs (blosc) is not installed: skipped")
    else:
        codec = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE, typesize=2, blocksize=0)
        blosc.set_nthreads(1)
        for name, words in data.items():
            for label, src in (("blosc bitshuffle + zstd 3 per step", words),
                               ("xor prev, blosc bitshuffle + zstd 3 (no key frames)", deltas(words))):
                start = time.perf_counter()
                n = sum(len(codec.encode(w)) for w in src)
                row(label, name, n, time.perf_counter() - start)
    try:
        from zipnn import ZipNN
    except ImportError:
        print("zipnn is not installed: skipped")
    else:
        z = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=1)
        for name, words in data.items():
            for label, src in (("ZipNN bf16 per step", words), ("xor prev, ZipNN bf16 (no key frames)", deltas(words))):
                start = time.perf_counter()
                n = sum(len(z.compress(w.tobytes())) for w in src)
                row(label, name, n, time.perf_counter() - start)


if __name__ == "__main__":
    main()
