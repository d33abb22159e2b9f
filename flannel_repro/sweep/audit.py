"""`--audit K`: K points of a sweep rerun with `verify` on another node than the one that trained each, and what
that says about the cluster, pair of node fingerprints by pair: whether they reproduce each other bit for bit.

`run_audit(task, node)` is what the Ray task calls (cluster.py), on the node chosen for it; like worker.py it only
runs programs in a scratch workspace of its own:

1. the workspace `<scratch>/<experiment name>-audit`: the project at the sweep's baseline, its inputs checked out
   (worker.workspace);
2. the point's experiment commit fetched from the project's git remote (`refs/exps/...`) and checked out, and its
   trajectory checked out of the shared DVC cache (or pulled from the DVC remote);
3. `flannel-repro verify --json` there: the trajectory's own recorded params rerun on this node, every recorded
   number compared bit for bit, the operator that broke determinism named when the run traced the step.

A verdict of "diverged" is a result, not a failure: it is what the audit measures.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

from flannel_repro.sweep.worker import PointFailed, PointResult, PointTask, dvc, run, workspace

VERDICTS = {"identical": "bit-identical", "diverged": "diverged", "corrupt": "reference corrupt"}  # verify's JSON


@dataclass(frozen=True)
class AuditTask:
    point: PointTask
    trained_on: str  # the node label of the point's training
    trained_fingerprint: str | None  # its fingerprint's short digest (nodes.py)
    device: str  # train.device, for this node's fingerprint


@dataclass(frozen=True)
class AuditResult:
    name: str
    trained_on: str
    verified_on: str
    trained_fingerprint: str | None
    verified_fingerprint: str | None
    verdict: str  # "bit-identical", "diverged", "reference corrupt" (verify's), or "failed": no verdict
    detail: str | None = None  # the first divergence and its origin op, or why there is no verdict
    wall_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        where = f"trained on {self.trained_on} ({self.trained_fingerprint}), verified on {self.verified_on} " \
                f"({self.verified_fingerprint})"
        return f"audit: {self.name} {where}: {self.verdict}" + (f": {self.detail}" if self.detail else "")


def run_audit(task: AuditTask, node: str) -> AuditResult:
    """Verify the point's trajectory on this node."""
    import time

    from flannel_repro.sweep.nodes import fingerprint_digest, node_fingerprint

    start = time.monotonic()
    p = task.point
    here = fingerprint_digest(node_fingerprint(task.device))
    ws = workspace(replace(p, name=f"{p.name}-audit"))
    ref = f"refs/exps/{p.baseline_rev[:2]}/{p.baseline_rev[2:]}/{p.name}"
    run(["git", "fetch", "--quiet", p.git_url, f"+{ref}:{ref}"], ws, "fetch the point's experiment")
    run(["git", "checkout", "--quiet", "--force", "--detach", ref], ws, "check out the point's experiment")
    dvc(["checkout" if p.cache_dir is not None else "pull", "--quiet", "train"], ws)
    env = {**os.environ}
    if p.tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = p.tracking_uri
    proc = subprocess.run([sys.executable, "-m", "flannel_repro", "verify", "--quiet", "--json"], cwd=ws, env=env,
                          capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode not in (0, 1):
        raise PointFailed(f"verify exited {proc.returncode}: {lines[-1] if lines else '(no output)'}")
    doc = json.loads(proc.stdout)
    found = [s.strip() for s in lines if s.lstrip().startswith(("DIVERGED", "ORIGIN:"))]
    return AuditResult(name=p.name, trained_on=task.trained_on, verified_on=node,
                       trained_fingerprint=task.trained_fingerprint, verified_fingerprint=here,
                       verdict=VERDICTS[doc["verdict"]], detail="; ".join(found) or None,
                       wall_s=round(time.monotonic() - start, 3))


def choose(results: list[PointResult], k: int, nodes: list[str], seed: str) -> list[tuple[PointResult, str]]:
    """`k` of the recorded points (drawn with `seed`, the sweep's commit, so the same sweep audits the same
    points), each with the node to verify it on: another node than the one that trained it, taken in turn; the
    same node only when the cluster has one."""
    done = sorted((r for r in results if r.status in ("finished", "done before") and r.content_digest),
                  key=lambda r: r.name)
    drawn = sorted(random.Random(seed).sample(done, min(k, len(done))), key=lambda r: r.name)
    out = []
    for i, r in enumerate(drawn):
        others = [n for n in nodes if n != r.node] or nodes
        out.append((r, others[i % len(others)]))
    return out


def pairs(audits: list[AuditResult]) -> dict[str, dict[str, int]]:
    """`trained fingerprint -> verified fingerprint`: how many audits, how many bit-identical."""
    out: dict[str, dict[str, int]] = {}
    for a in audits:
        key = f"{a.trained_fingerprint} -> {a.verified_fingerprint}"
        entry = out.setdefault(key, {"audited": 0, "bit_identical": 0, "diverged": 0, "no_verdict": 0})
        entry["audited"] += 1
        kind = {"bit-identical": "bit_identical", "diverged": "diverged"}.get(a.verdict, "no_verdict")
        entry[kind] += 1
    return out


def pair_lines(audits: list[AuditResult]) -> list[str]:
    out = []
    for key, n in pairs(audits).items():
        a, b = key.split(" -> ")
        same = "the same fingerprint" if a == b else "different fingerprints"
        out.append(f"audit: fingerprints {key} ({same}): {n['bit_identical']} of {n['audited']} bit-identical"
                   + (f", {n['diverged']} diverged" if n["diverged"] else "")
                   + (f", {n['no_verdict']} without a verdict" if n["no_verdict"] else ""))
    return out
