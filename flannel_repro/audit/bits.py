"""Bit-level comparison of recorded numbers: what "the same" means for a loss and for a (V, H) bf16 slice.

`verify` (a rerun against its reference) and `diff` (two files) both compare with these, so a difference is
counted, located and measured the same way in both reports.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch

# Causal order within one step: the loss comes from the forward pass, grad_W from backward (the output projection's
# half first, then the lookup's, then their sum), then the update.
CHECK_ORDER = ("loss", "grad_W_output", "grad_W_input", "grad_W", "W", "momentum", "variance")
SHOW_ROWS = 10  # differing token rows listed in a report


def f32_bits(x: float | None) -> int | None:
    """The float32 bit pattern; every NaN (and a missing value) counts as the same NaN."""
    if x is None or math.isnan(x):
        return None
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bf16_order(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns mapped to integers in the order of the values: adjacent floats differ by 1 (one ULP)."""
    bits = t.view(torch.int16).to(torch.int32)  # sign-magnitude, sign-extended
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def compare_slices(ours: torch.Tensor, theirs: torch.Tensor, live: torch.Tensor | None) -> dict[str, Any]:
    """Elementwise comparison of two (V, H) bf16 slices; `live` is bool[V] or None."""
    differ = ours.view(torch.int16) != theirs.view(torch.int16)  # (V, H)
    n = int(differ.sum())
    absdiff = (ours.float() - theirs.float()).abs()[differ]
    ulp = (bf16_order(ours) - bf16_order(theirs)).abs()
    rows = differ.any(dim=1).nonzero().flatten().tolist()
    return {
        "numel": differ.numel(),
        "n_differ": n,
        "max_abs_diff": float(absdiff.max()) if n else 0.0,
        "max_ulp": int(ulp.max()) if n else 0,
        "n_rows": len(rows),
        "rows": [
            {
                "row": r,
                "kind": "unknown" if live is None else ("live" if live[r] else "dead"),
                "n_differ": int(differ[r].sum()),
            }
            for r in rows[:SHOW_ROWS]
        ],
    }
