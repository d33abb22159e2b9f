"""`flannel-repro sweep`: every point of a grid trained on Ray, each one a DVC experiment and one MLflow run.

    report = sweep(SweepConfig(root=Path("."), overrides=("train.train_seed=range(42,46)",)))

The story, top to bottom: check the project (a git commit to start from, the train stage's inputs in the DVC
cache), expand the grid with DVC's own `-S` code, leave out the points that are already experiments of this
commit, start or join Ray and say whether its nodes differ, run the rest (worker.py, one Ray task each), bring the
experiments into this workspace (`dvc exp pull` from a git remote), and write the summary.

Where things go. On one machine (or a shared filesystem) every node clones this project and writes into its DVC
cache; on a cluster without one, `--git-remote` (a repository every node reaches) and `--dvc-remote` (a DVC remote
of this project) carry the code, the inputs and the results. The tracking store is the project's (`tracking.uri`,
$MLFLOW_TRACKING_URI or its mlflow.db); a cluster wants a `mlflow server` URI there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flannel_repro.core.config import Params, load_params
from flannel_repro.core.errors import ConfigError, FlannelError, Interrupted
from flannel_repro.core.fsutil import write_json
from flannel_repro.core.store_uri import sqlite_path, tracking_uri
from flannel_repro.sweep.audit import AuditResult, pair_lines, pairs
from flannel_repro.sweep.grid import expand_grid
from flannel_repro.sweep.worker import STOP_GRACE_S, PointFailed, PointResult, PointTask, dvc

# The sweep records each point without the verify stage's rerun (audit.verify: []); `--audit K` checks K of them.
NO_VERIFY = "audit.verify=[]"


@dataclass(frozen=True)
class SweepConfig:
    root: Path  # the project: its params.yaml, git repository and DVC cache
    overrides: tuple[str, ...] = ()  # -S section.key=VALUES, DVC's sweep syntax
    sweep_file: Path | None = None  # a YAML mapping of section.key to values (grid.py)
    address: str | None = None  # a Ray cluster; None: $RAY_ADDRESS, else Ray inside this process
    jobs: int | None = None  # at most this many points at once (default: as many as the CPUs allow)
    git_remote: str | None = None  # a git remote (name or URL) every node reaches; None: the project's own folder
    dvc_remote: str | None = None  # a DVC remote of the project (name); None: the project's cache, shared
    scratch: Path | None = None  # each node's folder for the points' workspaces
    retries: int = 3  # how often Ray retries a point whose worker died
    summary: Path | None = None  # the JSON summary (default: <root>/reports/sweep.json)
    audit: int = 0  # verify this many of the recorded points, each on another node than the one that trained it


@dataclass
class SweepReport:
    results: list[PointResult]
    started: str  # how Ray was reached
    nodes: dict[str, str] = field(default_factory=dict)  # node -> fingerprint digest
    notes: list[str] = field(default_factory=list)
    summary: Path | None = None
    audits: list[AuditResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every point is recorded (a diverged audit is a measurement, not a failure), 2 otherwise."""
        return 0 if all(r.status in ("finished", "done before") for r in self.results) else 2

    def to_json(self) -> dict:
        return {"format": "flannel-sweep/1", "ray": self.started, "nodes": self.nodes, "notes": self.notes,
                "points": [r.to_json() for r in self.results], "audits": [a.to_json() for a in self.audits],
                "audit_pairs": pairs(self.audits)}

    def lines(self) -> list[str]:
        head = ("experiment", "node", "content digest", "final loss", "dead", "wall s", "status")
        rows = [head] + [(r.name, r.node, (r.content_digest or "-")[:16], _num(r.final_loss, 4),
                          _num(r.dead_share, 3), _num(r.wall_s, 1), _status(r)) for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        table = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        tally = ", ".join(f"{n} {s}" for s, n in counts.items())
        audits = [*(a.line() for a in self.audits), *pair_lines(self.audits)]
        return [*table, *audits, f"sweep: {len(self.results)} points: {tally}; summary {self.summary}"]


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _status(r: PointResult) -> str:
    extra = " (resumed)" if r.resumed else ""
    return f"{r.status}{extra}" + (f": {r.message}" if r.message and r.status != "finished" else "")


def sweep(cfg: SweepConfig, say: Callable[[str], None] = print) -> SweepReport:
    from flannel_repro.sweep import cluster

    root = cfg.root.resolve()
    points = expand_grid(list(cfg.overrides), cfg.sweep_file)
    params = load_params(root / "params.yaml")
    rev = _baseline(root)
    # Each point checked as its workspace will read it (a bad value is a failed point, not a stop).
    tasks, failed, resources = [], [], {}
    source = _git_source(root, cfg.git_remote)
    cache_dir, dvc_remote = _data_route(root, cfg)
    uri = _tracking(params, root)
    done = _done(root, rev, source if cfg.git_remote else None)
    inputs = tuple(str(p.relative_to(root)) for p in params.paths.under(root).inputs().values())
    scratch = str(cfg.scratch or Path(tempfile.gettempdir()) / f"flannel-sweep-{os.getuid()}")
    results: dict[str, PointResult] = {}
    for overrides in points:
        overrides = overrides if any(o.startswith("audit.verify=") for o in overrides) else (*overrides, NO_VERIFY)
        name = point_name(rev, overrides)
        try:
            point_params = point_params_of(root, overrides)
        except ConfigError as e:
            failed.append(PointResult(name=name, overrides=overrides, node="-", status="failed", message=str(e)))
            continue
        if name in done:
            results[name] = _done_result(root, done[name], name, overrides)
            continue
        tasks.append(PointTask(name=name, overrides=overrides, git_url=source, baseline_rev=rev, scratch=scratch,
                               inputs=inputs, cache_dir=cache_dir, dvc_remote=dvc_remote, tracking_uri=uri))
        resources[name] = _resources(point_params, cfg.retries)
    if dvc_remote is not None and tasks:  # the inputs, for nodes without this machine's cache
        dvc(["push", "--quiet", "--remote", cfg.dvc_remote or "", *inputs], root)

    started = cluster.connect(cfg.address)
    report = SweepReport([], started)
    try:
        say(f"sweep: {len(points)} points ({len(results)} done before, {len(failed)} with a bad value, "
            f"{len(tasks)} to run); {started}")
        report.nodes, note = _check_nodes(cluster, params.train.device)
        if note:
            report.notes.append(note)
            say(f"sweep: note: {note}")
        running = cluster.Points(tasks, resources, cfg.jobs)
        try:
            for r in running.finished():
                results[r.name] = r
                say(f"sweep: {r.name} {_status(r)} on {r.node} ({', '.join(r.overrides)})")
        except KeyboardInterrupt:
            left = running.left()
            running.cancel(STOP_GRACE_S)
            _pull(root, cfg, [n for n, r in results.items() if r.status == "finished"])
            raise Interrupted(2, f"stopped: {len(results)} of {len(points)} points done, {len(left)} left (their "
                                 "checkpoints are kept); run the same command again to finish them") from None
        if cfg.audit:
            report.audits = _audit(cluster, cfg, params, rev, [*results.values()], tasks, say)
    finally:
        cluster.shutdown()
    _pull(root, cfg, [n for n, r in results.items() if r.status == "finished"])
    order = {point_name(rev, o if any(x.startswith("audit.verify=") for x in o) else (*o, NO_VERIFY)): i
             for i, o in enumerate(points)}
    report.results = sorted([*results.values(), *failed], key=lambda r: order.get(r.name, 0))
    report.summary = cfg.summary or root / "reports" / "sweep.json"
    write_json(report.summary, report.to_json())
    return report


def _audit(cluster, cfg: SweepConfig, params: Params, rev: str, results: list[PointResult],
           tasks: list[PointTask], say: Callable[[str], None]) -> list[AuditResult]:
    """Verify `cfg.audit` of the recorded points, each on another node than the one that trained it."""
    from flannel_repro.sweep.audit import AuditTask, choose

    nodes = cluster.alive_nodes()
    chosen = choose(results, cfg.audit, sorted(nodes), rev)
    if len(nodes) < 2:
        say("sweep: note: the cluster has one node: each audited point is verified on the node that trained it")
    by_name = {t.name: t for t in tasks}
    jobs = []
    for r, node in chosen:
        task = by_name.get(r.name) or _recorded_task(cfg, params, rev, r)
        jobs.append((AuditTask(task, r.node, r.fingerprint, params.train.device), nodes[node]))
    say(f"sweep: auditing {len(jobs)} point(s) with verify, each on another node")
    audits = cluster.run_audits(jobs, float(params.train.num_threads or 1))
    for a in audits:
        say(a.line())
    return audits


def _recorded_task(cfg: SweepConfig, params: Params, rev: str, r: PointResult) -> PointTask:
    """The task of a point done before (not run by this sweep), for its audit's workspace."""
    root = cfg.root.resolve()
    cache_dir, dvc_remote = _data_route(root, cfg)
    inputs = tuple(str(p.relative_to(root)) for p in params.paths.under(root).inputs().values())
    scratch = str(cfg.scratch or Path(tempfile.gettempdir()) / f"flannel-sweep-{os.getuid()}")
    return PointTask(name=r.name, overrides=r.overrides, git_url=_git_source(root, cfg.git_remote), baseline_rev=rev,
                     scratch=scratch, inputs=inputs, cache_dir=cache_dir, dvc_remote=dvc_remote,
                     tracking_uri=_tracking(params, root))


def point_name(rev: str, overrides: tuple[str, ...]) -> str:
    """The point's experiment name: a digest of the baseline commit (code, params, dvc.lock: the inputs) and the
    point's overrides, so the same point of the same commit is the same experiment, found and not rerun."""
    digest = hashlib.sha256("\n".join([rev, *overrides]).encode()).hexdigest()
    return f"sweep-{digest[:12]}"


def point_params_of(root: Path, overrides: tuple[str, ...]) -> Params:
    """The point's params as its workspace will have them: DVC's `-S` code applied to a copy of params.yaml."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory(prefix=".flannel-sweep-") as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_bytes((root / "params.yaml").read_bytes())
        try:
            apply_overrides(str(copy), list(overrides))
        except Exception as e:  # DVC's InvalidArgumentError, hydra's parse errors: one line naming the point
            raise ConfigError(f"-S {' '.join(overrides)}: {e}") from None
        try:
            return load_params(copy)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(copy), "params.yaml")) from None


def _resources(params: Params, retries: int):
    from flannel_repro.sweep.cluster import Resources

    threads = params.train.num_threads
    if threads is None:
        raise FlannelError("train.num_threads is null: set it (e.g. -S train.num_threads=1); the sweep asks Ray for "
                           "that many CPUs per run, and null means each node's own core count, so the bits would "
                           "change from node to node")
    gpus = 1.0 if params.train.device == "cuda" else 0.0
    return Resources(num_cpus=float(threads), num_gpus=gpus, max_retries=retries)


def _baseline(root: Path) -> str:
    """HEAD, refused while params.yaml, dvc.yaml, dvc.lock or the code differ from it: every point starts from the
    commit, not from the working tree."""
    try:
        rev = git(["rev-parse", "HEAD"], root).strip()
    except FlannelError:
        raise FlannelError(f"{root}: not a git repository with a commit; the sweep's points start from a commit "
                           "(git init, git add, git commit)") from None
    changed = git(["status", "--porcelain", "--untracked-files=no", "--", "params.yaml", "dvc.yaml", "dvc.lock",
                   "flannel_repro"], root).split("\n")
    changed = [line[3:] for line in changed if line.strip()]
    if changed:
        raise FlannelError(f"{', '.join(changed)}: changed since the last commit; commit them first (every point "
                           "of the sweep starts from the commit)")
    return rev


def _git_source(root: Path, remote: str | None) -> str:
    """What the nodes clone and push to: the project itself, or the git remote's URL."""
    if remote is None:
        return str(root)
    url = remote
    names = git(["remote"], root).split()
    if remote in names:
        url = git(["remote", "get-url", remote], root).strip()
    return url


def _data_route(root: Path, cfg: SweepConfig) -> tuple[str | None, str | None]:
    """(shared cache folder, DVC remote URL): the project's cache unless a DVC remote is named."""
    if cfg.dvc_remote is None:
        cache = dvc(["cache", "dir"], root).strip()
        return str((root / cache).resolve()), None
    if cfg.git_remote is None:
        raise FlannelError("--dvc-remote needs --git-remote too: the nodes that cannot see this machine's DVC cache "
                           "cannot see its git repository either")
    try:
        url = dvc(["config", f"remote.{cfg.dvc_remote}.url"], root).strip()
    except PointFailed:
        raise FlannelError(f"--dvc-remote {cfg.dvc_remote}: no such DVC remote in this project (dvc remote list); "
                           "add it with `dvc remote add NAME URL`") from None
    if "://" not in url and not os.path.isabs(url):  # DVC keeps a folder relative to .dvc/, where its config is
        url = str((root / ".dvc" / url).resolve())
    return None, url


def _tracking(params: Params, root: Path) -> str | None:
    """The store every point's run goes to: the project's, passed to the workspaces as MLFLOW_TRACKING_URI."""
    if not params.tracking.enabled:
        return None
    uri = tracking_uri(params.tracking, root)
    db = sqlite_path(uri)
    if params.tracking.uri and db is not None and not os.path.isabs(params.tracking.uri[len("sqlite:///"):]):
        raise FlannelError(f"params.yaml: tracking.uri {params.tracking.uri!r} is relative, so each point's "
                           "workspace would have a store of its own; give an absolute path or a server URI")
    return uri if params.tracking.uri is None else None


def _done(root: Path, rev: str, remote: str | None) -> dict[str, str]:
    """The experiments of commit `rev` already here (and on the git remote): name -> its commit."""
    prefix = f"refs/exps/{rev[:2]}/{rev[2:]}/"
    found = {}
    for line in git(["for-each-ref", "--format=%(objectname) %(refname)", prefix], root).splitlines():
        sha, ref = line.split()
        found[ref[len(prefix):]] = sha
    if remote is not None:
        missing = {}
        for line in git(["ls-remote", remote, f"{prefix}*"], root).splitlines():
            sha, ref = line.split()
            if ref[len(prefix):] not in found:
                missing[ref[len(prefix):]] = sha
        if missing:
            dvc(["exp", "pull", "--quiet", remote, *missing], root)
            found.update(missing)
    return found


def _done_result(root: Path, sha: str, name: str, overrides: tuple[str, ...]) -> PointResult:
    """A point already an experiment: its metrics and node, read from the experiment's commit."""
    params = load_params(root / "params.yaml")
    try:
        metrics = json.loads(git(["show", f"{sha}:{params.paths.metrics}"], root))
    except (FlannelError, json.JSONDecodeError):
        metrics = {}
    try:
        made = json.loads(git(["log", "-1", "--format=%B", sha], root))
    except json.JSONDecodeError:
        made = {}
    return PointResult(name=name, overrides=overrides, node=made.get("node", "?"), status="done before",
                       content_digest=metrics.get("content_digest"), trajectory_sha256=metrics.get("trajectory_sha256"),
                       final_loss=metrics.get("final_loss"), dead_share=metrics.get("dead_share"),
                       fingerprint=made.get("fingerprint"))


def _check_nodes(cluster, device: str) -> tuple[dict[str, str], str | None]:
    """Each node's fingerprint digest; a note when they are not all one (bit-identity is then not to be expected
    between points trained on different ones)."""
    from flannel_repro.sweep.nodes import describe, fingerprint_digest

    fps = cluster.node_fingerprints(device)
    digests = {node: fingerprint_digest(fp) for node, fp in fps.items()}
    kinds: dict[str, list[str]] = {}
    for node, d in digests.items():
        kinds.setdefault(d, []).append(node)
    if len(kinds) < 2:
        return digests, None
    parts = [f"{d} on {', '.join(nodes)} ({describe(fps[nodes[0]])})" for d, nodes in kinds.items()]
    return digests, (f"the nodes differ in fingerprint: {'; '.join(parts)}; points trained on different ones are "
                     "not expected to be bit for bit alike (--audit measures it)")


def _pull(root: Path, cfg: SweepConfig, names: list[str]) -> None:
    """Bring the new experiments (refs, and their outputs from the DVC remote) into this workspace."""
    if cfg.git_remote is None or not names:
        return  # pushed straight into this repository, outputs into its cache
    cache = ["--no-cache"] if cfg.dvc_remote is None else ["--remote", cfg.dvc_remote]
    dvc(["exp", "pull", "--quiet", "--force", *cache, _git_source(root, cfg.git_remote), *names], root)


def git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise FlannelError(f"git {args[0]} in {cwd}: {why}")
    return proc.stdout

