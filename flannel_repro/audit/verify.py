"""The determinism audit: rerun a recorded training and compare it with the record, step by step, bit for bit.

The reference (reference.py) is a trajectory's digest manifest: the recorded params, device fingerprint and input
digests, the sha256 of every recorded (V, H) slice at every step and the content record. A trajectory file and an
MLflow run give the same manifest; a file also holds the tensors themselves, which verify checks as well: before the
rerun, everything `flannel-repro check` checks but the slices (check.py); during it, each step's slices and values
(stepcheck.py). The verdict and its exit code are report.py's. A file that no longer agrees with itself is
*corrupt* (changed after it was written); an intact reference that the rerun does not reproduce has *diverged*.

The rerun uses the reference's own params (never params.yaml), pinned to the reference's thread count and device
type, writes no file, and checks each step as training produces it; by default it stops at the first divergent or
corrupt step.

    ref = file_reference(Path("tensors/Flannel/1.20h_flannel_7.safetensors"))
    report = verify(ref, root=Path("."))
    report.exit_code   # 0 bit-identical, 1 diverged or reference corrupt
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from flannel_repro.audit.reference import Reference, audit_store
from flannel_repro.audit.report import Rerun, VerifyReport
from flannel_repro.audit.stepcheck import StepCheck, Stop
from flannel_repro.core.config import INPUTS, Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.data.masks import load_masks
from flannel_repro.tracing.callback import StepTraces
from flannel_repro.tracing.origin import run_trace, step_origin, trace_command
from flannel_repro.trajectory.provenance import fingerprint, fingerprint_mismatches


def verify(
    ref: Reference,
    root: Path,
    *,
    current: Params | None = None,
    full: bool = False,
    strict: bool = False,
    repeat: int = 1,
    threads: int | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Rerun `ref`'s training under `root` (where its data paths point) and compare it with the reference.

    current: the params.yaml params, only to say how they differ. threads: rerun with this many threads instead of
    the reference's. strict: refuse (FlannelError) when this machine or the inputs differ from the reference's.
    """
    from flannel_repro.training.loop import train
    from flannel_repro.training.model import pick_device, set_determinism

    if repeat < 1:
        raise FlannelError(f"--repeat {repeat}: give at least 1")
    if ref.blocking and not (full and ref.manifest is not None):
        return VerifyReport(ref, ref.params, [], [], [], {}, [], [])  # nothing a rerun could add
    params, notes = _rerun_params(ref, threads)
    ref_fp = ref.manifest.get("fingerprint") or {}
    set_determinism(params.train)  # as the rerun will: the fingerprint describes the rerun, not the moment before it
    fp_here = fingerprint(pick_device(params.train.device))
    here = {**fp_here, "torch_threads": params.train.num_threads}
    mismatches = fingerprint_mismatches(ref_fp, here) if ref.device_recorded else []
    notes = [*ref.notes, *notes]
    if not ref.device_recorded:  # a notebook file: the notebook picks cuda, then mps, then cpu, and records none
        threads = here["torch_threads"] or f"{fp_here['torch_threads']} (torch's default; the notebook sets none)"
        notes.append(f"the reference does not record its device or thread count (the notebook picks CUDA, then MPS, "
                     f"then CPU); the rerun ran on {here['device_type']} ({here['device_name']}) with {threads} "
                     "thread(s)")
    input_mismatches = _input_mismatches(ref, root)
    if strict and (mismatches or input_mismatches):
        what = [f"{k} (reference {a!r}, here {b!r})" for k, a, b in mismatches] + [p for p, _, _ in input_mismatches]
        raise FlannelError(f"--strict: not the reference's device or inputs: {'; '.join(what)}; refusing to rerun")
    differences = []
    if current is not None:
        ours, theirs = current.flat(), ref.params.flat()
        differences = [(k, ours.get(k), theirs.get(k)) for k in theirs if ours.get(k) != theirs.get(k)]
        if differences:
            keys = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in differences)
            notes.insert(0, f"params.yaml differs from the reference's recorded params in {keys}; "
                            "the rerun uses the reference's")

    masks = load_masks(root / params.paths.masks, params.model.vocab_size)  # present: checked above
    # The reference's op traces beside it, if any (tracing/): a divergence at a traced step is compared op by op.
    ref_trace, note = run_trace(root / params.paths.trace, (ref.manifest or {}).get("content_digest"))
    notes += [note] if note else []
    tracing = StepTraces(tuple(sorted({t for _, t in ref_trace.steps}))) if ref_trace else None
    reruns = []
    for i in range(repeat):
        check = StepCheck(ref, masks, stop=not full)
        started_at, start = time.time(), time.perf_counter()
        try:  # the first rerun traces the steps the reference traced (tracing changes no number)
            train(params, root, observers=[check], write=False, progress=progress, traces=tracing if i == 0 else None)
            check.finish()
        except Stop:
            pass
        expected = params.train.num_runs * (params.train.steps + 1)
        stopped = check.divergences or check.problems
        if not stopped and check.steps_checked != expected:
            raise RuntimeError(f"rerun checked {check.steps_checked} of {expected} steps")  # a recorder bug
        identical = not stopped and not check.record_differences
        if ref.inspection is not None:  # a reference file written to during the rerun: no verdict on moved bytes
            ref.inspection.confirm_unchanged()
        reruns.append(Rerun(identical, check.steps_checked, time.perf_counter() - start, check.divergences,
                            check.problems, check.reference_s, check.content_digest, check.record_differences,
                            started_at))
    if ref.record is None:
        notes.append("the reference has no content record: keys without per-step digests were not compared")
    report = VerifyReport(ref, params, differences, mismatches, input_mismatches, here, reruns, notes)
    first = report.first
    if first is not None:
        report.origin = step_origin(ref_trace, tracing.traced if tracing else {}, first.run, first.step,
                                    trace_command(ref.source, first.run, first.step))
    return report


