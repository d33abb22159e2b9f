"""A trajectory file written by the Flannel 7 notebook's own save cell (cell 12), recognised by its schema.

The notebook's file holds no header metadata: only its scalars (n_runs, init_seed, train_seed, n_steps, n_live,
n_dead, vocab_size, hidden_dim as I64; init_scale, learning_rate, weight_decay, adam_beta1, adam_beta2 as F32;
recorded_W, recorded_grads, recorded_losses as BOOL), W_initial (V, H) bf16 and the recorded tensors W and grad_W
(runs, steps+1, V, H) bf16 and losses (runs, steps+1) bf16. What shapes the numbers and is not in the file is what
the notebook's cells hard-code (`FIXED`); the data paths, which neither holds, come from params.yaml.

    raw = read_raw_header(path)
    if is_notebook(raw):
        params, sources = notebook_params(read_scalars(raw, path), load_params("params.yaml"))
        with NotebookTrajectory(path, params) as nb:
            nb.step("W", 3)          # (V, H) bf16
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flannel_repro.core.config import Params, params_from_dict
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.safetensors_header import RawHeader, layout_problems, read_raw_header
from flannel_repro.trajectory.header_fields import HeaderFields
from flannel_repro.trajectory.layout import DIGEST_BYTES, SCALARS, decode_scalar
from flannel_repro.trajectory.packed import is_packed

if TYPE_CHECKING:  # torch only for the tensors themselves: `check` reads the schema without it
    import torch

KIND = "the Flannel 7 notebook"
# The scalars of the notebook's save cell, with the params key each records (n_live, n_dead: from the masks).
NOTEBOOK_SCALARS = {name: spec for name, spec in SCALARS.items() if name not in ("recorded_momentum",
                                                                                 "recorded_variance")}
# Per-step tensors by their recorded_* switch, and the params key the switch records.
RECORDED = {"W": ("recorded_W", "record.W"), "grad_W": ("recorded_grads", "record.grads"),
            "losses": ("recorded_losses", "record.losses")}
# What the notebook's cells hard-code and its file does not record: the Parameters cell's N_LAYER, N_HEAD,
# MAX_SEQ_LEN, BATCH_SIZE and ADAM_EPSILON; the Trainer's default clipping, the notebook's double-shifted labels and
# device choice (cuda, then mps, then cpu); torch's default thread count; RECORD_CONFIG's momentum and variance off.
FIXED: dict[str, Any] = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.max_seq_len": 128,
    "train.batch_size": 32,
    "train.adam_epsilon": 1e-8,
    "train.max_grad_norm": 1.0,
    "train.label_mode": "notebook",
    "train.device": "auto",
    "train.num_threads": None,
    "record.momentum": False,
    "record.variance": False,
    "record.logits": False,
}
# Keys of a flannel-repro trajectory that a notebook file has no numbers for.
NOT_RECORDED = ("losses_f32", "grad_norm", "lr_schedule", "batch_indices", "recorded_momentum", "recorded_variance")


def is_notebook(raw: RawHeader) -> bool:
    """A safetensors header of the notebook's save cell: no header metadata, W_initial and most of its scalars.
    (A file missing a few of them is still recognised, so that `check` can name what is missing.)"""
    entries = raw.entries()
    if raw.header.get("__metadata__") or "W_initial" not in entries:
        return False
    return sum(name in entries for name in NOTEBOOK_SCALARS) >= len(NOTEBOOK_SCALARS) // 2


def is_notebook_file(path: Path) -> bool:
    """Whether `path` is a notebook file (False for a packed trajectory; FlannelError if it is no safetensors file
    at all)."""
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = False
    if not regular:  # a FIFO would block the header's read; the command's own checks name what it is
        return False
    return not is_packed(path) and is_notebook(read_raw_header(path))


def schema_problems(raw: RawHeader) -> list[tuple[str, str]]:
    """(key, problem) for every way the header is not one the notebook writes: a missing or extra key, another
    dtype or shape, or data that the header does not describe. Empty: the scalars can be read and trusted to be
    where the header says."""
    problems = list(layout_problems(raw))
    entries = raw.entries()
    if problems:
        return problems
    for name, (dtype, _) in NOTEBOOK_SCALARS.items():
        got = entries.get(name)
        if got is None:
            problems.append((name, "is missing: the notebook's save cell writes it"))
        elif (got["dtype"], got["shape"]) != (dtype, []):
            problems.append((name, f"is {got['dtype']} {got['shape']}, but the notebook writes {dtype} []"))
    extra = sorted(set(entries) - set(NOTEBOOK_SCALARS) - {"W_initial", *RECORDED})
    ours = [k for k in extra if k in NOT_RECORDED or k.startswith("digest_")]
    if ours:  # safetensors' save_file of a loaded flannel-repro trajectory keeps every key but drops the metadata
        return [("", f"holds flannel-repro's own keys ({', '.join(ours[:4])}) but no header metadata: a flannel-repro "
                     "trajectory saved again without its header; use the file `flannel-repro train` wrote")]
    problems += [(name, "is not a key the notebook writes") for name in extra]
    if "W_initial" in entries and (entries["W_initial"]["dtype"] != "BF16" or len(entries["W_initial"]["shape"]) != 2):
        problems.append(("W_initial", f"is {entries['W_initial']['dtype']} {entries['W_initial']['shape']}, but the "
                                      "notebook writes BF16 [vocab_size, hidden_dim]"))
    for name in RECORDED:
        got = entries.get(name)
        if got is not None and (got["dtype"] != "BF16" or len(got["shape"]) != (2 if name == "losses" else 4)):
            problems.append((name, f"is {got['dtype']} {got['shape']}, but the notebook writes BF16 "
                                   f"{'[runs, steps+1]' if name == 'losses' else '[runs, steps+1, V, H]'}"))
    return problems


def read_scalars(raw: RawHeader) -> dict[str, Any]:
    """The notebook's scalars present in the file, as Python values (a BOOL byte other than 0 or 1 as its int)."""
    out = {}
    with open(raw.path, "rb") as f:
        for name, (dtype, _) in NOTEBOOK_SCALARS.items():
            entry = raw.entries().get(name)
            if entry is None or entry["dtype"] != dtype or entry["shape"] != []:
                continue
            lo, hi = entry["data_offsets"]
            f.seek(raw.data_start + lo)
            out[name] = decode_scalar(dtype, f.read(hi - lo))
    return out


