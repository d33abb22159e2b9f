"""The determinism audit: rerun a recorded training and compare it with the record, step by step, bit for bit.

A reference is a trajectory's digest manifest (`trajectory.manifest`): the recorded params, device fingerprint and
input digests, the sha256 of every recorded (V, H) slice at every step and the content record (content.py). A
trajectory file and an MLflow run give the same manifest; a file also holds the tensors themselves, which verify
checks as well: before the rerun, everything `flannel-repro check` checks but the slices (check.py); during it, each
step's slices and values (stepcheck.py). A file that no longer agrees with itself is *corrupt* (changed after it was
written); an intact reference that the rerun does not reproduce has *diverged*.

The rerun uses the reference's own params (never params.yaml), pinned to the reference's thread count and device
type, writes no file, and checks each step as training produces it; by default it stops at the first divergent or
corrupt step.

    ref = file_reference(Path("tensors/Flannel/1.20h_flannel_7.safetensors"))
    report = verify(ref, root=Path("."))
    report.exit_code   # 0 bit-identical, 1 diverged or reference corrupt
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import content
from .bits import CHECK_ORDER
from .check import Inspection, Problem, inspect
from .config import INPUTS, Params, params_from_dict
from .errors import FlannelError
from .fsutil import sha256_file
from .layout import FORMAT, STEP_TENSORS, recorded_tensors
from .masks import load_masks
from .provenance import fingerprint, fingerprint_mismatches
from .stepcheck import STEP_VALUES, Divergence, StepCheck, Stop
from .tracking import AuditStore
from .trajectory import MANIFEST_FORMAT, Trajectory, check_provenance, load_trajectory, manifest


@dataclass
class Reference:
    source: str  # what the user named: a path, or "MLflow run <id>"
    manifest: dict[str, Any] | None  # trajectory.manifest() form; None when the file's layout cannot be trusted
    params: Params | None  # the params the reference was trained with; None when they cannot be read
    trajectory: Trajectory | None = None  # the file itself, for elementwise detail; None for a run-id reference
    run_id: str | None = None  # the audited MLflow run, where known
    inspection: Inspection | None = None  # a file's integrity-checked view (check.py)
    problems: list[Problem] = field(default_factory=list)  # corruption found before any rerun

    @property
    def record(self) -> dict[str, content.Entry] | None:
        """The content record, per key; None for an MLflow run that logged none."""
        text = (self.manifest or {}).get("content")
        if not isinstance(text, str):
            return None
        try:
            return {e.name: e for e in content.parse(text)}
        except ValueError:
            return None

    @property
    def blocking(self) -> list[Problem]:
        """Corruption the rerun cannot locate at a step (a scalar, W_initial, the header): verify stops before it."""
        located = {*STEP_VALUES, *STEP_TENSORS, *(f"digest_{n}" for n in STEP_TENSORS)}
        if self.params is None or self.manifest is None:
            return self.problems
        return [p for p in self.problems if p.key not in located]


def file_reference(path: Path) -> Reference:
    """A trajectory file, checked as `flannel-repro check` checks it but for the slices, which the rerun reads."""
    insp = inspect(path)  # FlannelError (exit 2) if it is not a trajectory at all
    if not insp.usable or insp.metadata.get("format") != FORMAT:
        insp.close()
        return Reference(str(path), None, insp.params, problems=list(insp.problems))
    traj = load_trajectory(path)
    try:
        doc = manifest(traj)
    except (KeyError, ValueError, TypeError) as e:
        raise FlannelError(f"{path}: trajectory header is incomplete or corrupt ({e}); re-record it with "
                           "`flannel-repro train`") from None
    return _checked(Reference(str(path), doc, insp.params, trajectory=traj, inspection=insp,
                              problems=list(insp.problems)))


def run_reference(run_id: str, store: AuditStore) -> Reference:
    doc = store.run_manifest(run_id)
    params = params_from_dict(doc.get("params"), f"MLflow run {run_id} (recorded params)", recorded=True)
    ref = _checked(Reference(f"MLflow run {run_id}", doc, params, run_id=run_id))
    record, text = ref.record, doc.get("content")
    if record is None:
        return ref
    bad = [] if content.content_digest(text) == doc.get("content_digest") else ["content_digest"]
    for name, runs in doc["digests"].items():  # the per-step digests must be the ones the record hashed
        joined = b"".join(bytes.fromhex(h) for run in runs for h in run)
        if name not in record or hashlib.sha256(joined).hexdigest() != record[name].sha256:
            bad.append(f"digests.{name}")
    if bad:
        raise FlannelError(f"MLflow run {run_id}: its digests.json artifact is corrupt ({', '.join(bad)} no longer "
                           "match its content record); audit the run's trajectory file instead")
    return ref


def _checked(ref: Reference) -> Reference:
    """A manifest verify can trust: every recorded tensor has one digest per run and step."""
    m, t = ref.manifest, ref.params.train
    if m.get("format") != MANIFEST_FORMAT:
        raise FlannelError(f"{ref.source}: not a flannel-repro digest manifest (format {m.get('format')!r})")
    check_provenance(m, ref.source)
    want = set(recorded_tensors(ref.params.record))
    have = set(m.get("digests") or {})
    if have != want:
        raise FlannelError(f"{ref.source}: digests for {sorted(have)} but the recorded params say {sorted(want)}; "
                           "the reference is corrupt")
    series = {f"digests.{k}": v for k, v in m["digests"].items()}
    if "losses_f32" in m:
        series["losses_f32"] = m["losses_f32"]
    for key, rows in series.items():
        if len(rows) != t.num_runs or any(len(r) != t.steps + 1 for r in rows):
            raise FlannelError(
                f"{ref.source}: {key} does not have {t.num_runs} run(s) x {t.steps + 1} steps; the reference is corrupt"
            )
    return ref


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

    def checked(self) -> tuple[list[str], list[str]]:
        """What the verdict covers, and what it does not."""
        m = self.reference.manifest or {}
        names = sorted(m.get("digests") or {}, key=CHECK_ORDER.index)
        record = "every other key (" + ", ".join(
            k for k in ("losses", "losses_f32", "grad_norm", "lr_schedule", "batch_indices", "W_initial")
            if self.reference.record is None or k in self.reference.record) + ", the scalars)"
        if self.reference.trajectory is not None:
            return (["the file's own bytes (every slice against its digest, every key against the content record, "
                     "the header against the data)", f"{', '.join(names)} at every step against the rerun",
                     f"{record} step by step against the rerun"], [])
        checked = [f"{', '.join(names)} digests at every step against the rerun"]
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

    def to_json(self) -> dict[str, Any]:
        first, bad = self.first, self.corruption
        checked, not_checked = self.checked()
        ran = self.reruns[0] if self.reruns else None
        doc = {
            "verdict": self.verdict,
            "identical": self.identical,
            "exit_code": self.exit_code,
            "reference": self.reference.source,
            "audited_run_id": self.reference.run_id,
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
        }
        return _finite(doc)

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
                out.append(f"{tag}BIT-IDENTICAL: all {r.steps_checked} recorded steps match ({r.runtime_s:.1f} s)")
                continue
            for d in r.divergences[:1]:
                out.append(f"{tag}DIVERGED at run {d.run}, step {d.step}: {', '.join(d.tensors)} differ "
                           f"(checked {r.steps_checked} steps, {r.runtime_s:.1f} s)")
                out += [f"  {line}" for line in _detail_lines(d)]
            if len(r.divergences) > 1:
                steps = [f"{x.run}:{x.step}" if self.params.train.num_runs > 1 else str(x.step) for x in r.divergences]
                out.append(f"  {len(r.divergences)} divergent steps: {_abbrev(steps)}")
            if r.record_differences:
                out.append(f"{tag}DIVERGED: {', '.join(r.record_differences)} differ from the reference's content "
                           "record (compared after the last step)")
        digest = m.get("content_digest")
        if digest and self.reruns and self.reruns[0].content_digest:
            same = "the same" if digest == self.reruns[0].content_digest else "DIFFERENT"
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
    from .model import pick_device
    from .train import train

    if repeat < 1:
        raise FlannelError(f"--repeat {repeat}: give at least 1")
    if ref.blocking and not (full and ref.manifest is not None):
        return VerifyReport(ref, ref.params, [], [], [], {}, [], [])  # nothing a rerun could add
    params, notes = _rerun_params(ref, threads)
    ref_fp = ref.manifest.get("fingerprint") or {}
    here = {**fingerprint(pick_device(params.train.device)), "torch_threads": params.train.num_threads}
    mismatches = fingerprint_mismatches(ref_fp, here)
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
    reruns = []
    for _ in range(repeat):
        check = StepCheck(ref, masks, stop=not full)
        start = time.perf_counter()
        try:
            train(params, root, observers=[check], write=False, progress=progress)
            check.finish()
        except Stop:
            pass
        expected = params.train.num_runs * (params.train.steps + 1)
        stopped = check.divergences or check.problems
        if not stopped and check.steps_checked != expected:
            raise RuntimeError(f"rerun checked {check.steps_checked} of {expected} steps")  # a recorder bug
        identical = not stopped and not check.record_differences
        reruns.append(Rerun(identical, check.steps_checked, time.perf_counter() - start, check.divergences,
                            check.problems, check.reference_s, check.content_digest, check.record_differences))
    if ref.record is None:
        notes.append("the reference has no content record: keys without per-step digests were not compared")
    return VerifyReport(ref, params, differences, mismatches, input_mismatches, here, reruns, notes)


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
    elif isinstance(recorded, int):
        threads = recorded
        notes.append(f"thread count pinned to the reference's: {threads}")
    else:
        threads = t.num_threads
        notes.append("the reference recorded no thread count; using its params' train.num_threads")
    from .model import device_available

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


def load_reference(path: Path | None, run_id: str | None, current: Params | None, root: Path) -> Reference:
    """The reference a user named: a trajectory file, an MLflow run, or by default params.yaml's trajectory.

    A file and a run id together audit that run with its file at hand (for the elementwise detail): the file must
    hold exactly the digests the run logged."""
    if path is None and run_id is not None:
        return run_reference(run_id, audit_store(current, root))
    if path is None:
        if current is None:
            raise FlannelError("no reference: give a trajectory file or --run-id, or run where params.yaml is")
        path = root / current.paths.trajectory
    ref = file_reference(path)
    if run_id is not None:
        logged = run_reference(run_id, audit_store(current, root))
        ours = (ref.inspection.metadata if ref.inspection else {}).get("content_digest")
        if ours is None or logged.manifest.get("content_digest") is None:  # a run logged before content digests
            same = ref.manifest is not None and logged.manifest.get("digests") == ref.manifest["digests"]
        else:
            same = logged.manifest["content_digest"] == ours
        if not same:
            raise FlannelError(f"{path}: not the trajectory of MLflow run {run_id} (its content digest differs from "
                               "the run's digests.json); give that run's file, or leave out one of the two")
        ref.run_id = run_id
    return ref


def audit_store(current: Params | None, root: Path) -> AuditStore:
    """The tracking store of params.yaml (its defaults when there is none) under `root`."""
    from .config import TrackingConfig
    from .mlflow_tracker import MlflowAuditStore, tracking_uri

    return MlflowAuditStore(tracking_uri(current.tracking if current is not None else TrackingConfig(), root))


def log_audit(report: VerifyReport, current: Params | None, root: Path) -> str:
    """Log the verdict to the tracking store as an audit run linked to the audited run (tag `flannel.audit_of`);
    returns a line saying what happened. A no-op when tracking is disabled or the audited run is not known."""
    if current is None or not current.tracking.enabled:
        return "tracking is disabled (tracking.enabled: false in params.yaml); the verdict is not logged"
    import tempfile

    from .fsutil import write_json

    store = audit_store(current, root)
    if not store.exists():
        return f"no tracking store at {store.uri} yet; the verdict is not logged"
    run_id = report.reference.run_id
    traj = report.reference.trajectory
    if run_id is None and traj is not None:  # a file: find the run that wrote it by the file's sha256
        run_id = store.find_train_run(sha256_file(traj.path))
    if run_id is None:
        return ("the verdict is not logged to tracking: no train run in the store wrote this file; name the audited "
                "run with --run-id ID")

    first = report.first
    with tempfile.TemporaryDirectory(prefix="flannel-verify-") as tmp:
        doc = Path(tmp) / "verify.json"
        write_json(doc, report.to_json())
        audit_id = store.log_audit_run(
            run_id, verdict=report.to_json()["verdict"],
            first_divergent_step=first.step if first else None, fingerprint=report.fingerprint, report=doc,
        )
    return f"logged to tracking as audit run {audit_id} of run {run_id}"
