"""The origin report of a divergent step: the two traces' comparison, or why there is none and how to get one.

`verify` and `trace-diff` both report through `StepOrigin`, so the origin of a divergence reads the same whether
the two traces came from a rerun here or from two machines.

    origin = step_origin(reference_trace, here_ops, run=0, step=1, retrace="flannel-repro trace ref --step 1")
    origin.lines(), origin.to_json(), origin.tags()
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flannel_repro.core.errors import FlannelError
from flannel_repro.tracing.compare import TraceDiff, compare_ops
from flannel_repro.tracing.file import TraceFile, read_trace
from flannel_repro.tracing.ops import Op


@dataclass
class StepOrigin:
    run: int
    step: int
    diff: TraceDiff | None  # None: no trace of this step on one side (`why` says which, `retrace` how to get one)
    why: str = ""
    retrace: str = ""  # the command that traces the step, to run in both environments
    diverged: int | None = None  # the step whose recorded numbers differ first, when it is later than `step`

    def lines(self) -> list[str]:
        if self.diff is None:
            out = [f"origin: not traced: {self.why}"]
            if self.retrace:
                out.append(f"  trace it in both environments: `{self.retrace}`, then `flannel-repro trace-diff A B`")
            return out
        out = [f"origin (op traces of run {self.run}, step {self.step}):"]
        if self.diverged is not None:
            out.append(f"  the ops already differ at step {self.step}, in numbers the trajectory does not record; its "
                       f"recorded numbers first differ at step {self.diverged}")
        out += [f"  {line}" for line in self.diff.lines()]
        if self.diff.first_receiver is not None and self.diff.origin is None:
            out.append("  the state before step 1 (the model's initial weights, drawn when it is built) is not traced"
                       if self.step == 1 else f"  trace an earlier step (down to step 1): the weights and optimizer "
                       f"state step {self.step} starts from are not all in the trajectory")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "step": self.step, "traced": self.diff is not None, "why_not": self.why or None,
                "retrace": self.retrace or None, "first_recorded_difference_step": self.diverged or self.step,
                "comparison": self.diff.to_json() if self.diff else None}

    def tags(self) -> dict[str, str]:
        """MLflow tags of the audit run: the origin op, where it ran, and whether the control flow parted."""
        if self.diff is None:
            return {"flannel.origin": "not traced", "flannel.origin_step": str(self.step)}
        tags = {"flannel.origin_step": str(self.step), "flannel.origin_run": str(self.run),
                "flannel.origin_control_flow": "differs" if self.diff.control_flow_at is not None else "same"}
        o = self.diff.origin
        if o is None:
            return {**tags, "flannel.origin": "none found"}
        return {**tags, "flannel.origin": o.a.key, "flannel.origin_op": o.a.name, "flannel.origin_module": o.a.module,
                "flannel.origin_phase": o.a.phase, "flannel.origin_position": str(o.a.seq)}


def step_origin(reference: TraceFile | None, here: dict[tuple[int, int], list[Op]], run: int, step: int,
                retrace: str, labels: tuple[str, str] = ("the reference", "the rerun")) -> StepOrigin:
    """The origin of a divergence first recorded at (run, step): the first step traced on both sides, up to `step`,
    whose ops differ (an op can differ steps before the recorded numbers do: a layer norm's weight gradient at
    step 1 shows in grad_W only at step 2), or why there is none and the command that traces `step`."""
    if reference is None:
        return StepOrigin(run, step, None, "the reference has no trace file of its own run", retrace)
    both = sorted(t for r, t in reference.steps if r == run and t <= step and (r, t) in here)
    for t in both:
        diff = compare_ops(reference.steps[(run, t)], here[(run, t)], labels)
        if not diff.identical or t == step:
            return StepOrigin(run, t, diff, diverged=step if t < step else None)
    traced = sorted(t for r, t in reference.steps if r == run)
    same = f"; its ops at step(s) {both} are identical here" if both else ""
    return StepOrigin(run, step, None, f"the reference traced step(s) {traced or 'none'} of run {run}, not step "
                                       f"{step}{same}", retrace)


def run_trace(path: Path, content_digest: str | None) -> tuple[TraceFile | None, str]:
    """The op traces a run recorded beside its trajectory (`paths.trace`), if they are that run's: (traces, note).
    A trace of another run (another content digest), or a file that is not a trace, is left out with a note."""
    if not path.is_file():
        return None, ""
    try:
        traces = read_trace(path)
    except FlannelError as e:
        return None, f"the reference's trace is not used: {e}"
    if content_digest is None or traces.content_digest != content_digest:
        return None, (f"{path} is not the reference's trace (content digest {str(traces.content_digest)[:12]}, the "
                      f"reference's {str(content_digest)[:12]}); it is not used")
    return traces, ""


def trace_command(source: str, run: int, step: int) -> str:
    """The command that traces (run, step) of the reference `source` where it is run."""
    run_arg = f" --run {run}" if run else ""
    if source.startswith("MLflow run "):
        what, name = f"--run-id {source.removeprefix('MLflow run ')}", "run"
    else:
        what, name = shlex.quote(source), Path(source).stem
    return f"flannel-repro trace {what} --step {step}{run_arg} --out {name}.step{step}.$(hostname).jsonl"
