"""Operator traces: every ATen op of one training step, with exact digests of what went in and what came out.

`OpTracer` is a TorchDispatchMode that sees each ATen op as the kernels run it (below autograd and autocast, so the
backward's ops and autocast's casts are there too). For each op it keeps an `Op`: its sequence number in the step,
its identity `name:occurrence` (the n-th call of that overload in the step; two traces are aligned on it), the module
it ran in (forward and backward), the phase, and per tensor its shape, dtype and blake2b digest of the raw bytes in
logical (row-major) order. Inputs are hashed before the op runs, outputs after; an in-place op's mutated arguments
count as its outputs. An output also gets a digest per chunk of its leading rows (at most CHUNKS), so a difference,
or a permutation, is localised to rows; an output of at most VALUES_MAX elements keeps its bytes, so a difference is
counted element by element, in ULPs. Non-tensor arguments (a learning rate, a dim) are kept as exact text: two
calls with equal tensors and another scalar are not "equal inputs".

    with OpTracer(model, optimizer) as tracer:
        ... one training step ...
    tracer.ops   # list[Op]

Hashing reads every byte the step touches, so a traced step is slower (docs/traces.md has the figures); it reads
numbers only, so nothing the step computes changes (tests/test_traces.py checks the trajectory's content digest).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CHUNKS = 16  # at most this many row-chunk digests per output tensor
DIGEST_BYTES = 16  # blake2b digest size of a whole tensor
CHUNK_BYTES = 8  # of one chunk
VALUES_MAX = 256  # an output of at most this many elements keeps its raw bytes, so a difference is counted in ULPs
PHASES = ("forward", "backward", "clip", "optimizer")


@dataclass(frozen=True)
class TensorDigest:
    shape: tuple[int, ...]
    dtype: str  # torch's name without the prefix: bfloat16, float32, int64
    digest: str  # blake2b-128 of the raw bytes in row-major order, hex
    chunks: tuple[str, ...] = ()  # blake2b-64 of each chunk of leading rows (outputs only), hex
    values: str = ""  # the raw bytes themselves, hex, for an output of at most VALUES_MAX elements

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype, "digest": self.digest}
        if self.chunks:
            doc["chunks"] = list(self.chunks)
        if self.values:
            doc["values"] = self.values
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TensorDigest:
        return cls(tuple(doc["shape"]), doc["dtype"], doc["digest"], tuple(doc.get("chunks", ())),
                   doc.get("values", ""))


@dataclass(frozen=True)
class Op:
    seq: int  # position in the step, from 0
    key: str  # "aten::mm.default:12": the op's overload and its occurrence (from 0) in the step
    module: str  # module path ("transformer.h.0.attn.c_attn"), the parameter for the optimizer's ops, "" outside
    phase: str  # one of PHASES
    inputs: tuple[TensorDigest, ...]
    outputs: tuple[TensorDigest, ...]
    args: str = ""  # the non-tensor arguments, exactly ("1e-3" is float.hex), "" when none

    @property
    def name(self) -> str:
        return self.key.rsplit(":", 1)[0]

    def to_json(self) -> dict[str, Any]:
        doc = {"seq": self.seq, "op": self.key, "module": self.module, "phase": self.phase,
               "in": [t.to_json() for t in self.inputs], "out": [t.to_json() for t in self.outputs]}
        if self.args:
            doc["args"] = self.args
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Op:
        return cls(doc["seq"], doc["op"], doc["module"], doc["phase"],
                   tuple(TensorDigest.from_json(t) for t in doc["in"]),
                   tuple(TensorDigest.from_json(t) for t in doc["out"]), doc.get("args", ""))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as raw bytes in logical (row-major) order, on the host."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() and flat.stride() != (1,):  # a one-element view keeps its stride (16 for a row of a batch of 1)
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def digest(t: torch.Tensor, output: bool) -> TensorDigest:
    """An input's digest; an output's also has its row-chunk digests, or its bytes when it is small."""
    raw = tensor_bytes(t)
    whole = hashlib.blake2b(raw, digest_size=DIGEST_BYTES).hexdigest()
    parts: tuple[str, ...] = ()
    values = raw.hex() if output and t.numel() <= VALUES_MAX else ""
    if output and not values and t.dim() > 0 and t.shape[0] > 1 and len(raw):
        rows = t.shape[0]
        per_row = len(raw) // rows
        step = -(-rows // CHUNKS)  # rows per chunk
        parts = tuple(hashlib.blake2b(raw[r * per_row:(r + step) * per_row], digest_size=CHUNK_BYTES).hexdigest()
                      for r in range(0, rows, step))
    return TensorDigest(tuple(t.shape), str(t.dtype).removeprefix("torch."), whole, parts, values)


def _scalar_text(x: Any) -> str:
    if isinstance(x, float):
        return x.hex()
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_scalar_text(v) for v in x) + "]"
    if isinstance(x, torch.Tensor):
        return "T"
    return str(x)


class _ModuleStack:
    """Which module an op runs in, forward and backward, by the modules' full paths in the model.

    Forward: module forward pre/post hooks push and pop. Backward: a module is entered when the gradients of its
    outputs are ready and left when those of its inputs are (multi-grad hooks, as torch.utils.module_tracker does),
    so an op belongs to the innermost module still open. A module whose inputs need no gradient (the embeddings)
    stays open until backward ends."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.forward: list[str] = []
        self.backward: list[str] = []
        self._hooks: list[Any] = []

    def current(self, in_backward: bool) -> str:
        stack = self.backward if in_backward else self.forward
        return stack[-1] if stack else ""

    def __enter__(self) -> _ModuleStack:
        self._hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def end_backward(self) -> None:
        self.backward.clear()

    def _pre(self, mod: torch.nn.Module, args: Any) -> None:
        name = self.names.get(id(mod))
        if name is None:
            return
        self.forward.append(name)
        tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor) and a.requires_grad]
        if tensors:
            self._hooks.append(register_multi_grad_hook(tensors, lambda *_: self._leave_backward(name)))

    def _post(self, mod: torch.nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(mod))
        if name is None:
            return
        if self.forward and self.forward[-1] == name:
            self.forward.pop()
        tensors = [a for a in tree_flatten(output)[0] if isinstance(a, torch.Tensor) and a.requires_grad]
        if tensors:
            self._hooks.append(register_multi_grad_hook(tensors, lambda *_: self.backward.append(name)))

    def _leave_backward(self, name: str) -> None:
        for i in range(len(self.backward) - 1, -1, -1):
            if self.backward[i] == name:
                del self.backward[i]
                return


