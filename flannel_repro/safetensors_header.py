"""The safetensors header: the dtype names of the format, a reader that checks a header against the file, and the
writer's side: the header bytes for given tensors, and `save_tensors` for small files.

Every safetensors file the project reads (trajectories, masks files) goes through `read_header` first, so a
truncated or hand-edited file is one clear error before safetensors maps it. Every file it writes gets its header
from `header_bytes`, whose bytes depend on the arguments alone, so rerunning a stage rewrites the same bytes.

    header = read_header(Path("tensors/Flannel/live_dead_tokens.safetensors"), "masks file")
    header["__metadata__"]["vocab_size"]
    save_tensors(Path("masks.safetensors"), {"counts": counts}, {"vocab_size": "10000"})
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import FlannelError
from .fsutil import atomic_output

DTYPES = {
    torch.int64: "I64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.bool: "BOOL",
    torch.uint8: "U8",
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class _Shaped(Protocol):
    """A tensor, or the spec of one still to be written (trajectory.TensorSpec)."""

    dtype: torch.dtype
    shape: Any


def header_bytes(specs: Mapping[str, _Shaped], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The head of a safetensors file holding `specs` (length prefix, JSON header, padding) and each tensor's offset
    in the data region, in layout order. The JSON keeps `metadata` in the order given."""
    # Largest items first keeps every tensor naturally aligned; safetensors requires no holes between tensors.
    order = sorted(specs, key=lambda k: (-specs[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets: dict[str, int] = {}
    pos = 0
    for name in order:
        spec = specs[name]
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        header[name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def save_tensors(out_path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a small safetensors file (atomically) whose bytes depend on its content alone. safetensors' own
    `save_file` keeps the metadata in a hash map whose order changes from one process to the next, and with it the
    file's sha256; here the metadata keys are sorted. Reads back with `safetensors.torch.load_file`."""
    head, offsets = header_bytes(tensors, dict(sorted(metadata.items())))
    with atomic_output(Path(out_path)) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for name in offsets:  # layout order: each tensor starts where the previous one ends
            f.write(tensors[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def read_header(path: Path, what: str = "trajectory file") -> dict[str, Any]:
    """Parse and check a safetensors header against the file's length before anything trusts it."""
    path = Path(path)
    try:
        size = path.stat().st_size
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
    except FileNotFoundError:
        raise FlannelError(f"{path}: {what} not found; check the path") from None
    except IsADirectoryError:
        raise FlannelError(f"{path}: {what} is a directory, not a file") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FlannelError(f"{path}: {what} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FlannelError(f"{path}: {what} is not a safetensors file (its header is not a JSON object)")
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPE_NAMES.get(info["dtype"])
            lo, hi = (int(x) for x in info["data_offsets"])
            numel = math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise FlannelError(f"{path}: {what} has a malformed header entry for {name!r}") from None
        if not 0 <= lo <= hi <= data_len:
            raise FlannelError(
                f"{path}: {what} is truncated or corrupt: {name} ends at byte {hi} of a {data_len}-byte data region"
            )
        if dtype is not None and hi - lo != numel * dtype.itemsize:
            raise FlannelError(f"{path}: {what} is corrupt: {name}'s size does not match its shape")
        end = max(end, hi)
    if end != data_len:
        raise FlannelError(f"{path}: {what} is corrupt: {data_len - end} bytes after the last tensor")
    return header
