"""The trajectory writer of `record.format: packed`: the packed file (packed.py) written while training runs.

`PackedWriter` is a `TrajectoryWriter` (file.py) whose per-step tensors (W, grad_W, ...) never reach a safetensors
file: each step's slices are compressed into frames on the recording ring's writer thread and appended to a frames
file beside the output, in the order `pack` writes them, so the finished file is byte for byte what `flannel-repro
pack` makes of the safetensors file of the same run. Everything else (the header with its reserved content record,
the scalars, losses, batches and per-step digests) goes where `TrajectoryWriter` puts it, into a sparse temporary
file of the safetensors layout that holds only those few bytes: the checks of a resume (header, digests) read it
as they read a safetensors partial file. `commit()` seals that header, appends the head, the other keys and the
index to the frames, and renames the frames file into place; the output path holds nothing until then.

A resume (`resume_from=` the sparse file, `resume_at=` the last step the checkpoint holds) keeps the frames up to
that step, each checked against its digest, and truncates the rest; the next delta frames are made against the steps
the kept frames decode to, so an interrupted and resumed run ends with the same bytes as an uninterrupted one.
Memory stays flat in steps: the writer holds one step's slices and, per delta-coded key, the few steps later delta
frames refer to (at most 1 + log2(key_every)).

    writer = PackedWriter(Path("run.flpack"), specs, metadata)
    writer.write("W", (0, t), w_t)          # compressed and appended once every per-step key of (0, t) is in
    writer.commit()                          # -> run.flpack
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import TMP_PREFIX, commit_file
from flannel_repro.trajectory import packed
from flannel_repro.trajectory.file import TensorSpec, TrajectoryWriter, as_bytes

FRAMES = "frames."  # the frames file is the sparse file's name with this after the output's name


def frames_companion(out_path: Path, temp: Path) -> Path:
    """The frames file that goes with the sparse temporary file `temp` of `out_path`: `.flannel-tmp-<name>.<pid>.
    <random>` -> `.flannel-tmp-<name>.frames.<pid>.<random>` (the same owner pid, so the same cleanup applies)."""
    prefix = f"{TMP_PREFIX}{Path(out_path).name}."
    name = temp.name
    return temp.with_name(prefix + FRAMES + name[len(prefix):]) if name.startswith(prefix) else temp.with_name(
        f"{name}.{FRAMES}".rstrip("."))


class PackedWriter(TrajectoryWriter):
    """Streams a run into a packed file; the API of `TrajectoryWriter`."""

    def __init__(
        self,
        out_path: Path,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str],
        resume_from: Path | None = None,
        resume_at: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(out_path, specs, metadata, resume_from)
        self.frames_path = frames_companion(self.out_path, self.tmp_path)
        entries = {name: {"dtype": spec.dtype, "shape": list(spec.shape),
                          "data_offsets": [self.offsets[name], self.offsets[name] + self.specs[name].nbytes]}
                   for name, spec in self.layout.items()}
        try:
            if resume_from is None:
                self._frames = open(self.frames_path, "x+b")
            else:
                try:
                    self._frames = open(self.frames_path, "r+b")
                except FileNotFoundError:
                    if packed.is_packed(self.out_path):  # killed between the rename and the end of the commit
                        raise FlannelError(
                            f"{self.out_path}: the interrupted run had already put its complete trajectory here and "
                            "was stopped before its metrics were written; `flannel-repro check` confirms the file, "
                            "and `flannel-repro train` without --resume writes them (training again)") from None
                    raise FlannelError(f"{self.frames_path}: the packed frames of the interrupted run are gone; run "
                                       "`flannel-repro train` without --resume to start over") from None
            self.stream = packed.FrameStream(self._frames, entries)
            if resume_from is not None:
                self._rewind(resume_at)
        except BaseException:
            self._file.close()
            if resume_from is None:
                self.abort()
            raise
        self.per_step = set(self.stream.per_step)
        self._pending: dict[str, np.ndarray] = {}
        self._at: tuple[int, int] | None = None  # the (run, step) of the slices in _pending

    def _allocate(self) -> None:
        """Sparse: only the header and the small keys are ever written to this file."""
        self._file.truncate(self.size)

    # -- writing ------------------------------------------------------------------------------------------------
    def write(self, name: str, index: tuple[int, ...], value: torch.Tensor) -> None:
        if name not in self.per_step:
            return super().write(name, index, value)
        trailing = self.specs[name].shape[2:]
        if len(index) != 2 or tuple(value.shape) != trailing or value.dtype != torch.bfloat16:
            raise ValueError(f"{name}{list(index)}: expected a bf16 {trailing} slice at (run, step)")
        if self._at is not None and self._at != index:
            raise ValueError(f"{name}{list(index)}: step {self._at} is not complete ({sorted(self._pending)} of "
                             f"{sorted(self.per_step)})")
        self._at = tuple(index)
        words = np.frombuffer(as_bytes(value), dtype="<u2").reshape(trailing)
        self._pending[name] = words.copy()  # the ring reuses the slot's buffer once the sinks have run
        if len(self._pending) == len(self.per_step):
            with _naming(self.frames_path):
                self.stream.add_step(*self._at, self._pending)
            self._pending, self._at = {}, None

    def read(self, name: str, index: tuple[int, ...]) -> torch.Tensor:
        """`tensor[index]` as written so far (a copy); a per-step slice is decoded from its frames and must match its
        recorded digest (the steps a resume replays to the sinks)."""
        if name not in self.per_step:
            return super().read(name, index)
        if len(index) != 2:
            raise ValueError(f"{name}{list(index)}: a per-step slice is read at (run, step)")
        self._frames.flush()
        words = self._view().slice_at(name, *index)
        if hashlib.sha256(words.tobytes()).digest() != bytes(super().read(f"digest_{name}", index).tolist()):
            raise FlannelError(f"{self.frames_path}: {name} at run {index[0] + 1}, step {index[1]} decodes to numbers "
                               f"whose sha256 is not the digest the run recorded; run `flannel-repro train` without "
                               "--resume to start over")
        return torch.from_numpy(words.copy()).view(torch.bfloat16)

    def _view(self) -> _FramesView:
        if getattr(self, "_frames_view", None) is None:
            self._frames_view = _FramesView(self.frames_path, self._frames, self.stream)
        self._frames_view.size = os.fstat(self._frames.fileno()).st_size
        return self._frames_view

    def flush(self) -> None:
        """Make every step written so far durable (the frames and the sparse file)."""
        with _naming(self.frames_path):
            self._frames.flush()
            os.fsync(self._frames.fileno())
        super().flush()

    def close(self) -> None:
        """Flush and close, keeping both temporary files (the partial trajectory a resume continues). Everything is
        closed even when the flush fails (a full disk): a resume keeps only the frames its checkpoint holds, whole
        and checked, and drops what follows."""
        try:
            self.flush()
        finally:
            self.stream.close()
            with contextlib.suppress(OSError):  # the buffered bytes a full disk refused
                self._frames.close()
            self._file.close()

    def commit(self) -> Path:
        """Seal the header, finish the packed file (head, other keys, index) and move it into place."""
        if self._pending:
            raise ValueError(f"step {self._at} is not complete: {sorted(self._pending)} of {sorted(self.per_step)}")
        self.seal()
        fd = self._file.fileno()
        head = os.pread(fd, self.data_start, 0)
        data = {name: self._read_all(name) for name in self.layout if name not in self.per_step}
        with _naming(self.frames_path):
            self.stream.finish(head, data, self.size)
        self.stream.close()
        self._frames.close()
        self._file.close()
        commit_file(self.frames_path, self.out_path)  # fsync, then rename into place
        self.tmp_path.unlink(missing_ok=True)
        return self.out_path

    def abort(self) -> None:
        """Close and delete both temporary files; the output path is untouched."""
        frames = getattr(self, "_frames", None)
        if frames is not None and not frames.closed:
            with contextlib.suppress(OSError):  # the buffered bytes a full disk refused; the file goes anyway
                frames.close()
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
        super().abort()
        frames_path = getattr(self, "frames_path", None)
        if frames_path is not None:
            frames_path.unlink(missing_ok=True)

    # -- resuming -----------------------------------------------------------------------------------------------
    def _rewind(self, resume_at: tuple[int, int] | None) -> None:
        """Keep the frames of every (run, step) up to `resume_at` (None: none), checked; drop the rest."""
        s = self.stream
        order = [(n, c) for n in s.per_step for c in range(len(s.bounds[n]))]
        steps1 = self.specs[s.per_step[0]].shape[1] if s.per_step else 0
        view = _FramesView(self.frames_path, self._frames, s)
        frames = packed.scan(self._frames, os.fstat(self._frames.fileno()).st_size)
        end = packed._FIXED.size
        if resume_at is not None:
            last_run, last_step = resume_at
            for run in range(last_run + 1):
                for step in range(steps1 if run < last_run else last_step + 1):
                    for name, chunk in order:
                        at, rec = next(frames, (None, None))
                        delta = s.codecs[name] == "xor-planes" and packed.reference(step, s.key_every,
                                                                                     s.version) is not None
                        kind = packed.DELTA if delta else packed.KEY
                        if rec is None:
                            raise FlannelError(f"{self.frames_path}: the packed frames of the interrupted run end "
                                               f"before run {run + 1}, step {step}, which its checkpoint holds; run "
                                               "`flannel-repro train` without --resume to start over")
                        view.frame_at(at, kind, name, run, step, chunk)  # in place, whole and intact, or refused
                        s.frames[name].append(at)
                        end = at + packed._FRAME.size + rec[3] + rec[8]
            for name in s.per_step:
                if s.codecs[name] == "xor-planes":
                    kept = packed.referenced(last_step, s.key_every, s.version)
                    s.hold(name, last_step, {t: view.slice_at(name, last_run, t) for t in kept})
        self._frames.truncate(end)
        os.pwrite(self._frames.fileno(), bytes(packed._FIXED.size), 0)  # a run killed in commit() wrote it
        s.w.pos = end
        self._frames.seek(end)


@contextlib.contextmanager
def _naming(path: Path):
    """A write to the frames file that fails (a full disk) names the file, so the message names its folder."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


class _FramesView(packed.PackedFile):
    """The frames written so far, read without an index (there is none until the commit): the frame checks and the
    decoding of `PackedFile`, over the offsets the stream has collected."""

    def __init__(self, path: Path, f, stream: packed.FrameStream) -> None:
        import zstandard

        self.path, self._f = Path(path), f
        self.size = os.fstat(f.fileno()).st_size
        self._dctx = zstandard.ZstdDecompressor()
        self._chains = {}
        self.version, self.key_every, self.rows_per_chunk = stream.version, stream.key_every, stream.rows_per_chunk
        self.keys = {n: packed.KeyInfo(n, e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]), stream.codecs[n],
                                       stream.frames[n]) for n, e in stream.entries.items() if n in stream.per_step}

    def frame_at(self, at: int, kind: int, name: str, run: int, step: int, chunk: int) -> None:
        self._decode(self._frame_at(at, kind, name, run, step, chunk, name), name, run, step)

    def slice_at(self, name: str, run: int, step: int) -> np.ndarray:
        """(V, H) words of `name[run, step]` (a replay walks the steps in order: one new frame per step)."""
        return self.slice_words(name, run, step).reshape(self.keys[name].shape[2:])
