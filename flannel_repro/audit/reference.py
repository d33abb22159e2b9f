"""What verify audits: a reference, read from a trajectory file or an MLflow run, checked before any rerun.

A reference is a trajectory's digest manifest (`trajectory.file.manifest`): the recorded params, device fingerprint
and input digests, the sha256 of every recorded (V, H) slice at every step and the content record. A file also
holds the tensors themselves; it is checked as `flannel-repro check` checks it but for the slices, which the rerun
reads (stepcheck.py).
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flannel_repro.audit.check import Inspection, Problem, inspect
from flannel_repro.core.config import Params, params_from_dict
from flannel_repro.core.errors import FlannelError
from flannel_repro.tracking.base import AuditStore
from flannel_repro.trajectory import content
from flannel_repro.trajectory.file import MANIFEST_FORMAT, Trajectory, check_provenance, load_trajectory, manifest
from flannel_repro.trajectory.layout import FORMAT, STEP_TENSORS, STEP_VALUES, recorded_tensors
from flannel_repro.trajectory.notebook import adopted_keys
from flannel_repro.trajectory.packed import PackedCorrupt, is_packed, kept_copy


@dataclass
class Reference:
    source: str  # what the user named: a path, or "MLflow run <id>"
    manifest: dict[str, Any] | None  # trajectory.manifest() form; None when the file's layout cannot be trusted
    params: Params | None  # the params the reference was trained with; None when they cannot be read
    trajectory: Trajectory | None = None  # the file itself, for elementwise detail; None for a run-id reference
    run_id: str | None = None  # the audited MLflow run, where known
    inspection: Inspection | None = None  # a file's integrity-checked view (check.py)
    problems: list[Problem] = field(default_factory=list)  # corruption found before any rerun
    # A notebook file, or a file adopted from one (audit/notebook.py): the keys it holds no recorded numbers for,
    # what the verdict covers (checked, not checked), what the report says first, and whether it names its device.
    unrecorded: frozenset[str] = frozenset()
    checks: tuple[list[str], list[str]] | None = None
    notes: list[str] = field(default_factory=list)
    device_recorded: bool = True

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
    """A trajectory file, checked as `flannel-repro check` checks it but for the slices, which the rerun reads. A
    packed file is unpacked first into a temporary folder that lives as long as the process (its frames checked on
    the way: a damaged one is a corrupt reference)."""
    source = str(path)
    if is_packed(Path(path)):
        folder = Path(tempfile.mkdtemp(prefix="flannel-unpacked-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        try:
            path = kept_copy(Path(path), folder)
        except PackedCorrupt as e:
            return Reference(source, None, None, problems=[Problem(e.key, e.what, e.run, e.step)])
    insp = inspect(path)  # FlannelError (exit 2) if it is not a trajectory at all
    if not insp.usable or insp.metadata.get("format") != FORMAT:
        insp.close()
        return Reference(source, None, insp.params, problems=list(insp.problems))
    traj = load_trajectory(path)
    try:
        doc = manifest(traj)
    except (KeyError, ValueError, TypeError) as e:
        raise FlannelError(f"{source}: trajectory header is incomplete or corrupt ({e}); re-record it with "
                           "`flannel-repro train`") from None
    return _checked(Reference(source, doc, insp.params, trajectory=traj, inspection=insp,
                              problems=list(insp.problems), unrecorded=adopted_keys(insp.metadata)))


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
    held = len(ref.params.record.schedule(t.steps))  # digests of the steps record.steps recorded; losses of all
    for key, rows in series.items():
        n = t.steps + 1 if key == "losses_f32" else held
        if len(rows) != t.num_runs or any(len(r) != n for r in rows):
            raise FlannelError(
                f"{ref.source}: {key} does not have {t.num_runs} run(s) x {n} steps; the reference is corrupt"
            )
    return ref


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
    from flannel_repro.core.config import TrackingConfig
    from flannel_repro.core.store_uri import tracking_uri
    from flannel_repro.tracking.mlflow_store import MlflowAuditStore

    return MlflowAuditStore(tracking_uri(current.tracking if current is not None else TrackingConfig(), root))