def _rerun_params(ref: Reference, threads: int | None) -> tuple[Params, list[str]]:
    """The reference's params, pinned to its thread count (or `threads`) and device type."""
    t = ref.params.train
    fp = ref.manifest.get("fingerprint") or {}
    notes = []
    recorded = fp.get("torch_threads")
    if threads is not None:
        if threads < 1:
            raise FlannelError(f"--threads {threads}: give at least 1")
        if threads != recorded:
            notes.append(f"rerunning with {threads} thread(s) as asked; the reference used {recorded}")
    elif not ref.device_recorded:  # a notebook file: its params' count, said with the device in verify()
        threads = t.num_threads
    elif isinstance(recorded, int):
        threads = recorded
        notes.append(f"thread count pinned to the reference's: {threads}")
    else:
        threads = t.num_threads
        notes.append("the reference recorded no thread count; using its params' train.num_threads")
    from flannel_repro.training.model import device_available

    device = t.device
    if device == "auto" and fp.get("device_type") in ("cpu", "cuda", "mps") and device_available(fp["device_type"]):
        device = fp["device_type"]  # the device the reference actually ran on
    train_cfg = dataclasses.replace(t, num_threads=threads, device=device)
    return dataclasses.replace(ref.params, train=train_cfg), notes


def _input_mismatches(ref: Reference, root: Path) -> list[tuple[str, str, str | None]]:
    """Corpus, tokenizer and masks under `root` whose sha256 differs from what the reference recorded."""
    recorded = ref.manifest.get("inputs") or {}
    out = []
    for attr in INPUTS:
        key = f"{attr}_sha256"
        rel = getattr(ref.params.paths, attr)
        path = root / rel
        if not path.is_file():
            raise FlannelError(f"{path}: {attr} file not found; the reference was trained on it (paths.{attr} = "
                               f"{rel}); restore it with `dvc pull` or `dvc repro {attr}`")
        if key in recorded:
            here = sha256_file(path)
            if here != recorded[key]:
                out.append((rel, recorded[key], here))
    return out


@dataclasses.dataclass(frozen=True)
class AuditLogged:
    """What `log_audit` did: a line for the user, and the runs it found and made (None when it logged nothing)."""

    note: str
    audited_run_id: str | None = None
    audit_run_id: str | None = None


def log_audit(report: VerifyReport, current: Params | None, root: Path) -> AuditLogged:
    """Log the verdict to the tracking store as an audit run nested under the audited run (MLflow's parent run),
    with the rerun's params, duration, steps checked, steps/s and verdict; the audited run is tagged with its
    latest verdict. A no-op when tracking is disabled or the audited run is not known."""
    if current is None or not current.tracking.enabled:
        return AuditLogged("tracking is disabled (tracking.enabled: false in params.yaml); the verdict is not logged")
    import tempfile

    from flannel_repro.core.credentials import redacted
    from flannel_repro.core.fsutil import write_json
    from flannel_repro.tracking.base import AuditRun

    store = audit_store(current, root)
    if not store.exists():
        return AuditLogged(f"no tracking store at {redacted(store.uri)} yet; the verdict is not logged")
    run_id = report.reference.run_id
    traj = report.reference.trajectory
    if run_id is None and traj is not None:  # a file: find the run that wrote it by the file's sha256
        run_id = store.find_train_run(sha256_file(traj.path))
    if run_id is None:
        return AuditLogged("the verdict is not logged to tracking: no train run in the store wrote this file; name "
                           "the audited run with --run-id ID")

    first, ran, summary = report.first, report.reruns[0] if report.reruns else None, report.metrics()
    with tempfile.TemporaryDirectory(prefix="flannel-verify-") as tmp:
        doc = Path(tmp) / "verify.json"
        write_json(doc, report.to_json(audited_run_id=run_id))
        audit_id = store.log_audit_run(run_id, AuditRun(
            verdict=summary["verdict"],
            first_divergent_step=first.step if first else None,
            fingerprint=report.fingerprint,
            params=report.params.flat() if report.params is not None else {},
            started_at=ran.started_at if ran else time.time(),
            runtime_s=sum(r.runtime_s for r in report.reruns),
            steps_checked=ran.steps_checked if ran else 0,
            steps_per_s=summary["rerun_steps_per_s"],
            report=doc,
            tags=report.origin.tags() if report.origin is not None else {},
        ))
    return AuditLogged(f"logged to tracking as audit run {audit_id} of run {run_id}", run_id, audit_id)
