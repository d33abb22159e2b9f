"""verify's report: each rerun's outcome, the verdict and its exit code, as lines for a person and as JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flannel_repro.audit.bits import CHECK_ORDER
from flannel_repro.audit.check import Problem
from flannel_repro.audit.reference import Reference
from flannel_repro.audit.stepcheck import Divergence
from flannel_repro.core.config import Params
from flannel_repro.tracing.origin import StepOrigin
from flannel_repro.trajectory.content import short_digest


@dataclass
class Rerun:
    identical: bool
    steps_checked: int
    runtime_s: float
    divergences: list[Divergence]  # the first only, unless --full
    problems: list[Problem] = field(default_factory=list)  # corruption located at a step
    reference_check_s: float = 0.0  # of runtime_s, reading and hashing the reference's own bytes
    content_digest: str | None = None  # of what the rerun would record; None when it stopped early
    record_differences: list[str] = field(default_factory=list)  # keys whose content record lines differ
    started_at: float = 0.0  # wall-clock start of the rerun, seconds since the epoch (its tracking run's start)


@dataclass
class VerifyReport:
    reference: Reference
    params: Params | None  # what the rerun used; None when the reference's params cannot be read
    params_differences: list[tuple[str, Any, Any]]  # (key, params.yaml, reference)
    mismatches: list[tuple[str, Any, Any]]  # (fingerprint key, reference, here)
    input_mismatches: list[tuple[str, str, str | None]]  # (path, reference sha256, here)
    fingerprint: dict[str, Any]  # this machine's, as the rerun ran
    reruns: list[Rerun]  # none when the reference is too corrupt to rerun
    notes: list[str]
    origin: StepOrigin | None = None  # the op that broke determinism at the first divergent step (tracing/)

    @property
    def corruption(self) -> list[Problem]:
        """Every way the reference no longer agrees with itself: found before the rerun, then located by it."""
        located = [p for r in self.reruns[:1] for p in r.problems]
        found = {p.key for p in located}  # a key the rerun located at a step is listed there, not step-less too
        return sorted([p for p in self.reference.problems if p.key not in found] + located, key=_problem_order)

    @property
    def identical(self) -> bool:
        return bool(self.reruns) and not self.corruption and all(r.identical for r in self.reruns)

    @property
    def verdict(self) -> str:
        return "corrupt" if self.corruption else "identical" if self.identical else "diverged"

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1

    @property
    def first(self) -> Divergence | None:
        return next((r.divergences[0] for r in self.reruns if r.divergences), None)

    def _which_steps(self) -> str:
        """"recorded steps", or with a record.steps schedule how many of the steps have their slices in the file."""
        if self.params is None or self.params.record.steps == "every":
            return "recorded steps"
        held = len(self.params.record.schedule(self.params.train.steps)) * self.params.train.num_runs
        return f"steps (the loss at each, the slices at the {held} record.steps recorded)"

    def checked(self) -> tuple[list[str], list[str]]:
        """What the verdict covers, and what it does not."""
        if self.reference.checks is not None:
            return self.reference.checks
        m = self.reference.manifest or {}
        names = sorted(m.get("digests") or {}, key=CHECK_ORDER.index)
        steps = self.params.record.steps if self.params is not None else "every"
        when = "at every step" if steps == "every" else f"at each step record.steps = {steps!r} recorded"
        record = "every other key (" + ", ".join(
            k for k in ("losses", "losses_f32", "grad_norm", "lr_schedule", "batch_indices", "W_initial")
            if (self.reference.record is None or k in self.reference.record) and k not in self.reference.unrecorded)
        record += ", the scalars)"
        if self.reference.trajectory is not None:
            unrecorded = sorted(k for k in self.reference.unrecorded if not k.startswith("recorded_"))
            return (["the file's own bytes (every slice against its digest, every key against the content record, "
                     "the header against the data)", f"{', '.join(names)} {when} against the rerun",
                     f"{record} step by step against the rerun"],
                    [f"{', '.join(unrecorded)} (adopted from a notebook file, which does not record them)"]
                    if unrecorded else [])
        checked = [f"{', '.join(names)} digests {when} against the rerun"]
        if "losses_f32" in m:
            checked.append("the f32 loss at every step")
        if self.reference.record is not None:
            checked.append(f"{record} against the run's content record, after the last step")
            not_checked = []
        else:
            not_checked = ["losses (bf16), grad_norm, lr_schedule, batch_indices, W_initial and the scalars (the run "
                           "logged no content record)"]
        not_checked.append("the trajectory file's own bytes (give the file too, or run `flannel-repro check FILE`)")
        return checked, not_checked

    def to_json(self, audited_run_id: str | None = None, audit_run_id: str | None = None) -> dict[str, Any]:
        """The full report; `audited_run_id`, `audit_run_id`: the train run the verdict was logged beside and the
        audit run that holds it, once `log_audit` has found them."""
        first, bad = self.first, self.corruption
        checked, not_checked = self.checked()
        ran = self.reruns[0] if self.reruns else None
        doc = {
            "verdict": self.verdict,
            "identical": self.identical,
            "exit_code": self.exit_code,
            "reference": self.reference.source,
            "audited_run_id": audited_run_id or self.reference.run_id,
            "audit_run_id": audit_run_id,
            "first_corrupt_key": bad[0].key if bad else None,
            "first_corrupt_run": bad[0].run if bad else None,
            "first_corrupt_step": bad[0].step if bad else None,
            "corruption": [p.to_json() for p in bad],
            "first_divergent_run": first.run if first else None,
            "first_divergent_step": first.step if first else None,
            "first_divergent_tensor": first.tensors[0] if first else None,
            "content_digest": (self.reference.manifest or {}).get("content_digest"),
            "rerun_content_digest": ran.content_digest if ran else None,
            "checked": checked,
            "not_checked": not_checked,
            "repeats": len(self.reruns),
            "repeats_identical": sum(r.identical for r in self.reruns),
            "params_differences": [{"key": k, "params_yaml": a, "reference": b} for k, a, b in self.params_differences],
            "fingerprint_mismatches": [{"key": k, "reference": a, "here": b} for k, a, b in self.mismatches],
            "input_mismatches": [{"path": p, "reference": a, "here": b} for p, a, b in self.input_mismatches],
            "num_threads": self.params.train.num_threads if self.params else None,
            "fingerprint": self.fingerprint,
            "reference_fingerprint": (self.reference.manifest or {}).get("fingerprint"),
            "reruns": [
                {
                    "identical": r.identical,
                    "steps_checked": r.steps_checked,
                    "runtime_s": round(r.runtime_s, 3),
                    "reference_check_s": round(r.reference_check_s, 3),
                    "content_digest": r.content_digest,
                    "record_differences": r.record_differences,
                    "divergences": [dataclasses.asdict(d) for d in r.divergences],
                }
                for r in self.reruns
            ],
            "notes": self.notes,
            "origin": self.origin.to_json() if self.origin is not None else None,
        }
        return _finite(doc)

    def metrics(self) -> dict[str, Any]:
        """The verdict in the few values a DVC table compares (audit.metrics): `content` is the short content digest
        of the numbers it audited (`audited_content`), to be read beside metrics/train.json's `content`."""
        ran = self.reruns[0] if self.reruns else None
        first = self.first
        bad = self.corruption
        return _finite({
            "verdict": self.verdict,
            "first_divergent_step": first.step if first else None,
            "first_corrupt_step": bad[0].step if bad else None,
            "steps_checked": ran.steps_checked if ran else 0,
            "rerun_steps_per_s": round(ran.steps_checked / ran.runtime_s, 4) if ran and ran.runtime_s > 0 else None,
            "audited_content": short_digest((self.reference.manifest or {}).get("content_digest")),
        })

    def lines(self) -> list[str]:
        """The short human report."""
        m = self.reference.manifest or {}
        if self.params is not None:
            t = self.params.train
            kind = "" if self.reference.trajectory is not None or self.reference.manifest is None else "digests only, "
            out = [f"reference: {self.reference.source} ({kind}{t.num_runs} run(s) x {t.steps} steps)"]
        else:
            out = [f"reference: {self.reference.source}"]
        if self.reference.manifest is not None:
            checked, not_checked = self.checked()
            out.append(f"checked: {'; '.join(checked)}")
            if not_checked:
                out.append(f"not checked: {'; '.join(not_checked)}")
        out += [f"note: {n}" for n in self.notes]
        for k, ref_v, here_v in self.mismatches:
            out.append(f"warning: this machine differs from the reference in {k}: reference {ref_v!r}, here {here_v!r}")
        for p, ref_sha, here_sha in self.input_mismatches:
            out.append(f"warning: {p} is not the file the reference was trained on "
                       f"(sha256 {ref_sha[:12]} recorded, {(here_sha or 'missing')[:12]} here)")
        if self.mismatches or self.input_mismatches:
            out.append("warning: the differences above are the likely cause of any divergence below")
        bad = self.corruption
        out += [f"corrupt: {p.line()}" for p in bad[:20]]
        if len(bad) > 20:
            out.append(f"corrupt: ... ({len(bad) - 20} more)")
        if not self.reruns:
            out.append("not rerun: the reference is corrupt where no rerun can help; restore it (`dvc pull`, or the "
                       "colleague's copy) and run `flannel-repro check` on it")
        for i, r in enumerate(self.reruns):
            tag = f"rerun {i + 1}/{len(self.reruns)}: " if len(self.reruns) > 1 else ""
            if r.identical and not r.problems:
                which = self._which_steps()
                out.append(f"{tag}BIT-IDENTICAL: all {r.steps_checked} {which} match ({r.runtime_s:.1f} s)")
                continue
            for d in r.divergences[:1]:
                out.append(f"{tag}DIVERGED at run {d.run}, step {d.step}: {', '.join(d.tensors)} differ "
                           f"(checked {r.steps_checked} steps, {r.runtime_s:.1f} s)")
                out += [f"  {line}" for line in _detail_lines(d)]
                if i == 0 and self.origin is not None:
                    out += [f"  {line}" for line in self.origin.lines()]
            if len(r.divergences) > 1:
                steps = [f"{x.run}:{x.step}" if self.params.train.num_runs > 1 else str(x.step) for x in r.divergences]
                out.append(f"  {len(r.divergences)} divergent steps: {_abbrev(steps)}")
            if r.record_differences:
                out.append(f"{tag}DIVERGED: {', '.join(r.record_differences)} differ from the reference's content "
                           "record (compared after the last step)")
        digest = m.get("content_digest")
        if digest and self.reruns and self.reruns[0].content_digest:
            same = "the same" if digest == self.reruns[0].content_digest else "DIFFERENT"
            if same != "the same" and self.reference.unrecorded and not self.reruns[0].record_differences:
                same = "different only in the keys the notebook did not record"  # an adopted file's NaN in them
            out.append(f"content digest: {digest} (the rerun's is {same})")
        elif digest:
            out.append(f"content digest: {digest} (recorded)")
        if bad:
            out.append(f"verdict: reference corrupt (exit {self.exit_code}): {bad[0].line()}")
        else:
            out.append(f"verdict: {'bit-identical' if self.identical else 'diverged'} (exit {self.exit_code})")
        return out


def _problem_order(p: Problem) -> tuple[int, int]:
    return (-1 if p.run is None else p.run, -1 if p.step is None else p.step)


def _detail_lines(d: Divergence) -> list[str]:
    out = []
    for name in d.tensors:
        x = d.detail.get(name)
        if x is None:
            continue
        if name == "loss":
            out.append(f"loss: reference {x['reference']!r}, rerun {x['rerun']!r}")
            continue
        out.append(f"{name}: {x['n_differ']} of {x['numel']} elements differ in {x['n_rows']} token row(s); "
                   f"max |diff| {x['max_abs_diff']:.6g}, max {x['max_ulp']} bf16 ULP")
        rows = ", ".join(f"{r['row']} ({r['kind']}, {r['n_differ']})" for r in x["rows"])
        out.append(f"  first token rows (live/dead, elements): {rows}")
    out += d.notes
    return out


def _abbrev(items: list[str], n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _finite(x: Any) -> Any:
    """JSON without NaN or infinity (DVC and most readers reject them)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
