"""`flannel-repro trace` and `flannel-repro trace-diff`: op traces of any step of a recorded run, and their comparison.

`trace_step` reruns a reference's training here (its own params, pinned to its thread count and device type, as
verify reruns it) up to the end of one step, tracing that step op by op (tracing/); with repeat=2 it does so twice
and names the first op that does not repeat itself (a nondeterministic kernel). `diff_traces` compares two trace
files made anywhere (another machine, another torch, a GPU) step by step, with the same origin report as verify.

    result = trace_step(load_reference(Path("ref.safetensors"), None, None, root), root, step=7)
    write_trace(Path("ref.step7.jsonl"), result.header, result.traces[0])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flannel_repro.audit.reference import Reference
from flannel_repro.audit.verify import _rerun_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.tracing.callback import StepTraces, trace_header
from flannel_repro.tracing.compare import compare_ops
from flannel_repro.tracing.file import TraceFile
from flannel_repro.tracing.ops import Op
from flannel_repro.tracing.origin import StepOrigin
from flannel_repro.trajectory.provenance import fingerprint, fingerprint_mismatches


@dataclass
class TraceRun:
    run: int
    step: int
    header: dict[str, Any]
    traces: list[dict[tuple[int, int], list[Op]]]  # one per repeat: {(run, step): ops}
    notes: list[str] = field(default_factory=list)
    repeats: list[StepOrigin] = field(default_factory=list)  # trace 1 against each later one

    @property
    def repeatable(self) -> bool:
        return all(o.diff is not None and o.diff.identical for o in self.repeats)

    @property
    def exit_code(self) -> int:
        return 0 if self.repeatable else 1

    def lines(self) -> list[str]:
        ops = self.traces[0][(self.run, self.step)]
        out = [f"note: {n}" for n in self.notes]
        out.append(f"traced run {self.run}, step {self.step}: {len(ops)} ops ({self.header['threads']} thread(s), "
                   f"torch {self.header['torch']})")
        for i, o in enumerate(self.repeats, start=2):
            if o.diff is not None and o.diff.identical:
                out.append(f"trace {i} repeats trace 1: all {o.diff.n_a} ops identical")
            else:
                out.append(f"trace {i} does NOT repeat trace 1: the step is not deterministic here")
                out += [f"  {line}" for line in o.lines()[1:]]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "step": self.step, "ops": len(self.traces[0][(self.run, self.step)]),
                "header": self.header, "repeatable": self.repeatable, "notes": self.notes,
                "repeats": [o.to_json() for o in self.repeats]}


def trace_step(ref: Reference, root: Path, step: int, *, run: int = 0, repeat: int = 1,
               threads: int | None = None) -> TraceRun:
    """Rerun `ref` here up to the end of `step` of `run`, tracing that step `repeat` times (one rerun each)."""
    from flannel_repro.training.loop import train
    from flannel_repro.training.model import pick_device

    if ref.params is None or ref.manifest is None or ref.blocking:
        raise FlannelError(f"{ref.source}: the reference is corrupt and cannot be rerun; see `flannel-repro check`")
    t = ref.params.train
    if not 1 <= step <= t.steps:
        raise FlannelError(f"--step {step}: the reference has steps 1 to {t.steps}")
    if not 0 <= run < t.num_runs:
        raise FlannelError(f"--run {run}: the reference has run(s) 0 to {t.num_runs - 1}")
    if repeat < 1:
        raise FlannelError(f"--repeat {repeat}: give at least 1")
    params, notes = _rerun_params(ref, threads)
    # Only runs 0..run are trained, each up to `step`: the runs after it change nothing before it.
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, num_runs=run + 1))
    traced = []
    for _ in range(repeat):
        traces = StepTraces((step,), stop_after=True)
        train(params, root, write=False, progress=False, traces=traces)
        if (run, step) not in traces.traced:
            raise RuntimeError(f"the rerun did not trace run {run}, step {step}")  # a tracer bug
        traced.append({(run, step): traces.traced[(run, step)]})
    fp = {**fingerprint(pick_device(params.train.device)), "torch_threads": params.train.num_threads}
    header = trace_header(ref.manifest.get("content_digest"), fp, ref.source)
    result = TraceRun(run, step, header, traced, notes)
    first = traced[0][(run, step)]
    for later in traced[1:]:
        result.repeats.append(StepOrigin(run, step, compare_ops(first, later[(run, step)], ("trace 1", "trace 2"))))
    return result


@dataclass
class TraceDiffReport:
    a: str
    b: str
    header_differences: list[tuple[str, Any, Any]]  # (key, A, B) of the two environments
    origins: list[StepOrigin]  # one per step both traced

    @property
    def identical(self) -> bool:
        return all(o.diff is not None and o.diff.identical for o in self.origins)

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1

    def lines(self) -> list[str]:
        out = [f"A: {self.a}", f"B: {self.b}"]
        out += [f"environments differ in {k}: A {x!r}, B {y!r}" for k, x, y in self.header_differences]
        for o in self.origins:
            out += o.lines()
        out.append(f"verdict: {'identical' if self.identical else 'different'} (exit {self.exit_code})")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "identical": self.identical, "exit_code": self.exit_code,
                "environment_differences": [{"key": k, "a": x, "b": y} for k, x, y in self.header_differences],
                "steps": [o.to_json() for o in self.origins]}


def diff_traces(a: TraceFile, b: TraceFile, names: tuple[str, str], *, step: int | None = None,
                run: int | None = None) -> TraceDiffReport:
    """Compare the steps both traces hold (or only `step` / `run`), each with its origin report."""
    wanted = [k for k in a.steps if (step is None or k[1] == step) and (run is None or k[0] == run)]
    both = sorted(k for k in wanted if k in b.steps)
    if not both:
        raise FlannelError(f"{names[0]} traced {_steps(a)}, {names[1]} traced {_steps(b)}: no step in common"
                           + (" with --step/--run" if step is not None or run is not None else "")
                           + "; trace the same step in both with `flannel-repro trace REFERENCE --step N`")
    if a.content_digest != b.content_digest:
        raise FlannelError(f"{names[1]}: traces another run than {names[0]} (content digest "
                           f"{str(b.content_digest)[:12]}, A's {str(a.content_digest)[:12]}); compare traces of one "
                           "recorded run")
    differences = fingerprint_mismatches(a.header.get("fingerprint") or {}, b.header.get("fingerprint") or {})
    origins = [StepOrigin(r, t, compare_ops(a.steps[(r, t)], b.steps[(r, t)], ("A", "B"))) for r, t in both]
    return TraceDiffReport(names[0], names[1], differences, origins)


def _steps(trace: TraceFile) -> str:
    return ", ".join(f"{r}:{t}" for r, t in sorted(trace.steps)) or "no step"
