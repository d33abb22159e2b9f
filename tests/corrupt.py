"""Ways to damage a copy of a trajectory file, for the integrity tests of `check` and `verify`.

Each helper copies `src` to `dst` first: DVC-cached files are read-only hard links, and a test never edits its
fixture in place."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flannel_repro.trajectory import content
from flannel_repro.trajectory.layout import header_digest

ITEMSIZE = {"BF16": 2, "F32": 4, "I64": 8, "BOOL": 1, "U8": 1}


def read_head(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed header and where the data region starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def offset_of(path: Path, key: str, index: tuple[int, ...] = ()) -> int:
    """File offset of `key[index]` (leading indices; the rest of the element or slice follows)."""
    header, data = read_head(path)
    info = header[key]
    shape = info["shape"]
    flat = 0
    for i, n in zip(index, shape, strict=False):  # `index` covers the leading dimensions only
        flat = flat * n + i
    trailing = math.prod(shape[len(index):])
    return data + info["data_offsets"][0] + flat * trailing * ITEMSIZE[info["dtype"]]


def xor_byte(src: Path, dst: Path, key: str, index: tuple[int, ...] = (), byte: int = 0, mask: int = 1) -> None:
    """Copy, then XOR one byte of `key[index]` (byte `byte` into it) with `mask`; nothing else changes."""
    shutil.copyfile(src, dst)
    at = offset_of(dst, key, index) + byte
    with open(dst, "r+b") as f:
        f.seek(at)
        old = f.read(1)[0]
        f.seek(at)
        f.write(bytes([old ^ mask]))


def edit_header(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Copy with the JSON header rewritten by `edit` (padded to 8 bytes as safetensors does); data unchanged."""
    header, data = read_head(src)
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(src, "rb") as f_in, open(dst, "wb") as f_out:
        f_out.write(struct.pack("<Q", len(raw)) + raw)
        f_in.seek(data)
        shutil.copyfileobj(f_in, f_out)


def rewrite_slice_digest(path: Path, name: str, run: int, step: int) -> None:
    """Make digest_<name>[run, step] describe the slice now in the file (in place)."""
    header, _ = read_head(path)
    n = math.prod(header[name]["shape"][2:]) * 2
    with open(path, "r+b") as f:
        f.seek(offset_of(path, name, (run, step)))
        new = hashlib.sha256(f.read(n)).digest()
        f.seek(offset_of(path, f"digest_{name}", (run, step)))
        f.write(new)


def reseal_header(path: Path) -> None:
    """Recompute the header's header_digest over the header as it now is (in place)."""
    _, data = read_head(path)
    with open(path, "r+b") as f:
        head = f.read(data)
        recorded, computed = header_digest(head)
        key = b'"header_digest":"' + recorded.encode()
        f.seek(head.index(key) + len(key) - 64)
        f.write(computed.encode())


def rewrite_content_record(path: Path) -> str:
    """Recompute the header's content record, content digest and header digest from the data, as the writer does
    (in place, same length); returns the new content digest. With this a changed file is consistent in every way
    a file can check itself."""
    header, data = read_head(path)
    layout = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    blob = Path(path).read_bytes()

    def read(key: str) -> bytes:
        lo, hi = header[key]["data_offsets"]
        return blob[data + lo : data + hi]

    text = content.render(content.entries(layout, read))
    digest = content.content_digest(text)
    meta = header["__metadata__"]
    head = blob[:data]
    for key, value in (("content", text), ("content_digest", digest)):
        old = json.dumps(key).encode() + b":" + json.dumps(meta[key]).encode()
        new = json.dumps(key).encode() + b":" + json.dumps(value).encode()
        assert len(old) == len(new) and head.count(old) == 1
        head = head.replace(old, new)
    with open(path, "r+b") as f:
        f.write(head)
    reseal_header(path)
    return digest
