"""The safetensors header: the dtype names of the format, a reader that checks a header against the file, and the
writer's side: the header bytes for given tensors, and `save_tensors` for small files. No torch at import, so that
`flannel-repro check` reads a trajectory without it.

Every safetensors file the project reads (trajectories, masks files) goes through `read_header` first, so a
truncated or hand-edited file (an unknown dtype, non-string metadata, overlapping tensors, ...) is one clear error
before safetensors maps it; `read_raw_header` and
`layout_problems` are its two halves, for `check`, which lists every problem instead of stopping at the first.
Every file it writes gets its header from `header_bytes`, whose bytes depend on the arguments alone, so rerunning a
stage rewrites the same bytes.

    header = read_header(Path("tensors/Flannel/live_dead_tokens.safetensors"), "masks file")
    header["__metadata__"]["vocab_size"]
    save_tensors(Path("masks.safetensors"), {"counts": counts}, {"vocab_size": "10000"})
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import atomic_output, file_kind

# The dtypes the project writes, bytes per element (I32: the exposure file's compact counts).
ITEMSIZE = {"I64": 8, "I32": 4, "F32": 4, "BF16": 2, "BOOL": 1, "U8": 1}
_NAMES = {"torch.int64": "I64", "torch.int32": "I32", "torch.float32": "F32", "torch.bfloat16": "BF16",
          "torch.bool": "BOOL", "torch.uint8": "U8"}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_DIMS = 8  # no tensor of the project has more than 4 dimensions; a longer shape is refused before any product
_U64_DIGITS = 20  # safetensors' shapes and offsets are 64-bit unsigned integers


class _Shaped(Protocol):
    """A tensor, or the spec of one still to be written: a torch dtype or a safetensors dtype name, and a shape."""

    dtype: Any
    shape: Any


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a torch dtype (or of a name, itself)."""
    return dtype if isinstance(dtype, str) else _NAMES[str(dtype)]


