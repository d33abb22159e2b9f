"""The packed trajectory: the same numbers as the safetensors file, in about a third of the bytes (docs/packed.md).

A packed file holds the safetensors file's own header bytes and every key's data in zstd frames (python-zstandard),
so `unpack` gives back the very file the run wrote (same sha256) and both forms share the content digest. Each
per-step (V, H) slice is stored per (run, step) with its 16-bit words as two byte planes (all low bytes, then all
high bytes). W (and Adam's moments) are key frames (self-contained) at every `key_every`-th step and delta frames
between them, in frames of `rows_per_chunk` rows: a delta frame is the XOR with the same rows at its reference step,
the step with the lowest set bit of its offset in the span cleared (`reference`: step 13 of a span refers to 12, 12
to 8, 8 to the key frame), so reading one step decodes at most 1 + log2(key_every) frames per chunk, a walk over the
steps one frame per step, and a token's path one frame per step, never whole slices. grad_W, whose steps do not
resemble each other, is one frame per whole slice.

Every frame starts with a fixed record naming its key, run, step and chunk and the sha256 of the frame, so a
damaged, truncated, swapped or missing frame is named by key, run and step (`PackedCorrupt`, exit 1); the index
(offsets of every frame, at the end) is found through the file's fixed header.

    pack(Path("run.safetensors"), Path("run.flpack"))       # -> PackResult (sizes, sha256 of the source)
    unpack(Path("run.flpack"), Path("copy.safetensors"))     # the same bytes as run.safetensors
    with PackedFile(Path("run.flpack")) as pf:
        pf.read_slice("W", 0, 250)                           # (V * H,) uint16: W[0, 250]'s bf16 words
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zstandard

from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import commit_file, temp_path_for
from flannel_repro.core.safetensors_header import ITEMSIZE, layout_problems, parse_raw_header, read_checked_header
from flannel_repro.trajectory import content
from flannel_repro.trajectory.layout import SCHEDULE_KEY

MAGIC = b"\x89FLANPK\n"  # as the first 8 bytes of a safetensors file, a header length far past its 100 MB limit
VERSION = 2  # 2: a delta frame refers to its `reference` step; 1 (read, not written): to the step before
READS = (1, 2)
PACKED_SUFFIX = ".flpack"
INDEX_FORMAT = "flannel-packed/1"
KEY_EVERY = 32  # a key frame every 32 steps: one step decodes at most 6 frames (docs/packed.md: the measurements)
ROWS_PER_CHUNK = 1024  # rows of W per frame: a token's path decodes 128 KB per step at H = 64
# zstd level per codec: W's deltas are smaller and 2x faster at 1 than at 3; grad_W grows 13% at 1
# (docs/packed.md: the measurements)
LEVELS = {"xor-planes": 1, "planes": 3, "bytes": 3}
_CHAIN_GROUPS = 4  # (key, run) pairs whose last decoded chains a reader keeps
_DECODED_LIMIT = 1 << 32  # no frame decodes to more (a whole (V, H) slice of 50k x 4k bf16 is 0.4 GB)
_HEAD_LIMIT = 8 + 100 * 1024 * 1024  # safetensors' own limit on its JSON header

# The file's fixed header: magic, version, key_every, rows_per_chunk, flags, index offset, index length, and the
# sha256 of the index frame's payload.
_FIXED = struct.Struct("<8sIIII QQ32s")
# Each frame's record: tag, kind, 0, name length, run, step, chunk, 0, payload length, raw length, sha256 (of this
# record's first 40 bytes, the name and the payload); then the name (UTF-8) and the payload (one zstd frame).
_FRAME = struct.Struct("<4sBBHIIII QQ32s")
_TAG = b"FRM1"
_SIGNED = _FRAME.size - 32  # the record bytes its sha256 covers, with the name and the payload
HEAD, BYTES, KEY, DELTA, INDEX = 0, 1, 2, 3, 4  # frame kinds
_KIND_NAMES = {HEAD: "head", BYTES: "bytes", KEY: "key frame", DELTA: "delta frame", INDEX: "index"}
DELTA_KEYS = ("W", "momentum", "variance")  # stored as XOR with the step before; grad_W is not (measured: no gain)


class PackedCorrupt(FlannelError):
    """A packed file's frame is damaged, truncated, moved or missing: the verdict "corrupt" (exit 1)."""

    exit_code = 1

    def __init__(self, path: Path, key: str, what: str, run: int | None = None, step: int | None = None) -> None:
        where = f" at run {run}, step {step}" if step is not None else ""
        super().__init__(f"{path}: {key or 'file'}{where}: {what}")
        self.key, self.what, self.run, self.step = key, what, run, step


def is_packed(path: Path) -> bool:
    """Does the file at `path` start with the packed form's magic? (False for anything unreadable, and for what is
    not a regular file: opening a FIFO would block; the caller's checks name what it is.)"""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# -- the byte transforms ---------------------------------------------------------------------------------------
def to_planes(words: np.ndarray) -> bytes:
    """16-bit words (n,) as two byte planes: the n low bytes, then the n high bytes."""
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, 2).T).tobytes()


def from_planes(raw: bytes) -> np.ndarray:
    """The inverse of `to_planes`: (n,) uint16."""
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, -1)
    return planes[0].astype("<u2") | (planes[1].astype("<u2") << 8)  # 3x faster than a transposed copy


