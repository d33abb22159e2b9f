"""Which op broke determinism: two traces of one step, aligned by op identity, and the origin of their difference.

Ops are aligned by `name:occurrence` (Megatron-LM's method, PR 7262), not by position, so an op one trace has and the
other lacks does not shift the rest. The origin is the first op (in trace A's order) whose inputs are equal (every
input digest and the non-tensor arguments) and whose outputs differ: its own kernel computed another result from the
same numbers. Ops whose inputs already differ only receive a difference and are skipped. An op in one trace and not
the other is a control-flow difference, reported as such; an origin after the first one may be its consequence.

    diff = compare_ops(a_ops, b_ops)
    diff.origin        # OpDifference or None
    diff.lines()       # the report
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flannel_repro.tracing.ops import Op, TensorDigest

_FLOAT_BITS = {"bfloat16": 16, "float16": 16, "float32": 32, "float64": 64}


@dataclass
class OutputDifference:
    index: int  # which output of the op
    shape: tuple[int, ...]
    dtype: str
    a: str  # the two digests
    b: str
    chunks: list[int] | None = None  # differing row chunks (of len(a.chunks)), when the output has them
    rows: list[tuple[int, int]] | None = None  # those chunks as [first, last] leading rows
    n_differ: int | None = None  # elements, when the output is small enough to keep its values
    numel: int | None = None
    max_ulp: int | None = None  # floats only
    n_chunks: int = 0  # row chunks the output has digests for

    def line(self) -> str:
        where = f"output {self.index} {list(self.shape)} {self.dtype}: digest {self.a[:12]} vs {self.b[:12]}"
        if self.n_differ is not None:
            ulp = f", max {self.max_ulp} ULP" if self.max_ulp is not None else ""
            return f"{where}; {self.n_differ} of {self.numel} elements differ{ulp}"
        if self.rows:
            spans = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.rows)
            return f"{where}; {len(self.chunks)} of {self.n_chunks} row chunks differ (rows {spans})"
        return where


@dataclass
class OpDifference:
    a: Op
    b: Op
    outputs: list[OutputDifference]

    def to_json(self) -> dict[str, Any]:
        return {"op": self.a.name, "key": self.a.key, "module": self.a.module, "phase": self.a.phase,
                "position": self.a.seq, "position_b": self.b.seq,
                "inputs": [t.to_json() for t in self.a.inputs], "args": self.a.args,
                "outputs": [dataclasses.asdict(o) for o in self.outputs]}


@dataclass
class TraceDiff:
    n_a: int
    n_b: int
    matched: int  # ops in both with equal inputs and outputs
    receivers: int  # ops in both whose inputs already differ
    origin: OpDifference | None
    origins: int = 0  # ops with equal inputs and differing outputs (the first is the origin)
    only_a: list[Op] = field(default_factory=list)
    only_b: list[Op] = field(default_factory=list)
    control_flow_at: int | None = None  # position (in A) of the first op whose identity differs from B's there
    first_receiver: Op | None = None  # an op receiving a difference before any origin: the step began apart
    apart_inputs: tuple[int, ...] = ()  # which of its inputs differ
    labels: tuple[str, str] = ("A", "B")

    @property
    def identical(self) -> bool:
        return self.origin is None and not self.only_a and not self.only_b and self.receivers == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical, "ops_a": self.n_a, "ops_b": self.n_b, "matched": self.matched,
            "receivers": self.receivers, "origins": self.origins,
            "origin": self.origin.to_json() if self.origin else None,
            "origin_after_control_flow": self.origin_after_control_flow,
            "control_flow_at": self.control_flow_at,
            "began_apart_at": _brief(self.first_receiver) | {"inputs": list(self.apart_inputs)}
            if self.first_receiver else None,
            "only_a": [_brief(o) for o in self.only_a], "only_b": [_brief(o) for o in self.only_b],
        }

    @property
    def origin_after_control_flow(self) -> bool:
        return self.origin is not None and self.control_flow_at is not None and self.origin.a.seq > self.control_flow_at

    def lines(self) -> list[str]:
        a, b = self.labels
        if self.identical:
            return [f"traces identical: all {self.n_a} ops have equal inputs and outputs"]
        out = [f"ops: {self.n_a} in {a}, {self.n_b} in {b}; {self.matched} identical, {self.receivers} receive a "
               f"difference, {self.origins} with equal inputs and differing outputs"]
        o = self.origin
        if o is not None:
            module = o.a.module or "(outside any module)"
            out.append(f"ORIGIN: {o.a.name} in {module}, {o.a.phase}, op {o.a.seq} of {self.n_a} in the step "
                       f"({o.a.key}; op {o.b.seq} in {b})")
            digests = ", ".join(f"{t.digest[:12]} {list(t.shape)} {t.dtype}" for t in o.a.inputs) or "none"
            out.append(f"  inputs equal: {digests}" + (f"; arguments {o.a.args}" if o.a.args else ""))
            out += [f"  {d.line()}" for d in o.outputs]
            if self.first_receiver is None and not self.origin_after_control_flow:
                out.append(f"  the {o.a.seq} op(s) before it are identical in {a} and {b}")
            if self.origin_after_control_flow:
                out.append("  note: the control flow parted before this op (below); it may be a consequence")
        else:
            out.append("no op has equal inputs and differing outputs")
        if self.first_receiver is not None:
            r = self.first_receiver
            which = ", ".join(f"input {i} {list(r.inputs[i].shape)} {r.inputs[i].dtype}" for i in self.apart_inputs)
            out.append(f"BEGAN APART: op {r.seq} {r.key} ({r.module or 'outside any module'}, {r.phase}) already has "
                       f"differing inputs ({which or 'its arguments'}) with no differing op before it: the step "
                       "started from other numbers (weights or optimizer state made before it)")
        if self.control_flow_at is not None:
            out.append(f"CONTROL FLOW differs from op {self.control_flow_at} of {a}: {len(self.only_a)} op(s) only "
                       f"in {a}, {len(self.only_b)} only in {b}")
            for label, ops in ((a, self.only_a), (b, self.only_b)):
                for op in ops[:3]:
                    out.append(f"  only in {label}: op {op.seq} {op.key} in {op.module or '(outside any module)'}, "
                               f"{op.phase}")
        return out


def _brief(op: Op) -> dict[str, Any]:
    return {"position": op.seq, "key": op.key, "module": op.module, "phase": op.phase}


def _same_inputs(x: Op, y: Op) -> bool:
    return x.args == y.args and [(t.shape, t.dtype, t.digest) for t in x.inputs] == \
        [(t.shape, t.dtype, t.digest) for t in y.inputs]


def _same_outputs(x: Op, y: Op) -> bool:
    return [(t.shape, t.dtype, t.digest) for t in x.outputs] == [(t.shape, t.dtype, t.digest) for t in y.outputs]


def compare_ops(a: list[Op], b: list[Op], labels: tuple[str, str] = ("A", "B")) -> TraceDiff:
    """Align `a` and `b` by op identity and find the origin of their difference (see the module docstring)."""
    by_key = {op.key: op for op in b}
    keys_a = {op.key for op in a}
    matched = receivers = origins = 0
    origin: OpDifference | None = None
    first_receiver: Op | None = None
    for x in a:
        y = by_key.get(x.key)
        if y is None:
            continue
        if not _same_inputs(x, y):
            receivers += 1
            if origin is None and first_receiver is None:
                first_receiver = x
        elif _same_outputs(x, y):
            matched += 1
        else:
            origins += 1
            if origin is None:
                origin = OpDifference(x, y, _output_differences(x, y))
    control = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x.key != y.key), None)
    if control is None and len(a) != len(b):
        control = min(len(a), len(b))
    apart = _differing_inputs(first_receiver, by_key[first_receiver.key]) if first_receiver else ()
    return TraceDiff(len(a), len(b), matched, receivers, origin, origins,
                     only_a=[x for x in a if x.key not in by_key], only_b=[y for y in b if y.key not in keys_a],
                     control_flow_at=control, first_receiver=first_receiver, apart_inputs=apart, labels=labels)


def _differing_inputs(x: Op, y: Op) -> tuple[int, ...]:
    pairs = zip(x.inputs, y.inputs, strict=False)
    return tuple(i for i, (s, t) in enumerate(pairs) if (s.shape, s.dtype, s.digest) != (t.shape, t.dtype, t.digest))


def _output_differences(x: Op, y: Op) -> list[OutputDifference]:
    out = []
    for i, (s, t) in enumerate(zip(x.outputs, y.outputs, strict=False)):
        if (s.shape, s.dtype, s.digest) == (t.shape, t.dtype, t.digest):
            continue
        d = OutputDifference(i, s.shape, s.dtype, s.digest, t.digest)
        if s.values and t.values and s.shape == t.shape and s.dtype == t.dtype:
            d.n_differ, d.numel, d.max_ulp = _elementwise(s, t)
        elif s.chunks and len(s.chunks) == len(t.chunks) and s.shape == t.shape:
            d.chunks = [k for k, (p, q) in enumerate(zip(s.chunks, t.chunks, strict=True)) if p != q]
            per = -(-s.shape[0] // len(s.chunks))
            d.rows = [(k * per, min((k + 1) * per, s.shape[0]) - 1) for k in d.chunks]
            d.n_chunks = len(s.chunks)
        out.append(d)
    if len(x.outputs) != len(y.outputs):
        out.append(OutputDifference(min(len(x.outputs), len(y.outputs)), (), "", f"{len(x.outputs)} outputs",
                                    f"{len(y.outputs)} outputs"))
    return out


def _elementwise(s: TensorDigest, t: TensorDigest) -> tuple[int, int, int | None]:
    """(elements differing, numel, max ULP or None) from two small outputs' raw bytes."""
    ra, rb = bytes.fromhex(s.values), bytes.fromhex(t.values)
    numel = int(np.prod(s.shape)) if s.shape else 1
    width = len(ra) // max(numel, 1)
    pairs = [(ra[i * width:(i + 1) * width], rb[i * width:(i + 1) * width]) for i in range(numel)]
    differ = [(p, q) for p, q in pairs if p != q]
    if s.dtype not in _FLOAT_BITS:
        return len(differ), numel, None
    bits = _FLOAT_BITS[s.dtype]
    ulp = max((abs(_ordered(p, bits) - _ordered(q, bits)) for p, q in differ), default=0)
    return len(differ), numel, ulp


def _ordered(raw: bytes, bits: int) -> int:
    """A float's little-endian bit pattern as an integer in the order of the values: adjacent floats differ by 1."""
    x = int.from_bytes(raw, "little")
    sign = 1 << (bits - 1)
    return -(x & (sign - 1)) if x & sign else x