def header_bytes(specs: Mapping[str, _Shaped], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The head of a safetensors file holding `specs` (length prefix, JSON header, padding) and each tensor's offset
    in the data region, in layout order. The JSON keeps `metadata` in the order given."""
    names = {k: dtype_name(s.dtype) for k, s in specs.items()}
    # Largest items first keeps every tensor naturally aligned; safetensors requires no holes between tensors.
    order = sorted(specs, key=lambda k: (-ITEMSIZE[names[k]], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets: dict[str, int] = {}
    pos = 0
    for name in order:
        shape = list(specs[name].shape)
        nbytes = math.prod(shape) * ITEMSIZE[names[name]]
        header[name] = {"dtype": names[name], "shape": shape, "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def save_tensors(out_path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write a small safetensors file (atomically) whose bytes depend on its content alone. safetensors' own
    `save_file` keeps the metadata in a hash map whose order changes from one process to the next, and with it the
    file's sha256; here the metadata keys are sorted. Reads back with `safetensors.torch.load_file`."""
    import torch

    head, offsets = header_bytes(tensors, dict(sorted(metadata.items())))
    with atomic_output(Path(out_path)) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for name in offsets:  # layout order: each tensor starts where the previous one ends
            f.write(tensors[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass(frozen=True)
class RawHeader:
    """A safetensors header as read from a file, before anything in it is trusted."""

    path: Path
    size: int  # bytes in the file
    head: bytes  # the 8-byte length and the JSON header
    header: dict[str, Any]  # parsed JSON

    @property
    def data_start(self) -> int:
        return len(self.head)

    @property
    def metadata(self) -> dict[str, Any]:
        meta = self.header.get("__metadata__")
        return meta if isinstance(meta, dict) else {}

    def entries(self) -> dict[str, Any]:
        return {k: v for k, v in self.header.items() if k != "__metadata__"}


def read_raw_header(path: Path, what: str = "trajectory file") -> RawHeader:
    """Read a safetensors header; a file that is not one (too short, no JSON header) is a FlannelError."""
    path = Path(path)
    size = _regular_file_size(path, what)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FlannelError(f"{path}: {what} is too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise FlannelError(
                    f"{path}: {what} is not a safetensors file or is truncated (header of {n} bytes, file of {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise FlannelError(f"{path}: {what} cannot be read ({e.strerror})") from None
    return parse_raw_header(path, head + raw, size, what)


def parse_raw_header(path: Path, head: bytes, size: int, what: str = "trajectory file") -> RawHeader:
    """The `RawHeader` of a file of `size` bytes that starts with `head` (its 8-byte length and JSON header; a
    packed file keeps these bytes as they are), with the checks of `read_raw_header`."""
    (n,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (-1,)
    if n != len(head) - 8 or n > _HEADER_LIMIT or 8 + n > size:
        raise FlannelError(f"{path}: {what} is not a safetensors file or is truncated (header of {n} bytes, file "
                           f"of {size})")
    try:
        header = json.loads(head[8:], parse_int=_u64)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape is no Unicode text
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else "not JSON" if not isinstance(e, _TooLong) else e
        raise FlannelError(f"{path}: {what} is not a safetensors file (its header is {why})") from None
    if not isinstance(header, dict):
        raise FlannelError(f"{path}: {what} is not a safetensors file (its header is not a JSON object)")
    return RawHeader(path, size, head, header)


class _TooLong(ValueError):
    def __str__(self) -> str:
        return f"JSON with an integer of {self.args[0]:,} digits, past any 64-bit size or offset"


def _u64(text: str) -> int:
    """json's parse_int for a safetensors header: an integer longer than any 64-bit one is refused unconverted (past
    4,300 digits Python could not even print it)."""
    if len(text) > _U64_DIGITS + 1:
        raise _TooLong(len(text))
    return int(text)


def layout_problems(raw: RawHeader) -> list[tuple[str, str]]:
    """(key, problem) for every header entry that does not describe the data region: an unknown dtype, a size that
    does not match the shape, offsets outside the data, overlapping tensors, holes, truncation or bytes after the
    last tensor ("" for the file as a whole). Empty means safetensors can map every tensor as the header says."""
    data_len = raw.size - raw.data_start
    problems: list[tuple[str, str]] = []
    meta = raw.header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        problems.append(("__metadata__", "holds a value that is not a string (safetensors metadata maps names to "
                                         "strings)"))
    spans = []
    for name, info in raw.entries().items():
        if not _well_formed(info):  # what safetensors' strict parser would refuse: a float offset, a list dtype
            problems.append((name, "has a malformed header entry"))
            continue
        dtype, (lo, hi), numel = info["dtype"], info["data_offsets"], math.prod(info["shape"])
        if dtype not in ITEMSIZE:
            problems.append((name, f"has dtype {dtype!r}, which no file of this project uses"))
        elif hi - lo != numel * ITEMSIZE[dtype]:
            problems.append((name, f"spans {hi - lo} bytes, but {dtype} {list(info['shape'])} needs "
                                   f"{numel * ITEMSIZE[dtype]}"))
        if not 0 <= lo <= hi:
            problems.append((name, f"has data_offsets [{lo}, {hi}], which are not a range"))
        elif hi > data_len:
            problems.append((name, f"ends at byte {hi} of a {data_len}-byte data region"))
        spans.append((lo, hi, name))
    end = 0
    for lo, hi, name in sorted(spans):
        if lo < end:
            problems.append((name, f"overlaps the tensor before it (starts at byte {lo}, before {end})"))
        elif lo > end:
            problems.append((name, f"starts at byte {lo}, leaving a hole after byte {end}"))
        end = max(end, hi)
    if end > data_len:  # one line for the whole file rather than one per tensor past its end
        problems = [(k, why) for k, why in problems if "data region" not in why]
        problems.insert(0, ("", f"the file is truncated: its header describes {raw.data_start + end:,} bytes, the "
                                f"file has {raw.size:,}"))
    elif not problems and end < data_len:
        problems.append(("", f"{data_len - end:,} bytes follow the last tensor (appended to the file)"))
    return problems


def _well_formed(info: Any) -> bool:
    """A header entry of the form safetensors parses: a string dtype, a shape of naturals, two natural offsets."""
    def natural(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict):
        return False
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    return (isinstance(dtype, str) and isinstance(shape, list) and len(shape) <= MAX_DIMS and isinstance(offsets, list)
            and len(offsets) == 2 and all(natural(x) for x in (*shape, *offsets)))


def _regular_file_size(path: Path, what: str) -> int:
    """The size of the file at `path`, which must be a regular file: a FIFO would block the read forever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FlannelError(f"{path}: {what} not found; check the path") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FlannelError(f"{path}: {what} is a loop of symbolic links, not a file; fix the links") from None
        raise FlannelError(f"{path}: {what} cannot be read ({e.strerror})") from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise FlannelError(f"{path}: {what} is {kind}, not a file; give a regular file")
    return st.st_size


def read_checked_header(path: Path, what: str = "trajectory file") -> RawHeader:
    """Read a safetensors header and check it against the file's length before anything trusts it."""
    raw = read_raw_header(path, what)
    problems = layout_problems(raw)
    if problems:
        key, why = problems[0]
        raise FlannelError(f"{raw.path}: {what} is truncated or corrupt: {key + ' ' if key else ''}{why}")
    return raw


def read_header(path: Path, what: str = "trajectory file") -> dict[str, Any]:
    """The parsed header of `read_checked_header`."""
    return read_checked_header(path, what).header