@dataclass(frozen=True)
class KeyInfo:
    """One key of the packed file: its safetensors dtype, shape and data offsets, and its frames' file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    codec: str  # "bytes" (one frame), "planes" or "xor-planes" (per run, step and chunk)
    frames: Sequence[int]  # record offsets, in (run, step, chunk) order

    @property
    def per_step(self) -> bool:
        return self.codec != "bytes"


def reference(step: int, key_every: int, version: int = VERSION) -> int | None:
    """The step a delta frame at `step` is XORed with; None for a key frame (`step mod key_every == 0`). Version 2:
    `step` with the lowest set bit of its offset in the span cleared; version 1: the step before."""
    offset = step % key_every
    if offset == 0:
        return None
    return step - 1 if version == 1 else step - (offset & -offset)


def chain(step: int, key_every: int, version: int = VERSION) -> list[int]:
    """The steps whose frames decode `step`: its key frame first, `step` last (a step's chain holds the chain of
    every step it refers to, so reading the steps in order decodes one new frame per step)."""
    out = [step]
    while (r := reference(out[-1], key_every, version)) is not None:
        out.append(r)
    return out[::-1]


def referenced(step: int, key_every: int, version: int = VERSION) -> set[int]:
    """The steps up to `step` that a later delta frame of the same span refers to: what a writer keeps."""
    end = step - step % key_every + key_every
    refs = {reference(t, key_every, version) for t in range(step + 1, end)}
    return {r for r in refs if r is not None and r <= step}


def codec_for(name: str, dtype: str, shape: tuple[int, ...], step_names: set[str]) -> str:
    if name in step_names and dtype == "BF16" and len(shape) == 4 and all(shape):
        return "xor-planes" if name in DELTA_KEYS else "planes"
    return "bytes"


class _FrameWriter:
    """Appends frames to an open file, with the fixed header's room reserved at the start."""

    def __init__(self, f: BinaryIO, levels: set[int], threads: int) -> None:
        self.f = f
        self.pos = _FIXED.size
        self.f.seek(self.pos)
        self._cctx = {lv: [zstandard.ZstdCompressor(level=lv, write_checksum=True) for _ in range(max(1, threads))]
                      for lv in levels}
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))

    def compress_all(self, raws: list[bytes], level: int) -> list[bytes]:
        """zstd frames of `raws` at `level`, compressed on the pool's threads (zstd releases the GIL)."""
        cctx = self._cctx[level]
        n = len(cctx)
        parts = [raws[i::n] for i in range(n)]
        done = list(self.pool.map(lambda i: [cctx[i].compress(r) for r in parts[i]], range(n)))
        out: list[bytes] = [b""] * len(raws)
        for i, chunk in enumerate(done):
            out[i::n] = chunk
        return out

    def append(self, kind: int, name: str, run: int, step: int, chunk: int, payload: bytes, raw_len: int) -> int:
        """Write one frame record and its payload; returns its offset."""
        encoded = name.encode("utf-8")
        head = _FRAME.pack(_TAG, kind, 0, len(encoded), run, step, chunk, 0, len(payload), raw_len, b"")[:_SIGNED]
        sha = hashlib.sha256(head + encoded + payload).digest()
        at = self.pos
        self.f.write(head + sha + encoded)
        self.f.write(payload)
        self.pos += _FRAME.size + len(encoded) + len(payload)
        return at

    def close(self) -> None:
        self.pool.shutdown()


