"""The content identity of a trajectory: one sha256 over the recorded numbers, and nothing else.

A file's own sha256 also covers its header: the params (paths, tracking, log_every, checkpoint_every included), the
library versions and the device fingerprint. The content digest covers only the tensors. It is the sha256 of the
file's *content record*, a short UTF-8 text with a first line `flannel-content/1` and then one line per tensor key,
in byte order of the key names (`W`, `W_initial`, `adam_beta1`, ...):

    <name> <dtype> <shape> steps:<sha256 of the per-step digests>    W, grad_W, momentum, variance
    <name> <dtype> <shape> bytes:<sha256 of the tensor's bytes>       every other tensor

`<dtype>` is the safetensors dtype (BF16, F32, I64, BOOL, U8), `<shape>` the JSON list without spaces (`[]` for a
scalar), `<sha256>` 64 lowercase hex digits, each line ending in a newline. A per-step tensor enters through its
digest_<name> companion: the sha256 of the (runs, steps+1, 32) bytes of per-step slice digests, in (run, step)
order; the digest_* keys have no line of their own. So two trajectories have the same content digest if and only
if they hold the same keys with the same dtypes, shapes and bits (barring a sha256 collision), whatever their
paths, machine or tracking settings.

The writer reserves both in the header metadata (`content`, `content_digest`) and fills them in when it commits the
file; `flannel-repro check` recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

CONTENT_FORMAT = "flannel-content/1"
DIGEST_PREFIX = "digest_"
PENDING = "-" * 64  # a hex digest not known yet: the header is written before training, filled in at commit
SHORT_DIGEST = 12  # hex digits of a content digest in a table column or a run name (48 bits)


def short_digest(digest: str | None) -> str | None:
    """The first SHORT_DIGEST hex digits of a content digest, as DVC tables and MLflow run names show it."""
    return digest[:SHORT_DIGEST] if digest else None


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "steps" (through the per-step digests) or "bytes"
    sha256: str  # hex

    def line(self) -> str:
        shape = json.dumps(list(self.shape), separators=(",", ":"))
        return f"{self.name} {self.dtype} {shape} {self.kind}:{self.sha256}"


def step_keyed(names) -> set[str]:
    """The per-step tensors among `names`: those with a digest_<name> companion."""
    names = set(names)
    return {n for n in names if not n.startswith(DIGEST_PREFIX) and f"{DIGEST_PREFIX}{n}" in names}


def source_of(name: str, step_names: set[str]) -> str:
    """The key whose bytes a line hashes: digest_<name> for a per-step tensor, else the tensor itself."""
    return f"{DIGEST_PREFIX}{name}" if name in step_names else name


def entries(layout: Mapping[str, tuple[str, tuple[int, ...]]], read: Callable[[str], bytes] | None) -> list[Entry]:
    """The content record's entries of a file with `layout` ({name: (dtype, shape)}); `read(key)` gives a key's raw
    bytes. With `read=None` every hash is PENDING (the placeholder the writer reserves)."""
    steps = step_keyed(layout)
    out = []
    for name in sorted(n for n in layout if not n.startswith(DIGEST_PREFIX)):
        dtype, shape = layout[name]
        sha = PENDING if read is None else hashlib.sha256(read(source_of(name, steps))).hexdigest()
        out.append(Entry(name, dtype, tuple(shape), "steps" if name in steps else "bytes", sha))
    return out


def render(items: list[Entry]) -> str:
    return "".join(f"{line}\n" for line in [CONTENT_FORMAT, *(e.line() for e in items)])


def parse(text: str) -> list[Entry]:
    """The entries of a content record; ValueError names the first line that is not one."""
    lines = text.split("\n")
    if lines[0] != CONTENT_FORMAT or lines[-1] != "":
        raise ValueError(f"it does not start with {CONTENT_FORMAT!r} or does not end with a newline")
    out = []
    for i, line in enumerate(lines[1:-1], start=2):
        try:
            name, dtype, shape, hashed = line.split(" ")
            kind, sha = hashed.split(":")
            dims = json.loads(shape)
            ok = kind in ("steps", "bytes") and re.fullmatch("[0-9a-f]{64}", sha) is not None
            ok = ok and isinstance(dims, list) and len(dims) <= 8 and all(
                isinstance(d, int) and 0 <= d < 2**64 for d in dims)  # as safetensors_header reads shapes
        except (ValueError, RecursionError):  # a number of over 4,300 digits, a shape nested too deeply
            ok = False
        if not ok:
            raise ValueError(f"line {i} is not `<name> <dtype> <shape> <kind>:<sha256>`: {line[:80]!r}")
        out.append(Entry(name, dtype, tuple(dims), kind, sha))
    return out


def content_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
