"""The determinism audit: rerun a recorded training and compare it with the record, step by step, bit for bit.

A reference is a trajectory's digest manifest (`trajectory.manifest`): the recorded params, device fingerprint and
input digests, and the sha256 of every recorded (V, H) slice at every step. A trajectory file and an MLflow run give
the same manifest, so both are audited by the same code; only a file also holds the tensors themselves, which the
elementwise detail of a divergence needs.

The rerun uses the reference's own params (never params.yaml), pinned to the reference's thread count and device
type, writes no file, and checks each step's digests and loss as training produces them; by default it stops at the
first divergent step.

    ref = file_reference(Path("tensors/Flannel/1.20h_flannel_7.safetensors"))
    report = verify(ref, root=Path("."))
    report.exit_code   # 0 bit-identical, 1 diverged
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bits import CHECK_ORDER, compare_slices, f32_bits
from .config import INPUTS, Params, params_from_dict
from .errors import FlannelError
from .fsutil import sha256_file
from .masks import load_masks
from .provenance import fingerprint, fingerprint_mismatches
from .recorder import StepRecord, recorded_tensors
from .tracking import AuditStore
from .trajectory import MANIFEST_FORMAT, Trajectory, digest, load_trajectory, manifest


@dataclass
class Reference:
    source: str  # what the user named: a path, or "MLflow run <id>"
    manifest: dict[str, Any]  # trajectory.manifest() form
    params: Params  # the params the reference was trained with
    trajectory: Trajectory | None = None  # the file itself, for elementwise detail; None for a run-id reference
    run_id: str | None = None  # the audited MLflow run, where known


def file_reference(path: Path) -> Reference:
    traj = load_trajectory(path)  # checks the header against the file's length and the format tag
    params = traj.params
    try:
        doc = manifest(traj)
    except (KeyError, ValueError, TypeError) as e:
        raise FlannelError(f"{path}: trajectory header is incomplete or corrupt ({e}); re-record it with "
                           "`flannel-repro train`") from None
    return _checked(Reference(str(path), doc, params, trajectory=traj))


def run_reference(run_id: str, store: AuditStore) -> Reference:
    doc = store.run_manifest(run_id)
    params = params_from_dict(doc.get("params"), f"MLflow run {run_id} (recorded params)")
    return _checked(Reference(f"MLflow run {run_id}", doc, params, run_id=run_id))


def _checked(ref: Reference) -> Reference:
    """A manifest verify can trust: every recorded tensor has one digest per run and step."""
    m, t = ref.manifest, ref.params.train
    if m.get("format") != MANIFEST_FORMAT:
        raise FlannelError(f"{ref.source}: not a flannel-repro digest manifest (format {m.get('format')!r})")
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
class Divergence:
    run: int
    step: int
    tensors: list[str]  # in CHECK_ORDER; the first is the first divergent tensor
    detail: dict[str, Any] = field(default_factory=dict)  # per tensor, only for the first divergent step
    notes: list[str] = field(default_factory=list)


@dataclass
class Rerun:
    identical: bool
    steps_checked: int
    runtime_s: float
    divergences: list[Divergence]  # the first only, unless --full


@dataclass
class VerifyReport:
    reference: Reference
    params: Params  # what the rerun used
    params_differences: list[tuple[str, Any, Any]]  # (key, params.yaml, reference)
    mismatches: list[tuple[str, Any, Any]]  # (fingerprint key, reference, here)
    input_mismatches: list[tuple[str, str, str | None]]  # (path, reference sha256, here)
    fingerprint: dict[str, Any]  # this machine's, as the rerun ran
    reruns: list[Rerun]
    notes: list[str]

    @property
    def identical(self) -> bool:
        return all(r.identical for r in self.reruns)

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1

    @property
    def first(self) -> Divergence | None:
        return next((r.divergences[0] for r in self.reruns if r.divergences), None)

    def to_json(self) -> dict[str, Any]:
        first = self.first
        doc = {
            "verdict": "identical" if self.identical else "diverged",
            "identical": self.identical,
            "exit_code": self.exit_code,
            "reference": self.reference.source,
            "audited_run_id": self.reference.run_id,
            "first_divergent_run": first.run if first else None,
            "first_divergent_step": first.step if first else None,
            "first_divergent_tensor": first.tensors[0] if first else None,
            "repeats": len(self.reruns),
            "repeats_identical": sum(r.identical for r in self.reruns),
            "params_differences": [{"key": k, "params_yaml": a, "reference": b} for k, a, b in self.params_differences],
            "fingerprint_mismatches": [{"key": k, "reference": a, "here": b} for k, a, b in self.mismatches],
            "input_mismatches": [{"path": p, "reference": a, "here": b} for p, a, b in self.input_mismatches],
            "num_threads": self.params.train.num_threads,
            "fingerprint": self.fingerprint,
            "reference_fingerprint": self.reference.manifest.get("fingerprint"),
            "reruns": [
                {
                    "identical": r.identical,
                    "steps_checked": r.steps_checked,
                    "runtime_s": round(r.runtime_s, 3),
                    "divergences": [dataclasses.asdict(d) for d in r.divergences],
                }
                for r in self.reruns
            ],
            "notes": self.notes,
        }
        return _finite(doc)

    def lines(self) -> list[str]:
        """The short human report."""
        t = self.params.train
        out = [f"reference: {self.reference.source} ({t.num_runs} run(s) x {t.steps} steps; "
               f"{', '.join(self._checked_names())})"]
        out += [f"note: {n}" for n in self.notes]
        for k, ref_v, here_v in self.mismatches:
            out.append(f"warning: this machine differs from the reference in {k}: reference {ref_v!r}, here {here_v!r}")
        for p, ref_sha, here_sha in self.input_mismatches:
            out.append(f"warning: {p} is not the file the reference was trained on "
                       f"(sha256 {ref_sha[:12]} recorded, {(here_sha or 'missing')[:12]} here)")
        if self.mismatches or self.input_mismatches:
            out.append("warning: the differences above are the likely cause of any divergence below")
        for i, r in enumerate(self.reruns):
            tag = f"rerun {i + 1}/{len(self.reruns)}: " if len(self.reruns) > 1 else ""
            if r.identical:
                out.append(f"{tag}BIT-IDENTICAL: all {r.steps_checked} recorded steps match ({r.runtime_s:.1f} s)")
                continue
            d = r.divergences[0]
            out.append(f"{tag}DIVERGED at run {d.run}, step {d.step}: {', '.join(d.tensors)} differ "
                       f"(checked {r.steps_checked} steps, {r.runtime_s:.1f} s)")
            out += [f"  {line}" for line in _detail_lines(d)]
            if len(r.divergences) > 1:
                steps = [f"{x.run}:{x.step}" if t.num_runs > 1 else str(x.step) for x in r.divergences]
                out.append(f"  {len(r.divergences)} divergent steps: {_abbrev(steps)}")
        out.append(f"verdict: {'bit-identical' if self.identical else 'diverged'} (exit {self.exit_code})")
        return out

    def _checked_names(self) -> list[str]:
        names = sorted(self.reference.manifest["digests"], key=CHECK_ORDER.index)
        return (["loss"] if "losses_f32" in self.reference.manifest else []) + names


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


class _Diverged(Exception):
    """Raised from the sink to end the rerun at the first divergent step."""


class StepCheck:
    """A recorder sink comparing each step with the reference while training produces it."""

    def __init__(self, ref: Reference, live: torch.Tensor | None, stop: bool) -> None:
        self.ref = ref
        self.live = live
        self.stop = stop
        m = ref.manifest
        self.digests = m["digests"]  # {tensor: [run][step] hex}
        self.losses = [[f32_bits(x) for x in run] for run in m["losses_f32"]] if "losses_f32" in m else None
        self.steps_checked = 0
        self.divergences: list[Divergence] = []

    def __call__(self, rec: StepRecord) -> None:
        bad = []
        if self.losses is not None and f32_bits(rec.loss) != self.losses[rec.run][rec.step]:
            bad.append("loss")
        for name in CHECK_ORDER[1:]:
            if name in self.digests and rec.digests[name].hex() != self.digests[name][rec.run][rec.step]:
                bad.append(name)
        self.steps_checked += 1
        if not bad:
            return
        d = Divergence(rec.run, rec.step, bad)
        if not self.divergences:
            self._detail(d, rec)
        self.divergences.append(d)
        if self.stop:
            raise _Diverged

    def _detail(self, d: Divergence, rec: StepRecord) -> None:
        traj = self.ref.trajectory
        for name in d.tensors:
            if name == "loss":
                d.detail["loss"] = {"reference": self.ref.manifest["losses_f32"][rec.run][rec.step], "rerun": rec.loss}
            elif traj is not None:
                theirs = traj.step(name, rec.step, rec.run)
                d.detail[name] = compare_slices(rec.tensors[name], theirs, self.live)
                if digest(theirs).hex() != self.digests[name][rec.run][rec.step]:
                    d.notes.append(f"the reference file's {name} at step {rec.step} does not match its own recorded "
                                   "digest: the file was changed after it was written")
        if traj is None and any(n != "loss" for n in d.tensors):
            d.notes.append("elementwise detail (elements, ULPs, token rows) needs the trajectory file: "
                           "run `flannel-repro verify PATH` on the run's file")


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

    live = load_masks(root / params.paths.masks, params.model.vocab_size).live_mask  # present: checked above
    reruns = []
    for _ in range(repeat):
        check = StepCheck(ref, live, stop=not full)
        start = time.perf_counter()
        try:
            train(params, root, observers=[check], write=False, progress=progress)
        except _Diverged:
            pass
        expected = params.train.num_runs * (params.train.steps + 1)
        if not check.divergences and check.steps_checked != expected:
            raise RuntimeError(f"rerun checked {check.steps_checked} of {expected} steps")  # a recorder bug
        reruns.append(Rerun(not check.divergences, check.steps_checked, time.perf_counter() - start, check.divergences))
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
        if logged.manifest.get("digests") != ref.manifest["digests"]:
            raise FlannelError(f"{path}: not the trajectory of MLflow run {run_id} (its digests differ from the "
                               "run's digests.json); give that run's file, or leave out one of the two")
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