class FrameStream:
    """The frames of one trajectory in the packed file's order, appended to an open file: every per-step tensor one
    (run, step) at a time (`add_step`, the per-step keys by name), then the head, the other keys and the index
    (`finish`). `pack` feeds it from a safetensors file; the trajectory writer of `record.format: packed`
    (packed_writer.py) feeds it from training, so the two give the same bytes."""

    def __init__(self, f: BinaryIO, entries: dict[str, dict[str, Any]], key_every: int = KEY_EVERY,
                 rows_per_chunk: int = ROWS_PER_CHUNK, level: int | None = None, threads: int = 2,
                 version: int = VERSION) -> None:
        self.key_every, self.rows_per_chunk, self.version = key_every, rows_per_chunk, version
        self.entries = entries  # name -> {"dtype", "shape", "data_offsets"}, as the safetensors header has them
        steps = content.step_keyed(entries)
        self.codecs = {n: codec_for(n, e["dtype"], tuple(e["shape"]), steps) for n, e in entries.items()}
        self.per_step = sorted(n for n, c in self.codecs.items() if c != "bytes")
        self.bounds = {n: _chunks(entries[n]["shape"][2], rows_per_chunk, self.codecs[n]) for n in self.per_step}
        self.frames: dict[str, list[int]] = {n: [] for n in entries}
        self.held: dict[str, dict[int, np.ndarray]] = {}  # a delta key's words at the steps later frames refer to
        self.levels = {c: LEVELS[c] if level is None else level for c in LEVELS}  # one `level` for all, if given
        self.w = _FrameWriter(f, set(self.levels.values()), threads)

    def add_step(self, run: int, step: int, slices: dict[str, np.ndarray]) -> None:
        """Append the frames of every per-step key at (run, step); `slices[name]` is its (V, H) uint16 words."""
        for name in self.per_step:
            words = slices[name]
            xor = self.codecs[name] == "xor-planes"
            ref = reference(step, self.key_every, self.version) if xor else None
            source = words if ref is None else np.bitwise_xor(words, self.held[name][ref])
            raws = [to_planes(np.ascontiguousarray(source[a:b]).reshape(-1)) for a, b in self.bounds[name]]
            kind = KEY if ref is None else DELTA
            for chunk, payload in enumerate(self.w.compress_all(raws, self.levels[self.codecs[name]])):
                self.frames[name].append(self.w.append(kind, name, run, step, chunk, payload, len(raws[chunk])))
            if xor:
                self.hold(name, step, {step: words})

    def hold(self, name: str, step: int, decoded: dict[int, np.ndarray]) -> None:
        """Keep, of a delta key's words held and `decoded` (step -> words), those at the steps later frames of the
        span refer to (at most 1 + log2(key_every) of them)."""
        keep = referenced(step, self.key_every, self.version)
        held = {} if step % self.key_every == 0 else self.held.get(name, {})
        self.held[name] = {s: w for s, w in {**held, **decoded}.items() if s in keep}

    def finish(self, head: bytes, data: dict[str, bytes], source_size: int) -> None:
        """Append the head (the safetensors file's first bytes), every other key's bytes (in data order) and the
        index, then fill in the fixed header."""
        w = self.w
        level = self.levels["bytes"]
        head_off = w.append(HEAD, "", 0, 0, 0, w.compress_all([head], level)[0], len(head))
        order = sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])
        for name in order:
            if self.codecs[name] == "bytes":
                raw = data[name]
                self.frames[name].append(w.append(BYTES, name, 0, 0, 0, w.compress_all([raw], level)[0], len(raw)))
        keys = [_key_json(KeyInfo(n, self.entries[n]["dtype"], tuple(self.entries[n]["shape"]),
                                  tuple(self.entries[n]["data_offsets"]), self.codecs[n], tuple(self.frames[n])))
                for n in order]
        index = {"format": INDEX_FORMAT, "source": {"size": source_size}, "head": head_off, "keys": keys}
        if self.version >= 2:  # what the fixed header says again, under the index's digest (docs/packed.md)
            index["layout"] = _layout(self.version, self.key_every, self.rows_per_chunk)
        _finish(w, index, self.version, self.key_every, self.rows_per_chunk, level)

    def close(self) -> None:
        self.w.close()


@dataclass(frozen=True)
class PackResult:
    source_bytes: int
    packed_bytes: int
    source_sha256: str
    per_key: dict[str, tuple[int, int]]  # name -> (safetensors bytes, packed bytes)

    @property
    def ratio(self) -> float:
        return self.source_bytes / self.packed_bytes


def pack(src: Path, out: Path, key_every: int = KEY_EVERY, rows_per_chunk: int = ROWS_PER_CHUNK,
         level: int | None = None, threads: int = 2, version: int = VERSION) -> PackResult:
    """Pack the safetensors trajectory `src` into `out` (written to a temporary name, renamed into place);
    `version=1` writes the format an older flannel-repro reads."""
    src, out = Path(src), Path(out)
    for what, value in (("--key-every", key_every), ("rows per chunk", rows_per_chunk), ("--threads", threads)):
        if value < 1:
            raise FlannelError(f"{what} {value}: give at least 1")
    if is_packed(src):
        raise FlannelError(f"{src}: is already packed; give the safetensors file (or `flannel-repro unpack` it)")
    raw = read_checked_header(src)  # a truncated or malformed file is one clear error before any work
    if raw.metadata.get("format") is None or "params" not in raw.metadata:
        raise FlannelError(f"{src}: not a flannel-repro trajectory (no format or params in its header); give a "
                           "file written by `flannel-repro train`")
    entries = raw.entries()
    if SCHEDULE_KEY in entries:  # the packed reader indexes steps by position, not by the schedule's training steps
        raise FlannelError(f"{src}: recorded with a record.steps schedule, which the packed form does not carry yet; "
                           "keep the safetensors file (a scheduled file is already small: docs/analysis.md)")
    tmp = temp_path_for(out)
    try:
        with open(src, "rb") as s, open(tmp, "r+b") as f:
            fd, size = s.fileno(), os.fstat(s.fileno()).st_size
            whole = _file_sha256(fd)
            stream = FrameStream(f, entries, key_every, rows_per_chunk, level, threads, version)
            try:
                if stream.per_step:
                    runs, steps1, v, h = entries[stream.per_step[0]]["shape"]
                    for run in range(runs):
                        for step in range(steps1):
                            stream.add_step(run, step, {
                                n: np.frombuffer(_read_span(fd, raw.data_start, entries[n], (run * steps1 + step),
                                                            v * h * 2), dtype="<u2").reshape(v, h)
                                for n in stream.per_step})
                data = {n: _read_span(fd, raw.data_start, e, 0, e["data_offsets"][1] - e["data_offsets"][0])
                        for n, e in entries.items() if stream.codecs[n] == "bytes"}
                stream.finish(raw.head, data, size)
            finally:
                stream.close()
        commit_file(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    per_key = {n: (e["data_offsets"][1] - e["data_offsets"][0], _frames_bytes(out, stream.frames[n]))
               for n, e in entries.items()}
    return PackResult(size, out.stat().st_size, whole, per_key)


def _read_span(fd: int, data_start: int, entry: dict[str, Any], index: int, n: int) -> bytes:
    """The `index`-th run of `n` bytes of a key's data (a whole (V, H) slice, or the whole key at index 0)."""
    at = data_start + entry["data_offsets"][0] + index * n
    out = os.pread(fd, n, at)
    if len(out) != n:
        raise FlannelError(f"data ends at byte {at + len(out):,}, inside a tensor: the file is truncated")
    return out


def _file_sha256(fd: int) -> str:
    h, at = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 22, at):
        h.update(chunk)
        at += len(chunk)
    return h.hexdigest()


