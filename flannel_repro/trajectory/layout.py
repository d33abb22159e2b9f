"""The trajectory file's layout, without torch: which keys a file holds, with their dtypes and shapes, the
scalars' values, and the header digest.

Everything here follows from the recorded params alone, so `flannel-repro check` can rebuild a file's header
(`safetensors_header.header_bytes` of these specs) and compare it with the file's without importing torch.

    specs = trajectory_layout(params)          # {"W": Spec("BF16", (1, 501, 10000, 64)), ...}
    # with record.steps: log, W is (1, 11, 10000, 64) for steps 0, 1, 2, 4, ..., 256, 500, and recorded_steps (11,)
    scalar_values(params)["n_steps"]           # 500
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

from flannel_repro.core.config import Params, RecordConfig
from flannel_repro.core.safetensors_header import ITEMSIZE

FORMAT = "flannel-trajectory/2"  # /2: the header holds the content record and digest (content.py)
DIGEST_BYTES = 32  # sha256

# Per-step (V, H) tensors in the file, by their RecordConfig switch; each has a digest_<name> companion.
# grad_W_input and grad_W_output are the tied weight's two gradient halves (the lookup's, the output projection's).
STEP_TENSORS = {"W": "W", "grad_W": "grads", "grad_W_input": "grad_parts", "grad_W_output": "grad_parts",
                "momentum": "momentum", "variance": "variance"}
# Per-step keys without a digest of their own, in causal order; batch_indices[run, t - 1] is step t's batch.
STEP_VALUES = ("batch_indices", "losses_f32", "losses", "grad_norm", "lr_schedule")
# The notebook's metadata scalars: name -> (dtype, the params key it records); n_live and n_dead come from the masks.
SCALARS = {
    "n_runs": ("I64", "train.num_runs"),
    "init_seed": ("I64", "train.init_seed"),
    "train_seed": ("I64", "train.train_seed"),
    "n_steps": ("I64", "train.steps"),
    "n_live": ("I64", None),
    "n_dead": ("I64", None),
    "vocab_size": ("I64", "model.vocab_size"),
    "hidden_dim": ("I64", "model.hidden_dim"),
    "init_scale": ("F32", "train.init_scale"),
    "learning_rate": ("F32", "train.learning_rate"),
    "weight_decay": ("F32", "train.weight_decay"),
    "adam_beta1": ("F32", "train.adam_beta1"),
    "adam_beta2": ("F32", "train.adam_beta2"),
    "recorded_W": ("BOOL", "record.W"),
    "recorded_grads": ("BOOL", "record.grads"),
    "recorded_losses": ("BOOL", "record.losses"),
    "recorded_momentum": ("BOOL", "record.momentum"),
    "recorded_variance": ("BOOL", "record.variance"),
}
# With a record.steps schedule other than "every": the (N,) training steps that index i of every per-step (V, H)
# tensor holds. A key of its own, so it is in the content record (and the content digest) like any other key.
SCHEDULE_KEY = "recorded_steps"
_STRUCT = {"I64": "<q", "F32": "<f", "BOOL": "<?"}


@dataclass(frozen=True)
class Spec:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def recorded_tensors(record: RecordConfig) -> list[str]:
    return [name for name, switch in STEP_TENSORS.items() if getattr(record, switch)]


def trajectory_layout(params: Params) -> dict[str, Spec]:
    """Every key of a trajectory recorded with `params`, with its dtype and shape."""
    t, m = params.train, params.model
    runs, steps1, vh = t.num_runs, t.steps + 1, (m.vocab_size, m.hidden_dim)
    held = params.record.n_recorded(t.steps)  # the per-step tensors hold the recorded steps only
    specs = {name: Spec(dtype, ()) for name, (dtype, _) in SCALARS.items()}
    specs["W_initial"] = Spec("BF16", vh)
    if params.record.steps != "every":  # which training step each index of the per-step tensors is
        specs[SCHEDULE_KEY] = Spec("I64", (held,))
    for name in recorded_tensors(params.record):
        specs[name] = Spec("BF16", (runs, held, *vh))
        specs[f"digest_{name}"] = Spec("U8", (runs, held, DIGEST_BYTES))
    if params.record.losses:
        specs["losses"] = Spec("BF16", (runs, steps1))
        specs["losses_f32"] = Spec("F32", (runs, steps1))
    specs["grad_norm"] = Spec("F32", (runs, steps1))
    specs["lr_schedule"] = Spec("F32", (runs, steps1))
    specs["batch_indices"] = Spec("I64", (runs, t.steps, t.batch_size))
    return specs


def scalar_values(params: Params) -> dict[str, Any]:
    """The scalars a file recorded with `params` holds, as Python values (all but n_live and n_dead, which come
    from the masks)."""
    flat = params.flat()
    return {name: flat[key] for name, (_, key) in SCALARS.items() if key is not None}


def decode_scalar(dtype: str, raw: bytes) -> Any:
    """A scalar's value from its raw bytes; a BOOL byte other than 0 or 1 is returned as the int it is."""
    if dtype == "BOOL" and raw[0] > 1:
        return raw[0]
    return struct.unpack(_STRUCT[dtype], raw)[0]


def encode_scalar(dtype: str, value: Any) -> bytes:
    return struct.pack(_STRUCT[dtype], value)


def header_digest(head: bytes) -> tuple[str | None, str | None]:
    """(recorded, computed) header digest of a file's first bytes: the sha256 of the whole header with its own
    `header_digest` value read as 64 '-'. Either is None when the header holds no such value."""
    key = b'"header_digest":"'
    at = head.find(key)
    if at < 0 or head.count(key) != 1 or head[at + len(key) + 64 : at + len(key) + 65] != b'"':
        return None, None
    start = at + len(key)
    recorded = head[start : start + 64].decode("ascii", "replace")
    return recorded, hashlib.sha256(head[:start] + b"-" * 64 + head[start + 64 :]).hexdigest()
