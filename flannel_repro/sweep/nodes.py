"""What a node is, for bit-identity: the parts of the device fingerprint that decide a run's bits (provenance.py's
guard keys, less the thread count, which is the run's own setting), and a short digest of them.

Two nodes with one digest should reproduce each other's trajectories bit for bit; the sweep says before it starts
when its nodes have more than one (cluster.py), and `--audit` measures it (audit.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flannel_repro.trajectory.provenance import GUARD_KEYS

NODE_KEYS = tuple(k for k in GUARD_KEYS if k != "torch_threads")


def node_fingerprint(device: str) -> dict[str, Any]:
    """This machine's fingerprint for runs on `device` (train.device: auto, cpu, cuda, mps)."""
    from flannel_repro.training.model import pick_device
    from flannel_repro.trajectory.provenance import fingerprint

    fp = fingerprint(pick_device(device))
    return {k: fp.get(k) for k in NODE_KEYS}


def fingerprint_digest(fp: dict[str, Any] | None) -> str | None:
    """12 hex digits over the node keys of a fingerprint (a node's, or one a trajectory's header records)."""
    if fp is None:
        return None
    text = json.dumps({k: fp.get(k) for k in NODE_KEYS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe(fp: dict[str, Any]) -> str:
    """One line: device, CPU or GPU model, CPU capability and library versions."""
    return ", ".join(f"{k} {fp.get(k)}" for k in NODE_KEYS if fp.get(k) is not None)