def _frames_bytes(path: Path, frames: list[int]) -> int:
    """Bytes of a key's frames (records, names and payloads), read back from their records."""
    total = 0
    with open(path, "rb") as f:
        for at in frames:
            rec = _FRAME.unpack(os.pread(f.fileno(), _FRAME.size, at))
            total += _FRAME.size + rec[3] + rec[8]
    return total


def _chunks(v: int, rows_per_chunk: int, codec: str) -> list[tuple[int, int]]:
    """Row ranges of the frames of one (V, H) slice: `rows_per_chunk` rows for a delta-coded key, the whole slice
    for grad_W (measured: its 1024-row frames take 1.5x the bytes of whole slices, W's 1.02x)."""
    rows = rows_per_chunk if codec == "xor-planes" else v
    return [(a, min(a + rows, v)) for a in range(0, v, rows)]


def _layout(version: int, key_every: int, rows_per_chunk: int) -> dict[str, int]:
    return {"version": version, "key_every": key_every, "rows_per_chunk": rows_per_chunk}


def _natural(x: Any, limit: int) -> int:
    """An index's integer field: a JSON integer from 0 to `limit`, else ValueError."""
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= limit:
        raise ValueError(f"{x!r} is not an integer from 0 to {limit:,}")
    return x


def _key_json(k: KeyInfo) -> dict[str, Any]:
    return {"name": k.name, "dtype": k.dtype, "shape": list(k.shape), "data_offsets": list(k.data_offsets),
            "codec": k.codec, "frames": list(k.frames)}


def _finish(w: _FrameWriter, index: dict[str, Any], version: int, key_every: int, rows_per_chunk: int,
            level: int) -> None:
    """Append the index frame, then fill in the fixed header that points at it."""
    text = json.dumps(index, separators=(",", ":")).encode("utf-8")
    payload = w.compress_all([text], level)[0]
    at = w.append(INDEX, "", 0, 0, 0, payload, len(text))
    length = w.pos - at
    w.f.seek(0)
    w.f.write(_FIXED.pack(MAGIC, version, key_every, rows_per_chunk, 0, at, length,
                          hashlib.sha256(payload).digest()))
    w.f.flush()


@dataclass(frozen=True)
class Frame:
    kind: int
    name: str
    run: int
    step: int
    chunk: int
    raw_len: int
    payload: bytes


