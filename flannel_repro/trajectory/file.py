"""The trajectory file: a safetensors file written step by step, read lazily.

`TrajectoryWriter` lays out the whole file up front (header with every key, shape and offset, then a data region
of known size) in a temporary file beside the output, reserves every byte (posix_fallocate: a full disk is an error
at the start, not half way), and writes each step's slices at their precomputed offsets, so the trajectory never
sits in RAM. (Slices go in with pwrite: storing them through a shared memory mapping measured 5.0 ms per step
against 0.34 ms, as ext4 handles a write fault per 4 KB page of a reserved file.) Only `commit()` renames the
finished file into place, after filling in the header's content record and digest (content.py) and its header
digest, which it reserves at the start; a killed run leaves no file at the output path, and its temporary file
(named with its pid) is either removed by the next run of that output or, with checkpoints on, reopened by `train
--resume` (`resume_from=`). The result loads with `safetensors.torch.load_file` like the notebook's own file.

`load_trajectory(path)` opens a file lazily: reading W at one step maps just that slice, and a token's path across
all steps reads one H-wide row per step (strided reads of the mapped file), never the whole tensor.

    traj = load_trajectory("tensors/Flannel/1.20h_flannel_7.safetensors")
    traj.step("W", 250)          # (V, H) bf16, read from the mapped file
    traj.token_rows("W", 7)      # (steps+1, H) bf16: token 7's row at t = 0..steps
    traj.step_block("W", 10, 20) # (10, V, H) bf16: steps 10..19
    traj.params.train.train_seed # 42

With a record.steps schedule the per-step (V, H) tensors hold the recorded steps only: `traj.recorded_steps` says
which training step each index is, `step` and `step_block` take training steps (a step not recorded is an error
naming its recorded neighbours), and `token_rows` gives one row per recorded step. The loss, gradient norm, rate and
batch are kept for every step, so `traj.step("losses_f32", t)` works at any t.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import math
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import commit_file, temp_path_for, write_failure
from flannel_repro.core.safetensors_header import dtype_name, header_bytes, read_checked_header
from flannel_repro.trajectory import content
from flannel_repro.trajectory.header_fields import HeaderFields
from flannel_repro.trajectory.layout import FORMAT, Spec, header_digest
from flannel_repro.trajectory.packed import is_packed
from flannel_repro.trajectory.packed_reader import PackedTrajectory
from flannel_repro.trajectory.provenance import PROVENANCE, check_provenance, checked_metadata  # noqa: F401

TORCH_DTYPES = {"I64": torch.int64, "F32": torch.float32, "BF16": torch.bfloat16, "BOOL": torch.bool, "U8": torch.uint8}
# numpy has no bfloat16: a bf16 tensor is mapped as its raw 16-bit words, then viewed as bf16 by torch
_NUMPY_DTYPES = {"I64": np.int64, "F32": np.float32, "BF16": np.uint16, "BOOL": np.bool_, "U8": np.uint8}
# Up to this many tokens, a path is read row by row (a random 4 KB page read each); past it, reading each step's
# slice whole and in order is as fast from disk (measured at 10 tokens: 1.3 s row by row, 1.0 s whole; bench/).
_SCATTERED_TOKENS = 8


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def flat_index(shape: Sequence[int], index: tuple[int, ...]) -> int:
    """Position of `tensor[index]` in row-major order, counted in units of what `index` selects (leading indices:
    an element, or a row)."""
    flat = 0
    for i, n in zip(index, shape, strict=False):  # `index` covers the leading dimensions only
        flat = flat * n + i
    return flat


def digest(t: torch.Tensor) -> bytes:
    return hashlib.sha256(as_bytes(t)).digest()


class TrajectoryWriter:
    """Streams tensors into a safetensors file at a temporary path; `commit()` moves it to `out_path`."""

    def __init__(
        self,
        out_path: Path,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str],
        resume_from: Path | None = None,
    ) -> None:
        """A new temporary file, or with `resume_from` the partial file of an interrupted run, whose header must
        be byte-identical to the one these specs and metadata give (same params, versions, device and layout)."""
        self.out_path = Path(out_path)
        self.specs = dict(specs)
        self.layout = {name: Spec(dtype_name(s.dtype), tuple(s.shape)) for name, s in specs.items()}
        # The content record and the digests are known only at the end: reserved now at their final length (hex
        # digits in place of '-'), filled in by seal(), so no offset moves.
        pending = content.render(content.entries({k: (s.dtype, s.shape) for k, s in self.layout.items()}, None))
        reserved = {"content": pending, "content_digest": content.PENDING, "header_digest": content.PENDING}
        head, self.offsets = header_bytes(specs, {**metadata, **reserved})
        self._head = head
        self._reserved = {key: _find_value(head, key, value) for key, value in reserved.items()}
        self.data_start = len(head)
        self.size = self.data_start + sum(spec.nbytes for spec in specs.values())
        self.content_digest: str | None = None  # set by seal()
        if resume_from is None:
            self.tmp_path = temp_path_for(self.out_path, owner_key="paths.trajectory")
            self._file = open(self.tmp_path, "r+b")
        else:
            self.tmp_path = Path(resume_from)
            try:
                self._file = open(self.tmp_path, "r+b")
            except FileNotFoundError:
                raise FlannelError(
                    f"{self.tmp_path}: the partial trajectory of the interrupted run is gone; run `flannel-repro "
                    "train` without --resume to start over"
                ) from None
        try:
            if resume_from is None:
                self._allocate()
                os.pwrite(self._file.fileno(), head, 0)  # like every write here: unbuffered, at its offset
            else:
                actual = os.fstat(self._file.fileno()).st_size
                if actual != self.size or self._unfilled(os.pread(self._file.fileno(), len(head), 0)) != head:
                    raise FlannelError(
                        f"{self.tmp_path}: the partial trajectory does not match this run's params, versions or "
                        "device (header or size differs); run `flannel-repro train` without --resume to start over"
                    )
        except BaseException:
            if resume_from is None:
                self.abort()
            else:  # a refused resume keeps the interrupted run's file
                self._file.close()
            raise

    def _allocate(self) -> None:
        """Reserve every byte now: a full disk is an error before training, not half way through it."""
        try:
            os.posix_fallocate(self._file.fileno(), 0, self.size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate on this filesystem: sparse it is
                self._file.truncate(self.size)
                return
            folder = self.out_path.parent
            why, fix = write_failure(e, folder)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                fix += " or set paths.trajectory to a folder with room"
            raise FlannelError(
                f"{folder}: cannot reserve {self.size:,} bytes for the trajectory ({why}); {fix}"
            ) from None

    def write(self, name: str, index: tuple[int, ...], value: torch.Tensor) -> None:
        """Write `value` at `tensor[index]` (leading indices); `value` must have the trailing shape."""
        spec = self.specs[name]
        trailing, start, n_bytes = self._span(name, index)
        if tuple(value.shape) != trailing or value.dtype != spec.dtype:
            raise ValueError(f"{name}{list(index)}: expected {spec.dtype} {trailing}, got {value.dtype} {value.shape}")
        data = as_bytes(value)
        while data:  # pwrite of a regular file writes everything or raises; loop in case it ever does not
            written = os.pwrite(self._file.fileno(), data, start)
            data, start = data[written:], start + written

    def _span(self, name: str, index: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        """(trailing shape, file offset, byte length) of `tensor[index]`."""
        spec = self.specs[name]
        trailing = spec.shape[len(index) :]
        n_bytes = math.prod(trailing) * spec.dtype.itemsize
        return trailing, self.data_start + self.offsets[name] + flat_index(spec.shape, index) * n_bytes, n_bytes

    def read(self, name: str, index: tuple[int, ...]) -> torch.Tensor:
        """`tensor[index]` as written so far (a copy), e.g. to replay the steps before a resume point."""
        trailing, start, n_bytes = self._span(name, index)
        raw = bytearray(os.pread(self._file.fileno(), n_bytes, start))
        return torch.frombuffer(raw, dtype=self.specs[name].dtype).reshape(trailing)

    def flush(self) -> None:
        """Make every step written so far durable."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close, keeping the temporary file (the partial trajectory a resume continues)."""
        self.flush()
        self._file.close()

    def commit(self) -> Path:
        """Seal the header, then move the file into place."""
        self.seal()
        self._file.close()
        commit_file(self.tmp_path, self.out_path)  # fsync, then rename into place
        return self.out_path

    def seal(self) -> None:
        """Fill in the content record and digest from what was written, and the header digest over the header so
        completed. (A run killed between this and the rename still resumes: see `_unfilled`.)"""
        layout = {k: (s.dtype, s.shape) for k, s in self.layout.items()}
        text = content.render(content.entries(layout, self._read_all))
        self.content_digest = content.content_digest(text)
        head = bytearray(self._head)
        for key, value in (("content", text), ("content_digest", self.content_digest)):
            self._fill(head, key, value)
        self._fill(head, "header_digest", header_digest(bytes(head))[1])
        os.pwrite(self._file.fileno(), bytes(head), 0)

    def _fill(self, head: bytearray, key: str, value: str) -> None:
        start, encoded = self._reserved[key]
        new = json.dumps(value).encode("utf-8")
        assert len(new) == len(encoded), key  # same characters, hex digits instead of '-'
        head[start : start + len(new)] = new

    def _read_all(self, name: str) -> bytes:
        return os.pread(self._file.fileno(), self.layout[name].nbytes, self.data_start + self.offsets[name])

    def _unfilled(self, head: bytes) -> bytes:
        """`head` with the reserved values back at their placeholders (a run killed inside commit() filled them)."""
        out = bytearray(head)
        for start, encoded in self._reserved.values():
            out[start : start + len(encoded)] = encoded
        return bytes(out)

    def abort(self) -> None:
        """Close and delete the temporary file; the output path is untouched."""
        f = getattr(self, "_file", None)
        if f is not None and not f.closed:
            f.close()
        self.tmp_path.unlink(missing_ok=True)


