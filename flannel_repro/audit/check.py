"""`flannel-repro check FILE`: is a trajectory still the file its run wrote? An integrity check without a rerun.

It reads every byte once and checks, in this order:
1. the header: a safetensors header (else exit 2), a flannel-repro trajectory of this format (else exit 2), and
   every entry's dtype, shape and offsets exactly as the recorded params lay the file out (layout.py): no missing
   or extra key, no overlap, hole, truncation or trailing bytes;
2. the content record (content.py): complete, hashing to the header's content_digest, one line per key with the
   header's dtype and shape, and every key's bytes (a per-step tensor's: its digests) hashing to its line;
3. the scalars against the header's params (n_runs, seeds, n_steps, sizes, hyperparameters, recorded_*), and
   n_live + n_dead = vocab_size;
4. every per-step (V, H) slice against its digest, step 0 of W against W_initial and of grad_W, momentum and
   variance against zeros.

A key whose bytes no longer match the content record changed after the file was written; with the record intact,
a slice that does not match its digest is a changed slice, a digest that does not match its slice a changed digest.
Exit 0 intact, 1 corrupt (the verdict names the first corrupt key, run and step), 2 unreadable or not a trajectory.
No torch: slices are read with pread (a memory map would kill the process with SIGBUS if the file were truncated
while it is read) and hashed by two threads (both release the GIL). A file that changes while it is read (shorter
than its header says, or written to meanwhile) is one error line, exit 2: no verdict on bytes that moved.

    report = check(Path("tensors/Flannel/1.20h_flannel_7.safetensors"))
    report.exit_code, report.lines()
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flannel_repro.core.config import Params, params_from_json, short_repr
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.safetensors_header import RawHeader, header_bytes, layout_problems, read_raw_header
from flannel_repro.trajectory import content
from flannel_repro.trajectory.layout import (
    DIGEST_BYTES,
    FORMAT,
    SCALARS,
    SCHEDULE_KEY,
    STEP_TENSORS,
    decode_scalar,
    encode_scalar,
    header_digest,
    scalar_values,
    trajectory_layout,
)
from flannel_repro.trajectory.packed import PackedCorrupt, is_packed, unpacked_copy

CHUNK_SLICES = 16  # slices per hashing task: long sequential reads, and enough tasks to keep two threads busy


@dataclass(frozen=True)
class Problem:
    """One way the file is not what its run wrote: the key, and where applicable the run and step."""

    key: str
    what: str
    run: int | None = None
    step: int | None = None

    def line(self) -> str:
        where = f" at run {self.run}, step {self.step}" if self.step is not None else ""
        return f"{self.key or 'file'}{where}: {self.what}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "run": self.run, "step": self.step, "problem": self.what}


class Inspection:
    """A trajectory file opened for checking: its header read and checked, the data read through `view`.

    `problems` holds what the header and the step-less keys show; the per-step slices are left to the caller
    (`check` hashes them all, `verify` one step at a time as its rerun reaches it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.raw: RawHeader = read_raw_header(self.path)
        self.metadata = self.raw.metadata
        bad_format = self._classify()  # FlannelError (exit 2) unless this is a trajectory of this format
        self.problems: list[Problem] = []
        if bad_format is not None:
            self.problems.append(Problem("format", f"the header's format tag is {bad_format!r}, not {FORMAT!r}: the "
                                                   "header was changed after the file was written"))
        self.params: Params | None = self._params()
        self._positions: dict[int, int] | None = None  # training step -> index, once asked
        self.usable = False  # the layout can be trusted: every key where the params put it
        self.record: dict[str, content.Entry] | None = None
        self.record_changed = False  # the record itself does not hash to content_digest
        self.changed: set[str] = set()  # keys whose bytes no longer hash to their record line
        self.view: FileBytes | None = None
        if self.params is not None:
            self._check_layout()
        if self.usable:
            self.view = FileBytes(self.path, self.raw.size)
            self._check_record()
            self._check_scalars()
        self._check_header_digest()

    # -- reading ---------------------------------------------------------------------------------------------
    def span(self, key: str) -> tuple[int, int]:
        lo, hi = self.raw.header[key]["data_offsets"]
        return self.raw.data_start + lo, self.raw.data_start + hi

    def data(self, key: str) -> bytes:
        lo, hi = self.span(key)
        return self.view[lo:hi]

    @property
    def schedule(self) -> tuple[int, ...]:
        """The training steps whose (V, H) slices the file holds (record.steps), in file order."""
        return self.params.record.schedule(self.params.train.steps)

    def _index(self, step: int) -> int:
        """The index in the per-step tensors of training step `step` (a recorded one)."""
        if self._positions is None:
            self._positions = {t: i for i, t in enumerate(self.schedule)}
        return self._positions[step]

    def slice_span(self, name: str, run: int, step: int) -> tuple[int, int]:
        """Where the (V, H) slice of training step `step` lies in the file."""
        runs, held, v, h = self.raw.header[name]["shape"]
        n = v * h * 2  # bf16
        lo = self.span(name)[0] + (run * held + self._index(step)) * n
        return lo, lo + n

    def slice_digest(self, name: str, run: int, step: int) -> bytes:
        """sha256 of the file's (V, H) slice `name[run, step]`."""
        lo, hi = self.slice_span(name, run, step)
        return hashlib.sha256(self.view[lo:hi]).digest()

    def stored_digest(self, name: str, run: int, step: int) -> bytes:
        held = self.raw.header[name]["shape"][1]
        lo = self.span(f"digest_{name}")[0] + (run * held + self._index(step)) * DIGEST_BYTES
        return bytes(self.view[lo : lo + DIGEST_BYTES])

    def step_names(self) -> list[str]:
        return [n for n in STEP_TENSORS if n in self.raw.header]

    def confirm_unchanged(self) -> None:
        """FlannelError (exit 2) if the file was written to since it was opened: what was read may mix two files."""
        if self.view is not None:
            self.view.confirm_unchanged()

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None

    def __enter__(self) -> Inspection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the checks ------------------------------------------------------------------------------------------
    def _classify(self) -> Any:
        """None for a trajectory of this format; the damaged format tag of a flannel-repro header."""
        fmt = self.metadata.get("format")
        if fmt == FORMAT:
            return None
        if isinstance(fmt, str) and re.fullmatch(r"flannel-trajectory/\d+", fmt):
            raise FlannelError(
                f"{self.path}: trajectory format {fmt}, but this flannel-repro reads {FORMAT} (the content record "
                "came with /2); re-record it with `flannel-repro train`, or check it with the version that wrote it"
            )
        if "params" not in self.metadata:
            raise FlannelError(f"{self.path}: not a flannel-repro trajectory (metadata format is {fmt!r}); give a "
                               "file written by `flannel-repro train`")
        return fmt  # a flannel-repro header whose format tag itself was damaged: checked as a corrupt trajectory

    def _params(self) -> Params | None:
        text = self.metadata.get("params")
        try:
            if not isinstance(text, str):
                raise FlannelError("not a string")
            return params_from_json(text, "header params")
        except FlannelError as e:
            self.problems.append(Problem("params", f"the header's params cannot be read ({e}): the header was "
                                                   "changed after the file was written"))
            return None

    def _check_layout(self) -> None:
        for key, why in layout_problems(self.raw):
            self.problems.append(Problem(key, why))
        expected = trajectory_layout(self.params)
        actual = self.raw.entries()
        canonical, offsets = header_bytes(expected, self.metadata)
        shape_ok = True
        for name in sorted(set(expected) | set(actual)):
            want, got = expected.get(name), actual.get(name)
            if got is None:
                self.problems.append(Problem(name, "is missing from the header, but the header's params record it"))
            elif want is None:
                self.problems.append(Problem(name, "is in the header, but no trajectory with these params has it"))
            elif not isinstance(got, dict) or got.get("dtype") != want.dtype or got.get("shape") != list(want.shape):
                got_desc = f"{_brief(got.get('dtype'))} {_brief(got.get('shape'))}" if isinstance(got, dict) else \
                    _brief(got)
                self.problems.append(Problem(name, f"is {got_desc} in the header, but the header's params give "
                                                   f"{want.dtype} {list(want.shape)}"))
            elif got.get("data_offsets") != [offsets[name], offsets[name] + want.nbytes]:
                got_offsets = _brief(got.get("data_offsets"))
                self.problems.append(Problem(name, f"has data_offsets {got_offsets}, but flannel-repro "
                                                   f"lays it out at {[offsets[name], offsets[name] + want.nbytes]}"))
            else:
                continue
            shape_ok = False
        if not self.problems and canonical != self.raw.head:
            self.problems.append(Problem("header", "its bytes are not those flannel-repro writes for these keys "
                                             "(reformatted or edited after the file was written)"))
        self.usable = shape_ok and not layout_problems(self.raw)

    def _check_header_digest(self) -> None:
        """Last, so that a more precise problem with the header is named first."""
        recorded, computed = header_digest(self.raw.head)
        if recorded is None:
            self.problems.append(Problem("header", "has no header_digest"))
        elif recorded != computed:
            self.problems.append(Problem("header", "no longer hashes to its header_digest: the header (params, "
                                                   "versions, fingerprint, inputs or tensor entries) was changed "
                                                   "after the file was written"))

    def _check_record(self) -> None:
        text, digest = self.metadata.get("content"), self.metadata.get("content_digest")
        if text is None or digest is None:
            self.problems.append(Problem("content", "the header has no content record or content_digest"))
            self.record_changed = True
            return
        if content.PENDING in str(text) or digest == content.PENDING:
            self.problems.append(Problem("content", "the content record was never filled in: this is the partial "
                                                    "file of a run that did not finish"))
            self.record_changed = True
            return
        try:
            lines = content.parse(text)
        except ValueError as e:
            self.problems.append(Problem("content", f"the header's content record is malformed ({e})"))
            self.record_changed = True
            return
        if content.content_digest(text) != digest:
            self.problems.append(Problem("content_digest", "the header's content record does not hash to its "
                                                           "content_digest: the header was changed after the file was "
                                                           "written"))
            self.record_changed = True
        self.record = {e.name: e for e in lines}
        layout = {k: (v["dtype"], tuple(v["shape"])) for k, v in self.raw.entries().items()}
        want = {e.name: e for e in content.entries(layout, None)}
        if set(want) != set(self.record):
            missing, extra = sorted(set(want) - set(self.record)), sorted(set(self.record) - set(want))
            self.problems.append(Problem("content", f"the content record does not list the file's keys (missing "
                                                    f"{missing}, extra {extra})"))
            self.record_changed = True
            return
        steps = content.step_keyed(layout)
        for name, e in self.record.items():
            if (e.dtype, e.shape, e.kind) != (want[name].dtype, want[name].shape, want[name].kind):
                self.problems.append(Problem(name, f"is {e.dtype} {list(e.shape)} ({e.kind}) in the content record, "
                                                   f"{want[name].dtype} {list(want[name].shape)} in the header"))
                self.record_changed = True
            source = content.source_of(name, steps)
            if hashlib.sha256(self.data(source)).hexdigest() != e.sha256:
                self.changed.add(source)
        for key in sorted(self.changed):
            if key.startswith(content.DIGEST_PREFIX):
                continue  # located slice by slice
            self.problems.append(Problem(key, "no longer matches the content record: changed after the file was "
                                              f"written{self._scalar_note(key)}"))

    def _scalar_note(self, key: str) -> str:
        spec = self.raw.header[key]
        if spec["shape"] != []:
            return ""
        return f" (it is now {decode_scalar(spec['dtype'], bytes(self.data(key)))!r})"

    def _check_scalars(self) -> None:
        if self.record_changed:
            intact = set()  # no way to tell a changed scalar from changed params
        else:
            intact = {k for k in self.raw.entries() if k not in self.changed}
        for key, value in scalar_values(self.params).items():
            dtype = self.raw.header[key]["dtype"]
            if bytes(self.data(key)) == encode_scalar(dtype, value):
                continue
            if key in self.changed:
                continue  # already reported as changed
            now = decode_scalar(dtype, bytes(self.data(key)))
            if key in intact:
                self.problems.append(Problem("params", f"the header's params say {SCALARS[key][1]} = "
                                                       f"{value!r}, but the intact {key} scalar is {now!r}: the header "
                                                       "was changed after the file was written"))
            else:
                self.problems.append(Problem(key, f"is {now!r}, but the header's params say {SCALARS[key][1]} = "
                                                  f"{value!r}"))
        if SCHEDULE_KEY in self.raw.header and SCHEDULE_KEY not in self.changed:
            want = self.params.record.schedule(self.params.train.steps)
            if bytes(self.data(SCHEDULE_KEY)) != struct.pack(f"<{len(want)}q", *want):
                self.problems.append(Problem(SCHEDULE_KEY, "does not hold the steps the header's params schedule "
                                                           f"(record.steps = {self.params.record.steps!r})"))
        live, dead = (decode_scalar("I64", bytes(self.data(k))) for k in ("n_live", "n_dead"))
        if live + dead != self.params.model.vocab_size and not {"n_live", "n_dead"} & self.changed:
            self.problems.append(Problem("n_live", f"n_live {live} + n_dead {dead} is not vocab_size "
                                                   f"{self.params.model.vocab_size}"))


_BRIEF = short_repr(8, 40)


def _brief(value: Any) -> str:
    """A header value for a message, bounded however large the header made it."""
    return _BRIEF.repr(value)[:100]


def inspect(path: Path) -> Inspection:
    """Open `path` and check everything but the per-step slices; FlannelError (exit 2) if it is no trajectory."""
    return Inspection(path)


def slice_problems(insp: Inspection, name: str, run: int, step: int, computed: bytes,
                   slices_intact: bool | None = None) -> list[Problem]:
    """What one slice's hash says. The record tells a changed slice (digests intact) from a changed digest;
    `slices_intact` says whether all of `name`'s slices together still hash to the record (None: not known)."""
    stored = insp.stored_digest(name, run, step)
    if computed == stored:
        return []
    if f"digest_{name}" not in insp.changed and not insp.record_changed:
        return [Problem(name, f"the slice no longer matches its digest (digest_{name} is intact): the file changed "
                              "after it was written", run, step)]
    if slices_intact:
        return [Problem(f"digest_{name}", "the recorded digest was changed after the file was written (the slices "
                                          "still hash to the content record)", run, step)]
    return [Problem(f"digest_{name}", f"the recorded digest no longer matches its slice, and digest_{name} no longer "
                                      "matches the content record: the digest (or both) changed after the file was "
                                      "written", run, step)]


@dataclass
class CheckReport:
    path: Path
    problems: list[Problem]
    content_digest: str | None  # as recorded in the header
    n_slices: int  # per-step slices hashed
    bytes_hashed: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    expected: tuple[str, str] | None = None  # (content digest, where it comes from: --expect or metrics/train.json)

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def as_expected(self) -> bool:
        """Whether the file's content digest is the one it was expected to have (True when none was given)."""
        return self.expected is None or self.expected[0] == self.content_digest

    @property
    def exit_code(self) -> int:
        return 0 if self.intact and self.as_expected else 1

    def lines(self) -> list[str]:
        rate = f", {self.bytes_hashed / self.seconds / 1e9:.2f} GB/s" if self.seconds > 0 and self.bytes_hashed else ""
        out = [f"file: {self.path} ({self.bytes_hashed / 1e6:,.1f} MB checked in {self.seconds:.2f} s{rate}; "
               f"{self.n_slices} per-step slices)"]
        out += [f"note: {n}" for n in self.notes]
        if self.intact:
            if self.expected is None:
                out.append(f"content digest: {self.content_digest} (compare it with the run's: `--expect DIGEST`, "
                           "content_digest in its metrics/train.json or the MLflow tag `digest`)")
            elif self.as_expected:
                out.append(f"content digest: {self.content_digest}, as {self.expected[1]} says")
            else:
                out.append(f"content digest: {self.content_digest}, but {self.expected[1]} says {self.expected[0]}: "
                           "an intact file of another run (or of the same params and other numbers)")
                out.append(f"verdict: intact but not the expected run (exit 1): its numbers are not those "
                           f"{self.expected[1]} describes")
                return out
            out.append("verdict: intact (exit 0): every slice matches its digest, every key its content record, the "
                       "header its data and the scalars the params")
            return out
        out += [f"corrupt: {p.line()}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            out.append(f"corrupt: ... ({len(self.problems) - 20} more)")
        out.append(f"verdict: corrupt (exit 1): {self.problems[0].line()}")
        return out

    def to_json(self) -> dict[str, Any]:
        first = self.problems[0] if self.problems else None
        return {
            "verdict": "intact" if self.intact else "corrupt",
            "exit_code": self.exit_code,
            "file": str(self.path),
            "content_digest": self.content_digest,
            "expected_content_digest": self.expected[0] if self.expected else None,
            "expected_from": self.expected[1] if self.expected else None,
            "as_expected": self.as_expected,
            "first_corrupt_key": first.key if first else None,
            "first_corrupt_run": first.run if first else None,
            "first_corrupt_step": first.step if first else None,
            "problems": [p.to_json() for p in self.problems],
            "slices_checked": self.n_slices,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


class FileChanged(FlannelError):
    """The file was truncated or written to while it was read: no verdict can be given on its bytes."""


class FileBytes:
    """A file's bytes by offset (`fb[lo:hi]`, `fb.read_into(buf, lo)`), read with pread from one open descriptor.
    A read past the end (the file was truncated) and a change of size or modification time since opening are a
    FileChanged error, where a memory map would have killed the process with SIGBUS."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = Path(path), size
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FlannelError(f"{self.path}: trajectory file cannot be read ({e.strerror})") from None
        self._stamp = self._stat()
        if self._stamp[0] != size:
            self.close()
            raise self._changed()

    def _stat(self) -> tuple[int, int, int]:
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _changed(self) -> FileChanged:
        return FileChanged(f"{self.path}: the file changed while it was read (it was {self.size:,} bytes); check it "
                           "again once nothing writes to it")

    def __getitem__(self, span: slice) -> bytes:
        lo, hi = span.start, span.stop
        buf = bytearray(hi - lo)
        self.read_into(memoryview(buf), lo)
        return bytes(buf)

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the file's bytes from `offset` on."""
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as e:
                raise FlannelError(f"{self.path}: trajectory file cannot be read ({e.strerror})") from None
            if n == 0:  # past the end: the file is shorter than when its header was read
                raise self._changed()
            done += n

    def confirm_unchanged(self) -> None:
        if self._stat() != self._stamp:
            raise self._changed()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check(path: Path, threads: int = 2) -> CheckReport:
    """Check every byte of the trajectory at `path` against its header, content record, params and digests. A
    packed file's frames are checked as it is unpacked (a temporary copy), then the copy as a safetensors file."""
    start = time.perf_counter()
    if is_packed(Path(path)):
        try:
            with unpacked_copy(Path(path)) as copy:
                report = check(copy, threads)
        except PackedCorrupt as e:
            return CheckReport(Path(path), [Problem(e.key, e.what, e.run, e.step)], None, 0, 0,
                               time.perf_counter() - start)
        report.path, report.seconds = Path(path), time.perf_counter() - start
        report.notes.append("a packed file: every frame matched to its sha256 and decoded, the index to the packed "
                            "safetensors header, then the unpacked copy checked as a safetensors file")
        return report
    with inspect(path) as insp:
        problems = list(insp.problems)
        n_slices = hashed = 0
        if insp.usable:
            slices = [(n, r, t) for n in insp.step_names() for r in range(insp.params.train.num_runs)
                      for t in insp.schedule]
            computed = _hash_slices(insp, slices, threads)
            n_slices = len(slices)
            hashed = insp.raw.size - insp.raw.data_start  # every data byte, once: slices here, the rest in inspect
            intact = _slices_intact(insp, slices, computed)
            located = []
            for (name, run, step), h in zip(slices, computed, strict=True):
                located += slice_problems(insp, name, run, step, h, intact.get(name))
            located += _step_zero_problems(insp, dict(zip(slices, computed, strict=True)))
            located += _consistent_edits(insp, slices, computed, located)
            insp.confirm_unchanged()  # last: bytes written while they were hashed would read as corruption
            problems += sorted(located, key=lambda p: (p.run or 0, -1 if p.step is None else p.step,
                                                       _ORDER.get(p.key, 9)))
        digest = insp.metadata.get("content_digest") if isinstance(insp.metadata.get("content_digest"), str) else None
        return CheckReport(Path(path), problems, digest, n_slices, hashed, time.perf_counter() - start)


_ORDER = {name: i for i, name in enumerate(("grad_W_output", "grad_W_input", "grad_W", "W", "momentum", "variance"))}
_ORDER |= {f"digest_{name}": i for name, i in _ORDER.items()}


def _hash_slices(insp: Inspection, slices: list[tuple[str, int, int]], threads: int) -> list[bytes]:
    """sha256 of every slice, in order; chunks of neighbouring slices go to `threads` threads. Each thread reads into
    one buffer of its own, so the process does not grow by the file."""
    spans = [insp.slice_span(*s) for s in slices]
    view, local = insp.view, threading.local()

    def work(chunk: list[tuple[int, int]]) -> list[bytes]:
        out = []
        for lo, hi in chunk:
            if getattr(local, "buf", None) is None or len(local.buf) < hi - lo:
                local.buf = memoryview(bytearray(hi - lo))
            buf = local.buf[: hi - lo]
            view.read_into(buf, lo)
            out.append(hashlib.sha256(buf).digest())
        return out

    chunks = [spans[i : i + CHUNK_SLICES] for i in range(0, len(spans), CHUNK_SLICES)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return [h for part in pool.map(work, chunks) for h in part]


def _slices_intact(insp: Inspection, slices, computed) -> dict[str, bool]:
    """Per tensor: do the slices' own hashes, in (run, step) order, hash to its content record line?"""
    if insp.record is None or insp.record_changed:
        return {}
    out = {}
    for name in insp.step_names():
        hashes = b"".join(h for (n, _, _), h in zip(slices, computed, strict=True) if n == name)
        out[name] = hashlib.sha256(hashes).hexdigest() == insp.record[name].sha256
    return out


def _step_zero_problems(insp: Inspection, computed: dict[tuple[str, int, int], bytes]) -> list[Problem]:
    """Step 0 is W_initial for W and zeros for the others, in every run."""
    out = []
    w0 = hashlib.sha256(insp.data("W_initial")).digest()
    zeros = hashlib.sha256(bytes(len(insp.data("W_initial")))).digest()
    for (name, run, step), h in computed.items():
        if step == 0 and h != (w0 if name == "W" else zeros) and h == insp.stored_digest(name, run, 0):
            what = "W_initial" if name == "W" else "zeros"
            out.append(Problem(name, f"the slice (and its digest) is not {what}, as step 0 always is", run, 0))
    return out


def _consistent_edits(insp: Inspection, slices, computed, located: list[Problem]) -> list[Problem]:
    """Per-step digests rewritten to match changed slices: no slice disagrees with its digest, but the digests no
    longer hash to their content record line. Only a rerun (`flannel-repro verify`) can say at which step."""
    out = []
    for name in insp.step_names():
        if f"digest_{name}" not in insp.changed or any(p.key in (name, f"digest_{name}") for p in located):
            continue
        out.append(Problem(name, f"its slices and digest_{name} were changed together after the file was written "
                                 "(they agree with each other, not with the content record); `flannel-repro verify` "
                                 "finds the step"))
    return out

