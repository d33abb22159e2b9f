"""The safetensors header: the dtype names of the format, and a reader that checks a header against the file.

Every safetensors file the project reads (trajectories, masks files) goes through `read_header` first, so a
truncated or hand-edited file is one clear error before safetensors maps it.

    header = read_header(Path("tensors/Flannel/live_dead_tokens.safetensors"), "masks file")
    header["__metadata__"]["vocab_size"]
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import FlannelError

DTYPES = {
    torch.int64: "I64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.bool: "BOOL",
    torch.uint8: "U8",
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


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