@dataclass
class _Params:
    """Parameter names for the clipping and optimizer ops, by the identity of the parameter, its gradient or its
    optimizer state; refreshed when the optimizer's state grows (it is made lazily at the first update)."""

    model: torch.nn.Module
    optimizer: Any
    names: dict[int, str] = field(default_factory=dict)
    _seen_state: int = -1

    def name_of(self, tensors: list[torch.Tensor]) -> str:
        state = getattr(self.optimizer, "state", {}) if self.optimizer is not None else {}
        if len(state) != self._seen_state:
            self._refresh(state)
        found = [self.names[id(t)] for t in tensors if id(t) in self.names]
        if not found:
            return ""
        return found[0] if len(set(found)) == 1 else f"{found[0]} (+{len(set(found)) - 1} more)"

    def _refresh(self, state: Any) -> None:
        self.names = {}
        for name, p in self.model.named_parameters():
            self.names[id(p)] = name
            if p.grad is not None:
                self.names[id(p.grad)] = name
            for v in (state.get(p) or {}).values():
                if isinstance(v, torch.Tensor):
                    self.names[id(v)] = name
        self._seen_state = len(state)


class OpTracer(TorchDispatchMode):
    """Records every ATen op dispatched while it is entered (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: Any = None) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self._counts: Counter[str] = Counter()
        self._modules = _ModuleStack(model)
        self._params = _Params(model, getattr(optimizer, "optimizer", optimizer))  # under Accelerate's wrapper
        self._phase = "forward"
        self._hook: Any = None

    def __enter__(self) -> OpTracer:
        self._modules.__enter__()
        self._hook = register_optimizer_step_pre_hook(self._optimizer_begins)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._modules.__exit__(*exc)
        self._hook.remove()

    def _optimizer_begins(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._phase = "optimizer"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in = tree_flatten((args, kwargs))[0]
        in_tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        inputs = tuple(digest(t, output=False) for t in in_tensors)  # before an in-place op changes them
        out = func(*args, **kwargs)
        written = _mutated(func, args, kwargs)
        out_tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        seen = {id(t) for t in out_tensors}
        out_tensors += [t for t in written if id(t) not in seen]
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward:
            self._phase = "backward"
        elif self._phase == "backward":  # backward has ended: clipping until the optimizer's step begins
            self._phase = "clip"
            self._modules.end_backward()
        if self._phase in ("clip", "optimizer"):
            module = self._params.name_of(in_tensors)
        else:
            module = self._modules.current(in_backward)
        name = str(func._schema.name) + ("." + func._overloadname if func._overloadname else "")
        key = f"{name}:{self._counts[name]}"
        self._counts[name] += 1
        scalars = [_scalar_text(x) for x in flat_in if not isinstance(x, torch.Tensor)]
        self.ops.append(Op(len(self.ops), key, module, self._phase, inputs,
                           tuple(digest(t, output=True) for t in out_tensors), ",".join(scalars)))
        return out


def _mutated(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op writes into (self of an in-place op, out=, the lists of a foreach op)."""
    written = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written