def _find_value(head: bytes, key: str, value: str) -> tuple[int, bytes]:
    """(offset, JSON encoding) of metadata `key`'s string value in the header bytes."""
    encoded = json.dumps(value).encode("utf-8")
    pair = json.dumps(key).encode("utf-8") + b":" + encoded
    at = head.find(pair)
    assert at >= 0 and head.count(pair) == 1, key
    return at + len(pair) - len(encoded), encoded


class Trajectory(HeaderFields):
    """Lazy, memory-mapped view of a trajectory file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        raw = read_checked_header(self.path)
        header = raw.header
        self.metadata: dict[str, str] = checked_metadata(header.get("__metadata__") or {}, FORMAT, self.path)
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._data_start = raw.data_start
        self._f = safe_open(str(self.path), framework="pt")
        self._maps: dict[tuple[str, bool], np.memmap] = {}  # (name, scattered) -> its map

    def __repr__(self) -> str:
        """`Trajectory('tensors/Flannel/1.20h_flannel_7.safetensors', 1 run x 500 steps, W (1, 501, 10000, 64) BF16,
        ..., content 3f2a9c1b04de)`: the path, the shape of the run and each per-step tensor, the content digest."""
        per_step = [k for k in self.keys() if len(self.shapes[k]) == 4]  # (runs, steps+1, V, H) each
        what = [f"{k} {self.shapes[k]} {self._entries[k]['dtype']}" for k in per_step]
        if per_step:
            runs, steps = self.shapes[per_step[0]][:2]
            what.insert(0, f"{runs} run{'s' if runs != 1 else ''} x {steps - 1} steps")
        digest = (self.metadata.get("content_digest") or "none")[:12]
        closed = ", closed" if self._f is None else ""
        return f"Trajectory({str(self.path)!r}, {', '.join(what)}, content {digest}{closed})"

    def __enter__(self) -> Trajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f = None
        self._maps.clear()  # the last reference to each np.memmap: unmaps it

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole tensor (loads it)."""
        return self._f.get_tensor(name)

    def step(self, name: str, t: int, run: int = 0) -> torch.Tensor:
        """`name` at training step `t` of `run`, reading only that slice from the mapped file."""
        if len(self.shapes.get(name, ())) == 4:  # a (R, N, V, H) tensor holds the recorded steps only
            t = self.index_of(t)
        return self._f.get_slice(name)[run, t]

    def token_rows(
        self, name: str, tokens: int | Sequence[int], run: int = 0, steps: slice = slice(None)
    ) -> torch.Tensor:
        """The rows of `tokens` in the per-step tensor `name` (W, grad_W, ...) at the recorded steps within `steps`
        (a slice of training steps; its stride counts recorded steps): (n, H) for one token, (n, k, H) for a list of
        k, row i at training step `traj.recorded_steps[steps][i]`. Reads only those rows (strided reads of the mapped
        file), so a token's whole path over 500 steps costs 500 pages from disk, not the 640 MB of the tensor."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        few = isinstance(tokens, int) or len(tokens) <= _SCATTERED_TOKENS
        rows = self._per_step(name, scattered=few)
        path = rows[self._check_run(name, run)][self._indices(steps)][:, tokens]  # still a view of the map
        return self._as_torch(name, np.array(path))  # the copy is the read

    def step_block(self, name: str, start: int, stop: int, run: int = 0) -> torch.Tensor:
        """`name` at the recorded training steps start <= t < stop, (n, V, H), in one contiguous read (every step
        from start to stop - 1 by default; with record.steps, those of `traj.recorded_steps` in that range)."""
        block = self._per_step(name)[self._check_run(name, run), self._indices(slice(start, stop))]
        return self._as_torch(name, np.array(block))  # the copy is the read

    def _per_step(self, name: str, scattered: bool = False) -> np.memmap:
        """The (R, S+1, V, H) tensor `name` as a read-only memory map of the file (no bytes read yet). A `scattered`
        map reads no pages ahead: one row per step sits in its own 1.28 MB slice, and the kernel's read-around of a
        normal map would read all of it from disk."""
        if (name, scattered) not in self._maps:
            entry = self._entries.get(name)
            if entry is None or len(entry["shape"]) != 4:
                per_step = sorted(k for k, v in self._entries.items() if len(v["shape"]) == 4)
                raise FlannelError(f"{self.path}: {name!r} is not a per-step tensor of this trajectory; it has "
                                   f"{', '.join(per_step) or 'none'}")
            mapped = np.memmap(self.path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="r",
                               offset=self._data_start + entry["data_offsets"][0], shape=tuple(entry["shape"]))
            if scattered:
                mapped._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[name, scattered] = mapped
        return self._maps[name, scattered]

    def _indices(self, steps: slice) -> slice:
        """The slice of recorded indices whose training steps fall in the slice of training steps `steps` (a
        negative bound counts recorded steps from the end, as in any Python slice)."""
        def at(bound: int | None) -> int | None:
            return bound if bound is None or bound < 0 else bisect.bisect_left(self.recorded_steps, bound)
        return slice(at(steps.start), at(steps.stop), steps.step)

    def _check_run(self, name: str, run: int) -> int:
        runs = self.shapes[name][0]
        if not 0 <= run < runs:
            raise IndexError(f"run {run} is out of range: {self.path} holds {runs} run(s)")
        return run

    def _as_torch(self, name: str, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if self._entries[name]["dtype"] == "BF16" else t


def load_trajectory(path: str | os.PathLike) -> Trajectory | PackedTrajectory:
    """Open a trajectory for reading, lazily, in either form: a safetensors file written by `flannel-repro train` or
    a packed one (packed_reader.py, told by its magic bytes), with the same reading API. The header is read and
    checked (its format, provenance and layout); the tensors stay in the file until asked for. Use it as a context
    manager, which closes the file at the end:

        with load_trajectory("tensors/Flannel/1.20h_flannel_7.safetensors") as traj:
            traj.step("W", 250)              # (V, H) bf16, W after step 250 of run 0
            traj.token_rows("W", 42)         # (recorded steps, H): token 42's path, without reading the rest
            traj["losses_f32"]               # (runs, steps+1) float32, NaN at t = 0
            traj.params.train.learning_rate  # the params the run recorded

    A file that is not a flannel-repro trajectory, or whose header is corrupt, raises FlannelError naming the file.
    `flannel-repro check` verifies its data too."""
    if is_packed(Path(path)):
        return PackedTrajectory(Path(path))
    return Trajectory(Path(path))


MANIFEST_FORMAT = "flannel-digests/1"


def manifest(traj: Trajectory) -> dict[str, Any]:
    """The per-step digests, losses and provenance of a trajectory as plain JSON: enough for `verify` to audit a
    rerun without the file itself (tracking logs it as the run's `digests.json` artifact)."""
    digests = {
        k[len("digest_"):]: [[bytes(row.tolist()).hex() for row in run] for run in traj[k]]
        for k in traj.keys()
        if k.startswith("digest_")
    }
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "params": json.loads(traj.metadata["params"]),
        "fingerprint": traj.meta_json("fingerprint"),
        "versions": traj.meta_json("versions"),
        "inputs": traj.meta_json("inputs"),
        "digests": digests,  # {tensor: [run][step] -> sha256 hex of that (V, H) slice}
        "content": traj.metadata.get("content"),  # the content record: every key's hash (content.py)
        "content_digest": traj.metadata.get("content_digest"),
    }
    if "losses_f32" in traj:
        doc["losses_f32"] = [[float(x) for x in run] for run in traj["losses_f32"]]  # NaN at t = 0
    return doc