class PackedFile:
    """A packed file opened for reading: the fixed header and the index read and checked, frames on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise FlannelError(f"{self.path}: packed trajectory not found; check the path") from None
        except OSError as e:
            raise FlannelError(f"{self.path}: packed trajectory cannot be read ({e.strerror})") from None
        self.size = os.fstat(self._f.fileno()).st_size
        self._dctx = zstandard.ZstdDecompressor()
        self._chains: dict[tuple[str, int], dict[int, dict[int, np.ndarray]]] = {}  # (key, run) -> chunk -> chain
        try:
            self._open_index()
        except BaseException:
            self._f.close()
            raise

    def _open_index(self) -> None:
        fixed = self._pread(0, _FIXED.size)
        if len(fixed) < _FIXED.size or fixed[:8] != MAGIC:
            raise FlannelError(f"{self.path}: not a packed flannel-repro trajectory (it does not start with the "
                               "packed form's magic bytes); give a file written by `flannel-repro pack`")
        magic, self.version, self.key_every, self.rows_per_chunk, flags, at, length, sha = _FIXED.unpack(fixed)
        if self.version not in READS:
            raise FlannelError(f"{self.path}: packed trajectory format version {self.version}, but this "
                               f"flannel-repro reads versions {READS[0]} to {READS[-1]}; unpack it with the "
                               "flannel-repro that packed it")
        if at == 0:
            raise PackedCorrupt(self.path, "index", "the file was never finished (no index): the partial file of a "
                                                    "pack or a run that did not complete")
        if at + length > self.size:
            self._diagnose(f"the index at byte {at:,} lies past the end of the file ({self.size:,} bytes)")
        try:
            frame = self._frame_at(at, INDEX, "", 0, 0, 0, "index")
        except PackedCorrupt as e:
            self._diagnose(f"the index is not where the file's fixed header puts it ({e.what})")
        if hashlib.sha256(frame.payload).digest() != sha:
            raise PackedCorrupt(self.path, "index", "does not hash to the digest in the file's fixed header")
        if at + length != self.size or length != _FRAME.size + len(frame.payload):
            raise PackedCorrupt(self.path, "file", f"the index frame is the last {length:,} bytes by the fixed header, "
                                                   f"but the file has {self.size - at - length:,} bytes after it "
                                                   "(appended to or extended)")
        if self.key_every < 1 or self.rows_per_chunk < 1 or flags != 0:
            raise PackedCorrupt(self.path, "file", f"the fixed header holds key_every {self.key_every}, "
                                                   f"rows_per_chunk {self.rows_per_chunk} and flags {flags}")
        try:
            index = json.loads(self._decode(frame, "index", None, None))
            if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {index.get('format') if isinstance(index, dict) else None!r}")
            self.source_size = _natural(index["source"]["size"], 1 << 62)
            self._head_at = _natural(index["head"], self.size)
            layout = index.get("layout")
            self.keys = {}
            for k in index["keys"]:
                frames = k["frames"]
                if not isinstance(frames, list) or not isinstance(k["name"], str):
                    raise TypeError(f"{k['name']!r}: a name and a list of frames")
                self.keys[k["name"]] = KeyInfo(k["name"], k["dtype"], tuple(k["shape"]), tuple(k["data_offsets"]),
                                               k["codec"], tuple(_natural(x, self.size) for x in frames))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise PackedCorrupt(self.path, "index", f"is not the index this flannel-repro writes ({e})") from None
        want = _layout(self.version, self.key_every, self.rows_per_chunk) if self.version >= 2 else None
        if layout != want:  # the fixed header has no digest of its own: the index vouches for what frames mean
            raise PackedCorrupt(self.path, "file", f"the fixed header says {want or {'version': 1}}, the index "
                                                   f"{layout or {'version': 1}}: the fixed header was changed")
        self._index_at = at
        self.header = self._checked_head()

    def _checked_head(self) -> dict[str, Any]:
        """The safetensors header the file unpacks to, checked as any safetensors header is, and which the index
        must describe key for key (dtype, shape, data offsets, codec, number of frames): the reader takes shapes
        from the index, `check` from this header, so the two cannot disagree."""
        try:
            raw = parse_raw_header(self.path, self.head(), self.source_size, "packed safetensors header")
        except PackedCorrupt:
            raise
        except FlannelError as e:
            raise PackedCorrupt(self.path, "header", str(e).removeprefix(f"{self.path}: ")) from None
        problems = layout_problems(raw)
        if problems:
            key, why = problems[0]
            raise PackedCorrupt(self.path, "header", f"the packed safetensors header: {key + ' ' if key else ''}{why}")
        entries = raw.entries()
        if set(entries) != set(self.keys):
            raise PackedCorrupt(self.path, "index", "does not list the keys of the packed safetensors header")
        steps = content.step_keyed(entries)
        for name, e in entries.items():
            k = self.keys[name]
            codec = codec_for(name, e["dtype"], tuple(e["shape"]), steps)
            if (k.dtype, k.shape, k.data_offsets, k.codec) != (e["dtype"], tuple(e["shape"]),
                                                               tuple(e["data_offsets"]), codec):
                raise PackedCorrupt(self.path, name, f"the index describes it as {k.dtype} {list(k.shape)} at "
                                                     f"{list(k.data_offsets)} ({k.codec!r}), the packed safetensors "
                                                     f"header as {e['dtype']} {e['shape']} at {e['data_offsets']} "
                                                     f"({codec!r})")
            n_chunks = 1 if codec != "xor-planes" else -(-k.shape[2] // self.rows_per_chunk)
            want = n_chunks if codec == "bytes" else k.shape[0] * k.shape[1] * n_chunks
            if len(k.frames) != want:
                raise PackedCorrupt(self.path, name, f"the index lists {len(k.frames)} frames of codec {codec!r}; "
                                                     f"its shape needs {want}")
            # the header's own values from here on (checked naturals: 300 and 300.0 compare equal)
            self.keys[name] = KeyInfo(name, e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]), codec, k.frames)
        return raw.header

    def check_listed(self) -> None:
        """Every frame in the file is one the index lists (or the head, or the index itself): nothing was inserted
        between them. One pass over the frame records (`unpack` and so `check` make it)."""
        listed = {self._head_at, self._index_at, *(at for k in self.keys.values() for at in k.frames)}
        for at, rec in scan(self._f, self.size):
            if rec is None or at not in listed:
                raise PackedCorrupt(self.path, "file", f"holds bytes at {at:,} that are no frame the index lists "
                                                       "(inserted into the file)")

    def _diagnose(self, why: str) -> None:
        """The index cannot be reached (`why`): walk the frames from the first, in the order they are written (every
        per-step key by run, step, name and chunk; then the head, the other keys in data order), and name the first
        frame that is missing, out of place or truncated. Always raises PackedCorrupt."""
        frames = list(scan(self._f, self.size))
        heads = [at for at, rec in frames if rec is not None and rec[1] == HEAD]
        if not heads:  # the head is written after the per-step frames: the file ends before it
            self._ends_early(frames, why)
        try:
            raw = self._decode(self._frame_at(heads[0], HEAD, "", 0, 0, 0, "header"), "header", None, None)
            header = json.loads(raw[8:])
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
            steps = content.step_keyed(entries)
            codecs = {n: codec_for(n, entries[n]["dtype"], tuple(entries[n]["shape"]), steps) for n in order}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise PackedCorrupt(self.path, "header", f"{why}, and the packed safetensors header is unreadable"
                                ) from None
        per_step = sorted(n for n in order if codecs[n] != "bytes")
        wanted: list[tuple[str, int, int, int, int]] = []
        if per_step:
            runs, steps1, v = entries[per_step[0]]["shape"][:3]
            for r in range(runs):
                for s in range(steps1):
                    for n in per_step:
                        kind = DELTA if codecs[n] == "xor-planes" and s % self.key_every else KEY
                        wanted += [(n, kind, r, s, c) for c in range(len(_chunks(v, self.rows_per_chunk, codecs[n])))]
        wanted.append(("header", HEAD, 0, 0, 0))
        wanted += [(n, BYTES, 0, 0, 0) for n in order if codecs[n] == "bytes"]
        walk = iter(frames)
        for name, kind, run, step, chunk in wanted:
            at, rec = next(walk, (self.size, None))
            where = (run, step) if kind in (KEY, DELTA) else (None, None)
            what = f"the {_KIND_NAMES[kind]}" + (f" (chunk {chunk})" if kind in (KEY, DELTA) else "")
            if rec is None:
                whole_record = self._pread(at, 4) == _TAG
                lost = ("missing: the file ends before it" if at >= self.size else
                        "truncated: the file ends inside it" if whole_record else "overwritten")
                raise PackedCorrupt(self.path, name, f"{what} is {lost} (byte {at:,} of {self.size:,}; {why})",
                                    *where)
            got = (rec[1], self._pread(at + _FRAME.size, rec[3]).decode("utf-8", "replace"), *rec[4:7])
            if got != (kind, "" if kind == HEAD else name, run, step, chunk):
                raise PackedCorrupt(self.path, name, f"{what} is missing or out of place: the file holds "
                                                     f"{self._held(rec, at)} where it belongs ({why})", *where)
        raise PackedCorrupt(self.path, "index", f"{why}; every frame before it is in place")

    def _ends_early(self, frames: list[tuple[int, tuple | None]], why: str) -> None:
        """The walk found no head: name the frame the file breaks off in (its record says which key, run and step),
        or the last whole one."""
        at, rec = frames[-1] if frames else (_FIXED.size, None)
        raw = self._pread(at, _FRAME.size)
        if rec is None and len(raw) == _FRAME.size and raw[:4] == _TAG:
            _, kind, _, nlen, run, step, chunk, *_ = _FRAME.unpack(raw)
            name = self._pread(at + _FRAME.size, nlen).decode("utf-8", "replace")
            if kind in (KEY, DELTA):
                raise PackedCorrupt(self.path, name, f"the {_KIND_NAMES[kind]} (chunk {chunk}) is truncated: the file "
                                                     f"ends inside it (byte {at:,} of {self.size:,}; {why})", run, step)
        last = next(((a, r) for a, r in reversed(frames) if r is not None), None)
        after = f" after {self._held(last[1], last[0])}" if last is not None else ""
        lost = "the file ends" if rec is None and len(raw) < 4 else "the frames break off"
        raise PackedCorrupt(self.path, "header", f"{why}, and {lost} at byte {at:,}{after}, before the header frame")

    def _held(self, rec: tuple, at: int | None = None) -> str:
        """What a frame record holds, e.g. `W run 0, step 26, chunk 0`."""
        name = self._pread(at + _FRAME.size, rec[3]).decode("utf-8", "replace") if at is not None else ""
        kind = _KIND_NAMES.get(rec[1], "?")
        if rec[1] in (KEY, DELTA):
            return f"{name or kind} run {rec[4]}, step {rec[5]}, chunk {rec[6]}"
        return f"{name} ({kind})" if name else f"the {kind}"

    def _pread(self, at: int, n: int) -> bytes:
        return os.pread(self._f.fileno(), n, at)

    def _frame_at(self, at: int, kind: int, name: str, run: int, step: int, chunk: int, key: str,
                  check_digest: bool = True) -> Frame:
        """The frame record at `at`, which must be (kind, name, run, step, chunk) and whole."""
        where = (run, step) if kind in (KEY, DELTA) else (None, None)
        raw = self._pread(at, _FRAME.size)
        if len(raw) < _FRAME.size:
            raise PackedCorrupt(self.path, key, f"the frame at byte {at:,} is truncated (the file ends at "
                                                f"{self.size:,})", *where)
        tag, k, _, nlen, r, s, c, _, plen, rlen, sha = _FRAME.unpack(raw)
        if tag != _TAG:
            raise PackedCorrupt(self.path, key, f"no frame at byte {at:,}, where the index puts this "
                                                f"{_KIND_NAMES[kind]}: it is missing or was overwritten", *where)
        if at + _FRAME.size + nlen + plen > self.size or rlen > _DECODED_LIMIT:  # before reading or allocating it
            raise PackedCorrupt(self.path, key, f"the frame at byte {at:,} is truncated or its record damaged: it "
                                                f"gives {plen:,} bytes of payload and {rlen:,} decoded (the file ends "
                                                f"at {self.size:,})", *where)
        body = self._pread(at + _FRAME.size, nlen + plen)
        if len(body) < nlen + plen:
            raise PackedCorrupt(self.path, key, f"the frame at byte {at:,} is truncated (the file ends at "
                                                f"{self.size:,})", *where)
        if check_digest and hashlib.sha256(raw[:_SIGNED] + body).digest() != sha:
            raise PackedCorrupt(self.path, key, f"the {_KIND_NAMES[kind]} (chunk {chunk}) no longer matches its "
                                                "digest: its bytes changed after it was written", *where)
        got_name = body[:nlen].decode("utf-8", "replace")
        if (k, got_name, r, s, c) != (kind, name, run, step, chunk):
            held = f"{got_name or _KIND_NAMES.get(k, '?')} run {r}, step {s}, chunk {c} ({_KIND_NAMES.get(k, '?')})"
            raise PackedCorrupt(self.path, key, f"the index points at a frame holding {held}, not this "
                                                f"{_KIND_NAMES[kind]} (chunk {chunk}): frames were moved, swapped "
                                                "or lost", *where)
        return Frame(k, got_name, r, s, c, rlen, body[nlen:])

    def _decode(self, frame: Frame, key: str, run: int | None, step: int | None) -> bytes:
        try:
            out = self._dctx.decompress(frame.payload, max_output_size=frame.raw_len)
        except zstandard.ZstdError as e:
            raise PackedCorrupt(self.path, key, f"the {_KIND_NAMES[frame.kind]} (chunk {frame.chunk}) does not "
                                                f"decompress ({e})", run, step) from None
        if len(out) != frame.raw_len:
            raise PackedCorrupt(self.path, key, f"the {_KIND_NAMES[frame.kind]} (chunk {frame.chunk}) decodes to "
                                                f"{len(out)} bytes, not {frame.raw_len}", run, step)
        return out

    # -- what readers use ------------------------------------------------------------------------------------
    def head(self) -> bytes:
        """The safetensors file's first bytes: length, JSON header, padding."""
        frame = self._frame_at(self._head_at, HEAD, "", 0, 0, 0, "header")
        if frame.raw_len > _HEAD_LIMIT:
            raise PackedCorrupt(self.path, "header", f"the head frame decodes to {frame.raw_len:,} bytes, past "
                                                     "safetensors' limit on a header")
        return self._decode(frame, "header", None, None)

    def key_bytes(self, name: str) -> bytes:
        """The whole data of a "bytes" key, as in the safetensors file."""
        k = self.keys[name]
        frame = self._frame_at(k.frames[0], BYTES, name, 0, 0, 0, name)
        if frame.raw_len != k.data_offsets[1] - k.data_offsets[0]:
            raise PackedCorrupt(self.path, name, f"its frame decodes to {frame.raw_len:,} bytes, not the "
                                                 f"{k.data_offsets[1] - k.data_offsets[0]:,} of its data")
        return self._decode(frame, name, None, None)

    def chunk_bounds(self, name: str) -> list[tuple[int, int]]:
        k = self.keys[name]
        return _chunks(k.shape[2], self.rows_per_chunk, k.codec)

    def chunk_words(self, name: str, run: int, step: int, chunk: int) -> np.ndarray:
        """Rows of chunk `chunk` of `name[run, step]` as (n,) uint16, decoded along the step's chain from its key
        frame. The decoded chain of the last step read of each chunk is kept (for the last few keys and runs
        read), so a walk over the steps, or reads near each other, decode one new frame per step."""
        k = self.keys[name]
        xor = k.codec == "xor-planes"
        steps = chain(step, self.key_every, self.version) if xor else [step]
        a, b = self.chunk_bounds(name)[chunk]
        n_bytes = (b - a) * k.shape[3] * 2
        held = self._chains.pop((name, run), {})
        self._chains[name, run] = held  # the most recently read last
        while len(self._chains) > _CHAIN_GROUPS:
            del self._chains[next(iter(self._chains))]
        known = held.get(chunk, {})
        # Go on from the last step of the chain already decoded (what a kept chain holds decodes the same).
        start = next((i for i in range(len(steps) - 1, -1, -1) if steps[i] in known), -1)
        decoded = {s: known[s] for s in steps[: start + 1] if s in known}
        value = known[steps[start]] if start >= 0 else None
        for s in steps[start + 1 :]:
            delta = s != steps[0]
            at = k.frames[(run * k.shape[1] + s) * len(self.chunk_bounds(name)) + chunk]
            frame = self._frame_at(at, DELTA if delta else KEY, name, run, s, chunk, name)
            if frame.raw_len != n_bytes:  # before decoding it: a small frame can claim a large output
                raise PackedCorrupt(self.path, name, f"chunk {chunk} holds {frame.raw_len // 2:,} values, not "
                                                     f"{n_bytes // 2:,}", run, s)
            planes = np.frombuffer(self._decode(frame, name, run, s), dtype=np.uint8)
            value = planes if value is None else np.bitwise_xor(planes, value)  # XOR commutes with the planes
            decoded[s] = value
        held[chunk] = decoded if self.version >= 2 else {step: value}  # version 1: the step before is enough
        return from_planes(value)

    def slice_words(self, name: str, run: int, step: int) -> np.ndarray:
        """`name[run, step]` as (V * H,) uint16."""
        return np.concatenate([self.chunk_words(name, run, step, c) for c in range(len(self.chunk_bounds(name)))])

    def forget(self) -> None:
        """Drop the decoded frames kept for the next read."""
        self._chains.clear()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scan(f: BinaryIO, size: int) -> Iterator[tuple[int, tuple | None]]:
    """(offset, record fields) of every frame from the first on, by their lengths; None where a record is not whole
    (the file ends inside it) or is not a frame record."""
    at = _FIXED.size
    while at < size:
        raw = os.pread(f.fileno(), _FRAME.size, at)
        if len(raw) < _FRAME.size or raw[:4] != _TAG:
            yield at, None
            return
        rec = _FRAME.unpack(raw)
        end = at + _FRAME.size + rec[3] + rec[8]
        if end > size:
            yield at, None
            return
        yield at, rec
        at = end


