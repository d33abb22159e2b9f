"""MLflow behind the tracking interfaces: with spool.py, the only modules of the package that import mlflow.

`MlflowTracker` is one MLflow run for a trajectory file (a parent with one child run per seed when `num_runs > 1`:
the parent holds the artifacts of the whole file, each child its own loss curve, and every child carries the
parent's params and tags so runs of different files, seeds and devices line up in the compare view). Once
training starts, a store outage costs it one warning line: what the store misses is kept (spool.py) and
sent at the end of the run or by `flannel-repro sync` (`sync`). Each run is tagged with its host and pid, so a
later command that opens the store closes, as KILLED, the runs of processes that died without closing them
(`close_dead_runs`). `MlflowAuditStore` is what `verify` reads the audited run from and logs its audit run to.
Both go through one guarded client: an unreachable server fails in seconds, MLflow's HTTP retries are bounded, and
any store failure is one FlannelError line. A `sqlite:///` store (the default, `mlflow.db` at the project root) is
created under a lock, with its artifacts beside it. The experiment is tagged as model training
(`mlflow.experimentKind`); `training_runs_url` is the UI page that shows it on its training runs.

    tracker = MlflowTracker(tracking_uri(params.tracking, root), "flannel", "flannel7-seed42-500steps-cpu")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flannel_repro.core.credentials import basic_auth, has_password, redacted, scrub, without_user
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import pid_alive
from flannel_repro.core.store_uri import sqlite_path
from flannel_repro.tracking.base import SHA256_TAG, AuditRun, AuditStore, InputFile, Tracker, param_text
from flannel_repro.tracking.spool import PARENT_TAG, Outbox, deliver, locked_spool, pending_spools, spool_folder
from flannel_repro.trajectory.provenance import fingerprint_tags

FLUSH_EVERY = 50  # steps of metrics per MLflow call: ~22 s of the default run, so the UI's charts stay live
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
SYSTEM_METRICS_STOP_S = 5.0  # the most a run's end waits for the system metrics thread (a hung store)
RUN_NAME_TAG = "mlflow.runName"  # setting it renames the run
VERDICT_TAG = "flannel.verdict"
PROBE_TIMEOUT_S = 3.0
# MLflow's HTTP client retries a failed call 7 times with a backoff of up to 2 minutes, and waits 120 s for an answer:
# about 4 minutes per call against a dead server. Unless the user set them, a failed call here costs seconds.
HTTP_RETRY_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # MLflow prints "View run ... at URL" with the URI as given, a password included; this module prints the run's
    # URL itself, redacted
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_BATCH_LIMIT = 1000  # MLflow's limit on metrics in one log_batch call
_PARAMS_TAGS_LIMIT = 100  # ... and on params or tags
_TAG_LIMIT = 5000  # error messages are cut to this (MLflow tag values hold 8000 characters)
_DIGEST_LIMIT = 36  # MLflow stores a dataset digest in a 36-character column
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # MLflow 3's "Machine learning" experiments: training runs, not traces
# MLflow 3.17's UI picks its GenAI or "Model training" layout from a per-browser switch, not from KIND_TAG; this URL
# parameter selects the training layout (mlflow/mlflow#24498).
TRAINING_VIEW = "workflowType=machine_learning"
def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds if an http(s) tracking server does not answer: MLflow's own client retries for minutes."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    fix = "start it, point tracking.uri or MLFLOW_TRACKING_URI at a running server, or set tracking.enabled: false"
    # urllib takes no user part in a URL: the credentials go in a header, as MLflow's client sends them
    request = urllib.request.Request(without_user(uri).rstrip("/") + "/health")
    auth = basic_auth(uri)
    if auth is not None:
        request.add_unredirected_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # up, behind authentication: MLflow's credentials settle the rest
            return
        raise FlannelError(f"tracking server {redacted(uri)} answered HTTP {e.code} to /health, so it is not an "
                           f"MLflow server; {fix}") from None
    except (OSError, ValueError) as e:  # refused, unknown host, timed out (URLError is an OSError); a bad port
        reason = scrub(str(getattr(e, "reason", None) or e), uri)
        raise FlannelError(f"tracking server {redacted(uri)} is not reachable ({reason}); {fix}") from None


def _store_errors() -> tuple[type[Exception], ...]:
    """What a store that cannot be used raises: MLflow's own errors, and for a SQLite file the OS's and the
    database's (a path that cannot be created, a file that is not a database)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    # ImportError: the store's database driver is not installed (mysql://, postgresql://, ...)
    return MlflowException, OSError, SQLAlchemyError, ImportError


def check_artifact_home(experiment: str, artifact_location: str, uri: str) -> None:
    """Refuse a SQLite store whose experiment keeps its artifacts in the `mlruns` folder of another project: a
    copied or moved project's mlflow.db holds the absolute artifact paths of the folder it was made in, and every new
    run would write its artifacts there (MLflow stores them absolute and cannot change an experiment's location).
    That folder is another project's when it holds a database of the same name (a copy) or is gone (a move); an
    `mlruns` elsewhere (an experiment made by hand, MLflow's default `./mlruns` of wherever it ran) is left alone."""
    db = sqlite_path(uri)
    parts = urlsplit(artifact_location)
    if db is None or parts.scheme not in ("", "file"):
        return  # a server's or a remote artifact store: where the user put it
    from urllib.request import url2pathname

    location = Path(url2pathname(parts.path))
    home = Path(db).parent
    if location.parent.name != "mlruns" and location.name != "mlruns":
        return  # not the layout flannel-repro makes: a location the user chose
    made_in = location.parent.parent if location.parent.name == "mlruns" else location.parent
    with contextlib.suppress(OSError):
        if made_in.resolve() == home.resolve() or (made_in.is_dir() and not (made_in / Path(db).name).exists()):
            return
    raise FlannelError(
        f"{db}: MLflow experiment {experiment!r} keeps its artifacts in {location}, beside the store it was copied "
        f"or moved from ({made_in}), and new runs would write there; point tracking.uri at that store "
        f"(sqlite:///{made_in / Path(db).name}), or move {Path(db).name} and mlruns/ of this project aside to start "
        "a new store here (docs/tracking.md#a-copied-or-moved-project)")


def _client(uri: str):
    """An MlflowClient for `uri`; an http server is probed first (and MLflow's retries bounded), a SQLite store is
    opened (and created) here."""
    check_reachable(uri)
    if urlsplit(uri).scheme in ("http", "https"):
        for name, value in HTTP_RETRY_LIMITS.items():
            os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    # Its ERROR log repeats, with two tracebacks, the store error this module reports in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

    try:
        return _GuardedClient(MlflowClient(tracking_uri=uri), uri)
    except _store_errors() as e:
        raise _store_error(uri, e) from None


class StoreError(FlannelError):
    """A tracking store call failed; `error_code` is MLflow's (e.g. RESOURCE_ALREADY_EXISTS) where it gave one."""

    def __init__(self, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class _GuardedClient:
    """An MlflowClient whose every call turns a store failure into one FlannelError line, not a traceback."""

    def __init__(self, client: Any, uri: str) -> None:
        self._client, self._uri, self._errors = client, uri, _store_errors()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except self._errors as e:
                raise StoreError(str(_store_error(self._uri, e)), getattr(e, "error_code", None)) from None

        return call


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while it is opened (created and migrated on first use)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    lock_path = Path(db + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
    except OSError as e:
        raise _store_error(uri, e) from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _store_error(uri: str, e: Exception) -> FlannelError:
    if isinstance(e, ImportError):
        return FlannelError(f"tracking store {redacted(uri)} needs the Python package {e.name or str(e)!r}, which is "
                            "not installed; install it, or point tracking.uri or MLFLOW_TRACKING_URI at another store")
    lines = str(getattr(e, "message", e)).splitlines() or [type(e).__name__]
    why = next((x for x in lines if not x.startswith("(raised as a result of")), lines[0])  # SQLAlchemy's preamble
    return FlannelError(f"tracking store {redacted(uri)} cannot be used ({scrub(why, uri)}); fix tracking.uri or "
                        "MLFLOW_TRACKING_URI, or set tracking.enabled: false")


class MlflowTracker(Tracker):
    """One MLflow run for the file (a parent with a child per seed when `child_names` is given). Every call after the
    run is created goes through an `Outbox` (spool.py): once `tolerate_outages()` is called, a store outage
    is one warning line and the calls are kept in a spool under `spool` (`<project>/.flannel/tracking`)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        child_names: Mapping[int, str] | None = None,
        flush_every: int = FLUSH_EVERY,
        spool: Path | None = None,
        system_metrics: bool = False,
    ) -> None:
        self.uri = uri
        with _store_lock(uri):  # two runs creating a fresh SQLite store at once would race its schema migration
            self._open(uri, experiment, run_name, spool)
        self._system = _start_system_metrics(uri, self.run_id) if system_metrics else None
        self.child_names = dict(child_names or {})
        self.flush_every = flush_every
        self._params: dict[str, str] = {}
        self._pending: list[list[Any]] = []  # [key, value, ms, step] of metrics not yet sent
        self._pending_steps = 0
        self._children: dict[int, str] = {}  # run index -> child run id
        self._current = self.run_id  # where metrics go: the open child run, else the file's run

    def _open(self, uri: str, experiment: str, run_name: str, spool: Path | None) -> None:
        self.client = _client(uri)  # probes an http server first
        close_dead_runs(self.client, spool)
        try:
            self.experiment_id = self._experiment(experiment)
            tags = {"mlflow.source.name": "flannel-repro train", "mlflow.source.type": "LOCAL", "flannel.kind": "train",
                    "flannel.host": socket.gethostname(), "flannel.pid": str(os.getpid())}
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        except _store_errors() as e:
            raise _store_error(uri, e) from None
        self._tags: dict[str, str] = dict(tags)
        self.outbox = Outbox(self.client, uri, self.run_id, spool, probe=lambda: check_reachable(uri))

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if need be, tagged as model training unless it already has a kind (one made
        by an older flannel-repro gets the tag; a kind the user chose is kept)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None
            db = sqlite_path(self.uri)
            if db is not None:  # artifacts beside the database, not in whatever folder we run from
                location = (Path(db).parent / "mlruns").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND})
            except StoreError as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # a queued run beside us created it first
                    raise
            exp = self.client.get_experiment_by_name(name)
        if exp.lifecycle_stage == "deleted":
            raise FlannelError(f"MLflow experiment {name!r} is deleted in {redacted(self.uri)}; "
                               "restore it with `mlflow experiments restore` or choose another tracking.experiment")
        check_artifact_home(exp.name, exp.artifact_location, self.uri)
        if KIND_TAG not in exp.tags:
            self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
        return exp.experiment_id

    def tolerate_outages(self) -> None:
        self.outbox.tolerant = True
        # Each failed attempt would otherwise print urllib3's "Retrying ..." warning: the outbox says it in one line
        # (and the system metrics thread, which then stops, its own).
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)

    def stop_waiting(self) -> None:
        self.outbox.keep_only()

    def _runs(self) -> list[str]:
        return [self.run_id, *self._children.values()]

    def _log_batch(self, run_id: str, params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None):
        for kind, items in (("params", list((params or {}).items())), ("tags", list((tags or {}).items()))):
            for i in range(0, len(items), _PARAMS_TAGS_LIMIT):
                self.outbox.call("log_batch", run=run_id, **{kind: dict(items[i : i + _PARAMS_TAGS_LIMIT])})

    def set_name(self, name: str, children: Mapping[int, str] | None = None) -> None:
        self._log_batch(self.run_id, tags={RUN_NAME_TAG: name})
        for run, child_name in (children or {}).items():
            if run in self._children:
                self._log_batch(self._children[run], tags={RUN_NAME_TAG: child_name})

    def set_note(self, text: str, run: int | None = None) -> None:
        self._log_batch(self._children.get(run, self.run_id), tags={NOTE_TAG: text[:_TAG_LIMIT]})

    def log_params(self, params: Mapping[str, Any]) -> None:
        params = {k: param_text(v) for k, v in params.items()}
        self._params.update(params)
        for run_id in self._runs():
            self._log_batch(run_id, params=params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._tags.update(tags)
        for run_id in self._runs():
            self._log_batch(run_id, tags=tags)

    def resumed_from(self, run_id: str) -> None:
        self.set_tags({"flannel.resumed_from": run_id})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if len(self._pending) + len(metrics) > _BATCH_LIMIT:
            self.flush()
        now = int(time.time() * 1000)
        self._pending.extend([k, float(v), now, step] for k, v in metrics.items())
        self._pending_steps += 1
        if self._pending_steps >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        # Taken before the call, so that a call left in progress on the recording thread is not sent again.
        batch, self._pending, self._pending_steps = self._pending, [], 0
        if batch:
            self.outbox.call("log_batch", run=self._current, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.outbox.call("log_artifact", run=self.run_id, path=str(path), artifact_path=artifact_path)

    def log_inputs(self, files: Sequence[InputFile]) -> None:
        datasets = [_file_dataset(f) for f in files]
        for run_id in self._runs():
            self.outbox.call("log_inputs", run=run_id, datasets=datasets)

    def start_run(self, run: int, seed: int) -> None:
        if run not in self.child_names:
            return
        self.flush()
        child = self.outbox.call("create_run", experiment_id=self.experiment_id, run_name=self.child_names[run],
                                 tags={PARENT_TAG: self.run_id})
        self._log_batch(child, params={**self._params, "run.index": str(run), "run.seed": str(seed)}, tags=self._tags)
        self._children[run] = child
        self._current = child

    def end_run(self, run: int) -> None:
        self.flush()
        if self._current != self.run_id:
            self.outbox.call("set_terminated", run=self._current, status="FINISHED")
            self._current = self.run_id

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        self.flush()
        _stop_system_metrics(self._system)
        self._system = None
        open_runs = [self.run_id] if self._current == self.run_id else [self._current, self.run_id]
        for run_id in open_runs:
            if error is not None:
                self._log_batch(run_id, tags={"flannel.error": error[:_TAG_LIMIT]})
            self.outbox.call("set_terminated", run=run_id, status=status)
        self.pending = self.outbox.close()


def close_dead_runs(client: Any, spool: Path | None) -> None:
    """Close as KILLED the RUNNING train runs that a process of this host left open when it died (kill -9, power
    loss, OOM killer): their `flannel.host` tag is this host and no process has their `flannel.pid` any more. A run
    whose calls wait in a spool under `spool` is left to `flannel-repro sync`."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return
    quoted = host.replace("'", "\\'")
    runs = client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`flannel.host` = '{quoted}'",
                              max_results=1000)
    for run in runs:
        pid, run_id = run.data.tags.get("flannel.pid", ""), run.info.run_id
        if not pid.isdigit() or pid_alive(int(pid)) or (spool is not None and (spool / f"{run_id}.jsonl").exists()):
            continue
        why = f"process {pid} on {host} ended without closing this run (killed); closed by a later command"
        client.set_tag(run_id, "flannel.error", why)
        client.set_terminated(run_id, "KILLED")
        print(f"tracking: run {run_id} was left RUNNING by process {pid}, which is gone; closed it as KILLED",
              file=sys.stderr)


def sync(project: Path) -> list[str]:
    """`flannel-repro sync`: send every spool the project's train runs kept during store outages; one line each."""
    lines = []
    spools = pending_spools(project)
    for spool in spools:
        with locked_spool(spool) as (header, f):
            client = _client(_with_password(header["uri"], spool))
            sent = deliver(spool, client, f)
            close_dead_runs(client, spool.parent)
        lines.append(f"sync: sent the {sent} calls of run {header['run']} kept in {spool} to {header['uri']}")
    return lines or [f"sync: nothing to send ({spool_folder(project)} holds no spool)"]


def _with_password(uri: str, spool: Path) -> str:
    """A spool keeps its store's URI without the password (credentials.redacted): the one of MLFLOW_TRACKING_URI
    when that is the same store."""
    if not has_password(uri):  # a kept URI's password is ***
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env and redacted(env) == uri:
        return env
    raise FlannelError(f"{spool}: its tracking store {uri} needs the password the spool does not keep; set "
                       "MLFLOW_TRACKING_URI to that URI with its password, then run `flannel-repro sync` again")


def _file_dataset(f: InputFile) -> dict[str, str]:
    """An MLflow dataset for a file, as the arguments of mlflow.entities.Dataset. MLflow's digest column holds 36
    characters, so the digest is the first 36 hex digits of the sha256; the full sha256 is in the profile (and in the
    run's `inputs.<name>.sha256` tag)."""
    profile = {"sha256": f.sha256, "bytes": f.path.stat().st_size}
    return {
        "name": f.name,
        "digest": f.sha256[:_DIGEST_LIMIT],
        "source_type": "local",
        "source": json.dumps({"uri": f.path.resolve().as_uri()}),
        "profile": json.dumps(profile),
    }


class MlflowAuditStore(AuditStore):
    """The runs of an MLflow store, as `verify` reads and writes them."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def exists(self) -> bool:
        db = sqlite_path(self.uri)
        return db is None or Path(db).is_file()

    def run_manifest(self, run_id: str) -> dict[str, Any]:
        """The `digests.json` manifest a train run logged (`trajectory.manifest`): what `verify` audits a rerun
        against when only the run id is known. A child run's manifest is its parent's (one file for all seeds)."""
        client = _client(self.uri)
        run = _get_run(client, run_id, self.uri)
        owner = run.data.tags.get(PARENT_TAG, run_id)
        with tempfile.TemporaryDirectory(prefix="flannel-reference-") as tmp, _no_progress_bar():
            try:
                local = client.download_artifacts(owner, "digests.json", tmp)
            except StoreError:
                raise FlannelError(f"MLflow run {owner} in {redacted(self.uri)} has no digests.json artifact; give "
                                   "the id of a run logged by `flannel-repro train`") from None
            return json.loads(Path(local).read_text(encoding="utf-8"))

    def find_train_run(self, trajectory_sha256: str) -> str | None:
        """The newest finished train run that wrote a file with this sha256 (its `sha256` tag, or the
        `trajectory.sha256` of a run logged by flannel-repro 0.2), if any."""
        client = _client(self.uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return None
        for tag in (SHA256_TAG, "trajectory.sha256"):
            runs = client.search_runs(
                experiments, filter_string=f"tags.`{tag}` = '{trajectory_sha256}' and status = 'FINISHED'",
                order_by=["attributes.start_time DESC"], max_results=1,
            )
            if runs:
                return runs[0].info.run_id
        return None

    def log_audit_run(self, audited_run_id: str, audit: AuditRun) -> str:
        """Log a verify result as a run nested under the audited run (`mlflow.parentRunId`), from the rerun's start
        to its end, with the rerun's params and its steps checked, steps/s and verdict; tag the audited run with its
        latest verdict. Returns the audit run's id."""
        client = _client(self.uri)
        close_dead_runs(client, None)
        audited = _get_run(client, audited_run_id, self.uri)
        exp = client.get_experiment(audited.info.experiment_id)
        check_artifact_home(exp.name, exp.artifact_location, self.uri)
        first = "none" if audit.first_divergent_step is None else str(audit.first_divergent_step)
        tags = {
            "mlflow.source.name": "flannel-repro verify",
            "mlflow.source.type": "LOCAL",
            PARENT_TAG: audited_run_id,
            "flannel.kind": "audit",
            "flannel.audit_of": audited_run_id,
            VERDICT_TAG: audit.verdict,
            "flannel.first_divergent_step": first,
            **fingerprint_tags(audit.fingerprint),
            **audit.tags,  # the origin op of a divergence (tracing/origin.py)
        }
        start_ms = int(audit.started_at * 1000)
        end_ms = start_ms + int(audit.runtime_s * 1000)
        run_id = client.create_run(audited.info.experiment_id, start_time=start_ms,
                                   run_name=f"audit-{audited.info.run_name}", tags=tags).info.run_id
        from mlflow.entities import Metric, Param

        metrics = {"steps_checked": audit.steps_checked, "rerun_s": round(audit.runtime_s, 3),
                   "identical": float(audit.verdict == "identical")}
        if audit.steps_per_s is not None:
            metrics["steps_per_s"] = audit.steps_per_s
        if audit.first_divergent_step is not None:
            metrics["first_divergent_step"] = audit.first_divergent_step
        params = [Param(k, param_text(v)) for k, v in audit.params.items()]
        for i in range(0, len(params), _PARAMS_TAGS_LIMIT):
            client.log_batch(run_id, params=params[i : i + _PARAMS_TAGS_LIMIT])
        client.log_batch(run_id, metrics=[Metric(k, float(v), end_ms, 0) for k, v in metrics.items()])
        if audit.report is not None:
            client.log_artifact(run_id, str(audit.report))
        client.set_terminated(run_id, "FINISHED", end_time=end_ms)
        # The audited run shows its latest verdict (and where it comes from) in its own row and page.
        for key, value in ((VERDICT_TAG, audit.verdict), ("flannel.audit_run", run_id)):
            client.set_tag(audited_run_id, key, value)
        return run_id


def training_runs_url(uri: str, run_id: str) -> str:
    """The MLflow UI page of this run's experiment, on its training runs: on the tracking server itself, or where
    `mlflow ui --host 127.0.0.1` serves a local store (port 5000)."""
    experiment_id = _get_run(_client(uri), run_id, uri).info.experiment_id
    base = without_user(uri).rstrip("/") if urlsplit(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def _get_run(client, run_id: str, uri: str):
    try:
        return client.get_run(run_id)
    except StoreError as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise FlannelError(f"MLflow run {run_id!r} not found in {redacted(uri)}; check the run id and the tracking uri "
                           "(tracking.uri or MLFLOW_TRACKING_URI)") from None


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def _start_system_metrics(uri: str, run_id: str) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network and, where there is one, GPU, through psutil) for the
    run, sampled every SYSTEM_METRICS_INTERVAL_S on their own thread, as `system/...` metrics."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO line at each start and stop
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=uri)
    monitor.start()
    return monitor


def _stop_system_metrics(monitor: Any) -> None:
    """Stop the system metrics thread and send its last samples; a store that hangs costs at most
    SYSTEM_METRICS_STOP_S (the thread is a daemon, left to end with the process)."""
    if monitor is None:
        return
    import threading

    stopping = threading.Thread(target=monitor.finish, name="flannel-system-metrics-stop", daemon=True)
    stopping.start()
    stopping.join(SYSTEM_METRICS_STOP_S)