def consistency_problems(raw: RawHeader, scalars: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where the scalars contradict each other or the shapes: n_runs, n_steps, vocab_size and hidden_dim against
    every tensor's shape, each recorded_* against its tensor's presence, n_live + n_dead against vocab_size, and
    values no training could have used."""
    entries, out = raw.entries(), []
    for name in ("recorded_W", "recorded_grads", "recorded_losses"):
        if scalars.get(name) not in (None, True, False):
            out.append((name, f"is the byte {scalars[name]}, not a boolean (0 or 1)"))
    want = {"n_runs": scalars.get("n_runs"), "steps+1": _plus_one(scalars.get("n_steps")),
            "vocab_size": scalars.get("vocab_size"), "hidden_dim": scalars.get("hidden_dim")}
    dims = {"W_initial": ("vocab_size", "hidden_dim"), "W": ("n_runs", "steps+1", "vocab_size", "hidden_dim"),
            "grad_W": ("n_runs", "steps+1", "vocab_size", "hidden_dim"), "losses": ("n_runs", "steps+1")}
    for name, axes in dims.items():
        shape = entries.get(name, {}).get("shape")
        if shape is None or len(shape) != len(axes):
            continue
        for axis, size in zip(axes, shape, strict=True):
            if want[axis] is not None and size != want[axis]:
                scalar = "n_steps + 1" if axis == "steps+1" else axis
                out.append((name, f"has {size} along {axis}, but the file's {scalar} is {want[axis]}"))
    for name, (switch, _) in RECORDED.items():
        flag = scalars.get(switch)
        if flag is True and name not in entries:
            out.append((name, f"is missing, but {switch} is true"))
        elif flag is False and name in entries:
            out.append((name, f"is in the file, but {switch} is false"))
    live, dead, vocab = scalars.get("n_live"), scalars.get("n_dead"), scalars.get("vocab_size")
    if None not in (live, dead, vocab) and (live < 0 or dead < 0 or live + dead != vocab):
        out.append(("n_live", f"n_live {live} + n_dead {dead} is not vocab_size {vocab}"))
    if scalars.get("n_steps") is not None and scalars["n_steps"] < 1:
        out.append(("n_steps", f"is {scalars['n_steps']}: the notebook trains at least one step"))
    if not out and len(scalars) == len(NOTEBOOK_SCALARS):
        try:
            notebook_params(scalars, None)
        except FlannelError as e:
            out.append(("params", str(e)))
    return out


def _plus_one(n: Any) -> Any:
    return None if n is None else n + 1


def f32_decimal(x: float) -> float:
    """The shortest decimal whose float32 is `x`'s: 1e-3 for the float32 0.0010000000474974513 the notebook saved."""
    bits = struct.pack("<f", x)
    for digits in range(1, 10):
        shortest = float(f"{x:.{digits}g}")
        if struct.pack("<f", shortest) == bits:
            return shortest
    return x


def notebook_params(scalars: Mapping[str, Any], base: Params | None) -> tuple[Params, dict[str, str]]:
    """The params of a notebook file's run: its scalars, the notebook's FIXED values, and `base` (params.yaml, or
    the defaults) for the rest: the data paths, how the data files were made, tracking. Also where each key that
    shapes the numbers came from ({key: "file" | "notebook"})."""
    from_file = {"train.num_runs": scalars["n_runs"], "train.init_seed": scalars["init_seed"],
                 "train.train_seed": scalars["train_seed"], "train.steps": scalars["n_steps"],
                 "model.vocab_size": scalars["vocab_size"], "model.hidden_dim": scalars["hidden_dim"],
                 **{f"train.{k}": f32_decimal(scalars[k]) for k in ("init_scale", "learning_rate", "weight_decay",
                                                                   "adam_beta1", "adam_beta2")},
                 **{key: bool(scalars[switch]) for switch, key in RECORDED.values()}}
    doc = (base or Params()).to_dict()
    for key, value in {**FIXED, **from_file}.items():
        section, name = key.split(".")
        doc[section][name] = value
    params = params_from_dict(doc, "the notebook file's scalars", recorded=True)
    return params, {**dict.fromkeys(FIXED, "notebook"), **dict.fromkeys(from_file, "file")}


class NotebookTrajectory(HeaderFields):
    """A notebook file, opened lazily like `trajectory.file.Trajectory` (what `diff` and `verify` read): its params
    are the inferred ones, and its per-step digests are hashed from its slices on first use (it records none)."""

    def __init__(self, path: Path, params: Params) -> None:
        self.path = Path(path)
        self.params = params
        self.raw = read_raw_header(self.path)
        self.metadata: dict[str, str] = {}
        self._entries = self.raw.entries()
        self.shapes = {k: tuple(v["shape"]) for k, v in self._entries.items()}
        from safetensors import safe_open

        self._f = safe_open(str(self.path), framework="pt")
        self._digests: dict[str, torch.Tensor] = {}

    def __enter__(self) -> NotebookTrajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f = None

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole tensor; `digest_<name>` is the (runs, steps+1, 32) sha256 of each of its slices."""
        if name.startswith("digest_") and name[len("digest_"):] in self.shapes:
            return self.digests(name[len("digest_"):])
        return self._f.get_tensor(name)

    def step(self, name: str, t: int, run: int = 0) -> torch.Tensor:
        return self._f.get_slice(name)[run, t]

    def digests(self, name: str) -> torch.Tensor:
        import torch

        if name not in self._digests:
            runs, steps1, v, h = self.shapes[name]
            out = torch.zeros((runs, steps1, DIGEST_BYTES), dtype=torch.uint8)
            for run, t, digest in slice_digests(self.raw, name):
                out[run, t] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
            self._digests[name] = out
        return self._digests[name]

    def meta_json(self, key: str) -> Any:
        return None  # no provenance: the notebook records neither inputs nor device


def slice_digests(raw: RawHeader, name: str):
    """(run, step, sha256) of every (V, H) slice of the per-step tensor `name`, in order, read with pread."""
    runs, steps1, v, h = raw.entries()[name]["shape"]
    n = v * h * 2  # bf16
    start = raw.data_start + raw.entries()[name]["data_offsets"][0]
    buf = bytearray(n)
    with open(raw.path, "rb") as f:  # pread, not a map: a file truncated while it is hashed is an error, not SIGBUS
        for run in range(runs):
            for t in range(steps1):
                lo = start + (run * steps1 + t) * n
                if os.preadv(f.fileno(), [buf], lo) != n:
                    raise FlannelError(f"{raw.path}: the file changed while it was read (it was {raw.size:,} bytes); "
                                       "check it again once nothing writes to it")
                yield run, t, hashlib.sha256(buf).digest()


def adopted_keys(metadata: Mapping[str, Any]) -> frozenset[str]:
    """The keys of a trajectory adopted from a notebook file that hold no recorded numbers (its `adopted` header
    entry, written by `flannel-repro adopt`); empty for a file that `flannel-repro train` wrote."""
    try:
        doc = json.loads(metadata.get("adopted") or "{}")
    except (json.JSONDecodeError, TypeError):
        return frozenset()
    keys = doc.get("not_recorded") if isinstance(doc, dict) else None
    return frozenset(k for k in keys if isinstance(k, str)) if isinstance(keys, list) else frozenset()


def open_notebook(path: Path, base: Params | None) -> NotebookTrajectory:
    """A notebook file, opened with its params inferred; FlannelError if its header contradicts itself."""
    raw = read_raw_header(Path(path))
    problems = schema_problems(raw)
    scalars = read_scalars(raw) if not problems else {}
    problems = problems or consistency_problems(raw, scalars)
    if problems:
        key, why = problems[0]
        raise FlannelError(f"{path}: a file of {KIND} whose header contradicts itself ({key or 'file'} {why}); "
                           f"`flannel-repro check {path}` lists every problem")
    return NotebookTrajectory(Path(path), notebook_params(scalars, base)[0])