def unpack(src: Path, out: Path, check_digests: bool = True) -> str:
    """Write the safetensors file that `src` packs to `out` (a temporary name, renamed into place); returns its
    sha256. Every decoded (V, H) slice must hash to the digest the run recorded of it (digest_<name>), and the
    file must have the size the index records: a packed file never unpacks to other numbers. (`check` unpacks with
    check_digests=False, then checks the copy as a safetensors file, so that a slice that was already wrong in the
    file that was packed gets the safetensors check's own verdict.)"""
    src, out = Path(src), Path(out)
    with PackedFile(src) as pf:
        tmp = temp_path_for(out)
        try:
            with open(tmp, "r+b") as f:
                sha, size = write_safetensors(pf, f, check_digests)
            pf.check_listed()
            if size != pf.source_size:
                raise PackedCorrupt(src, "file", f"unpacks to {size:,} bytes, not the {pf.source_size:,} of the "
                                                 "safetensors file it holds")
            commit_file(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return sha


@contextlib.contextmanager
def unpacked_copy(src: Path) -> Iterator[Path]:
    """The safetensors file that `src` packs, unpacked into a temporary folder (TMPDIR) for as long as the block
    runs, for the checks that read a safetensors file byte by byte (`check`, `verify`)."""
    with tempfile.TemporaryDirectory(prefix="flannel-unpacked-") as folder:
        yield kept_copy(src, Path(folder))


def kept_copy(src: Path, folder: Path) -> Path:
    """`src` unpacked into `folder` (which the caller removes); a full disk is one line naming TMPDIR."""
    out = folder / f"{Path(src).stem}.safetensors"
    try:
        unpack(src, out, check_digests=False)
    except OSError as e:
        raise FlannelError(f"{src}: cannot unpack it into {folder} to check it ({e.strerror}); set TMPDIR to a "
                           "folder with room for the safetensors form") from None
    return out


def write_safetensors(pf: PackedFile, f: BinaryIO, check_digests: bool = True) -> tuple[str, int]:
    """Decode every frame of `pf` into `f`, in the safetensors file's byte order, checking each (V, H) slice against
    its recorded digest; returns the sha256 and the size written."""
    whole = hashlib.sha256()
    head = pf.head()
    f.write(head)
    whole.update(head)
    size, pos = len(head), 0
    for k in sorted(pf.keys.values(), key=lambda k: k.data_offsets[0]):
        if k.data_offsets[0] != pos:
            raise PackedCorrupt(pf.path, k.name, f"the index puts it at byte {k.data_offsets[0]} of the data, not "
                                                 f"{pos}")
        if math.prod(k.shape) * ITEMSIZE.get(k.dtype, 0) != k.data_offsets[1] - k.data_offsets[0]:
            raise PackedCorrupt(pf.path, k.name, "its data offsets do not match its dtype and shape")
        if k.codec == "bytes":
            data = pf.key_bytes(k.name)
            f.write(data)
            whole.update(data)
            size += len(data)
        else:
            runs, steps1 = k.shape[:2]
            digests = _recorded_digests(pf, k) if check_digests else None
            n_chunks = len(pf.chunk_bounds(k.name))
            for run in range(runs):
                for step in range(steps1):
                    data = b"".join(pf.chunk_words(k.name, run, step, c).tobytes() for c in range(n_chunks))
                    if digests is not None and hashlib.sha256(data).digest() != digests[run][step]:
                        raise PackedCorrupt(pf.path, k.name, "decodes to numbers whose sha256 is not the digest the "
                                                             f"run recorded (digest_{k.name})", run, step)
                    f.write(data)
                    whole.update(data)
                    size += len(data)
        pos = k.data_offsets[1]
    return whole.hexdigest(), size


def _recorded_digests(pf: PackedFile, k: KeyInfo) -> list[list[bytes]]:
    """digest_<name> of a per-step key, [run][step] -> its 32 bytes."""
    name = f"{content.DIGEST_PREFIX}{k.name}"
    if name not in pf.keys:
        raise PackedCorrupt(pf.path, k.name, f"has no {name} to check its slices against")
    raw = pf.key_bytes(name)
    runs, steps1 = k.shape[:2]
    if len(raw) != runs * steps1 * 32:
        raise PackedCorrupt(pf.path, name, f"holds {len(raw)} bytes, not {runs * steps1 * 32}")
    return [[raw[(r * steps1 + t) * 32:(r * steps1 + t + 1) * 32] for t in range(steps1)] for r in range(runs)]
