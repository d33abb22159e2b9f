"""What a train run's tracking could not deliver during a store outage: kept in a spool file and sent later.

Once training starts, `MlflowTracker` sends every store call through an `Outbox`. While the store answers, calls
go straight through. The first call that fails (after MLflow's HTTP retries, which the tracker bounds) prints one
warning line, and from then on the run does not wait for the store again: every call is appended to
`<project>/.flannel/tracking/<run id>.jsonl` (artifacts are linked or copied beside it) and training goes on. When
the run ends the outbox tries once more: if the store answers, the spool is sent and removed; if not, it stays for
`flannel-repro sync`. A spool is locked while its run writes or sends it, so it is never sent twice at once.

A call is kept in the very form it is sent in, one JSON object per line (`{"op": "log_batch", "run": ID, "metrics":
[[key, value, ms, step], ...]}`), and `send()` makes the MLflow call from it, live or from the spool. A child run
created during the outage gets a placeholder id (`pending-1`), replaced by the real one when it is sent.

    outbox = Outbox(client, uri, run_id, Path(".flannel/tracking"), probe)
    outbox.call("log_batch", run=run_id, metrics=[["loss", 4.5, 1700000000000, 12]])
    outbox.close()   # None: everything arrived; else the spool that `flannel-repro sync` sends
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flannel_repro.core.credentials import redacted
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import write_json

SPOOL_FORMAT = "flannel-tracking-spool/1"
PARENT_TAG = "mlflow.parentRunId"


def spool_folder(project: Path) -> Path:
    return Path(project) / ".flannel" / "tracking"


class Outbox:
    """The store calls of one tracking run; see the module docstring."""

    def __init__(self, client: Any, uri: str, run_id: str, folder: Path | None, probe: Callable[[], None]) -> None:
        self.client, self.uri, self.run_id, self.probe = client, uri, run_id, probe
        self.spool = Path(folder) / f"{run_id}.jsonl" if folder is not None else None
        self.tolerant = False  # set when training starts; before that a failure is an error
        self.kept = 0  # calls in the spool
        self.keeping = False  # keep every call without trying the store (keep_only)
        self._file = None
        self._refs = 0
        self._closed = False
        self._lock = threading.Lock()  # the spool file: a call left in progress on another thread may still end

    def call(self, op: str, **args: Any) -> Any:
        """Send one call, or keep it once the store has failed; returns what `send` returns (a created run's id)."""
        if self.kept == 0 and not self.keeping:
            try:
                return send(self.client, op, args, {})
            except FlannelError as e:
                if not self.tolerant or self.spool is None:
                    raise
                print(f"flannel-repro train: warning: tracking store {redacted(self.uri)} stopped answering "
                      f"({_short(e)}); training goes on and what it logs is kept in {self.spool}, sent when the run "
                      "ends if the store answers again, else by `flannel-repro sync`", file=sys.stderr)
        return self._keep(op, args)

    def keep_only(self) -> None:
        """A call is still in progress on another thread, on a store that may not answer: keep every later call
        (the run's end included) without trying the store, and leave the spool to `flannel-repro sync`. Without a
        spool folder there is nowhere to keep them, and calls go on trying the store."""
        self.keeping = self.spool is not None

    def _keep(self, op: str, args: dict[str, Any]) -> Any:
        with self._lock:
            if self._closed:  # the run has ended: a call that was left in progress ends with nothing to keep
                return None
            return self._keep_locked(op, args)

    def _keep_locked(self, op: str, args: dict[str, Any]) -> Any:
        if self._file is None:
            self._file = _open_locked(self.spool, "a")
            if self._file is None:
                raise FlannelError(f"{self.spool}: tracking spool is in use by another process")
            if self._file.tell() == 0:
                # the URI without its password: `flannel-repro sync` takes it from the environment again
                header = {"format": SPOOL_FORMAT, "uri": redacted(self.uri), "run": self.run_id}
                self._file.write(json.dumps(header) + "\n")
        if op == "create_run":
            self._refs += 1
            args = {**args, "ref": f"pending-{self._refs}"}
        if op == "log_artifact":  # the file may be a temporary one: keep a copy (a hard link when possible)
            args = {**args, "path": str(self._stash(Path(args["path"])))}
        self._file.write(json.dumps({"op": op, **args}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.kept += 1
        return args.get("ref")

    def _stash(self, path: Path) -> Path:
        folder = self.spool.with_suffix(".files") / str(self.kept)
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / path.name
        try:
            os.link(path, copy)
        except OSError:
            shutil.copy2(path, copy)
        return copy

    def close(self) -> Path | None:
        """The run has ended: if anything was kept, try the store once more. Returns the spool when it still holds
        calls the store did not take, else None."""
        with self._lock:
            self._closed = True
            if self._file is None:
                return None
            if self.keeping:
                self._file.close()  # releases the lock
                self._file = None
                return self.spool
            return self._deliver_now()

    def _deliver_now(self) -> Path | None:
        try:
            self.probe()
            sent = deliver(self.spool, self.client, self._file)
        except FlannelError:
            return self.spool
        finally:
            self._file.close()  # releases the lock
            self._file = None
        print(f"flannel-repro train: tracking store {redacted(self.uri)} answers again; sent the {sent} calls kept "
              "during the outage", file=sys.stderr)
        return None


def deliver(spool: Path, client: Any, locked: Any) -> int:
    """Send the calls of `spool` not sent yet, in order, then remove it; `locked` is the spool, open and locked by
    the caller. Progress is saved after each call, so a delivery cut short resumes where it stopped."""
    progress_path = spool.with_suffix(".sent")
    progress = _progress(progress_path)
    with open(spool, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    for i, line in enumerate(lines):
        if i < progress["sent"] or not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            if i == len(lines) - 1:  # cut short by the end of its process: that call was never kept
                break
            doc = None
        why = _call_problem(doc)
        if why is not None:
            raise FlannelError(f"{spool}: line {i + 2} is not a call the spool can send ({why}: {line[:60]!r}); "
                               "remove that line and run `flannel-repro sync` again")
        try:
            send(client, doc.pop("op"), doc, progress["ids"])
        except FlannelError as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise FlannelError(f"{spool}: line {i + 2} names run {doc.get('run')!r}, which the tracking store does "
                               "not hold (the spool was kept for another store, or the run was deleted); point "
                               "MLFLOW_TRACKING_URI at the spool's store, or move the spool away") from None
        progress["sent"] = i + 1
        write_json(progress_path, progress)
    for path in (spool.with_suffix(".files"),):
        shutil.rmtree(path, ignore_errors=True)
    progress_path.unlink(missing_ok=True)
    spool.unlink(missing_ok=True)
    return len(lines)


def _progress(path: Path) -> dict[str, Any]:
    """What a delivery cut short had sent: `{"sent": lines, "ids": {placeholder: run id}}`."""
    if not path.is_file():
        return {"sent": 0, "ids": {}}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not JSON, or not UTF-8
        doc = None
    if not (isinstance(doc, dict) and _natural(doc.get("sent")) and isinstance(doc.get("ids"), dict)
            and all(isinstance(v, str) for v in doc["ids"].values())):
        raise FlannelError(f"{path}: not the progress record of a tracking spool; remove it and run `flannel-repro "
                           "sync` again (the calls it had sent are sent again)")
    return doc


# What each kept call holds besides "op" and "run": the field, and what its value must be.
_CALL_FIELDS: dict[str, dict[str, str]] = {
    "log_batch": {},
    "create_run": {"experiment_id": "text", "run_name": "text", "tags": "texts"},
    "set_terminated": {"status": "text"},
    "log_artifact": {"path": "text"},
    "log_inputs": {"datasets": "datasets"},
}


def _call_problem(doc: Any) -> str | None:
    """Why a spool line is not a call `send` can make, or None: checked before the store is called."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    op = doc.get("op")
    if op not in _CALL_FIELDS:
        return f"no known call in its \"op\" ({_cut(op)})"
    if not isinstance(doc.get("run", ""), str):
        return "its \"run\" is not a run id"
    checks = {
        "text": lambda v: isinstance(v, str),
        "texts": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "datasets": lambda v: isinstance(v, list) and all(isinstance(d, dict) and all(isinstance(x, str) for x in
                                                                                     d.values()) for d in v),
    }
    for key, kind in _CALL_FIELDS[op].items():
        if not checks[kind](doc.get(key)):
            return f"its {key!r} is missing or malformed"
    if op == "log_batch":
        metrics = doc.get("metrics", [])
        if not (isinstance(metrics, list) and all(
                isinstance(m, list) and len(m) == 4 and isinstance(m[0], str) and _number(m[1]) and _natural(m[2])
                and _natural(m[3]) for m in metrics)):
            return "its metrics are not [key, value, ms, step] lists"
        for key in ("params", "tags"):
            if not checks["texts"](doc.get(key, {})):
                return f"its {key} are not a map of strings"
    return None


def _natural(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _cut(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text[:40]


def pending_spools(project: Path) -> list[Path]:
    return sorted(spool_folder(project).glob("*.jsonl"))


@contextlib.contextmanager
def locked_spool(spool: Path) -> Iterator[tuple[dict[str, Any], Any]]:
    """The spool's header and its file, locked; a FlannelError when its run is still writing it."""
    f = _open_locked(spool, "r+")
    if f is None:
        raise FlannelError(f"{spool}: its run is still going and sends it itself when it ends")
    with f:
        try:
            header = json.loads(f.readline())
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            header = None
        if not isinstance(header, dict) or header.get("format") != SPOOL_FORMAT:
            raise FlannelError(f"{spool}: not a tracking spool of flannel-repro; move it away")
        if not isinstance(header.get("uri"), str) or not isinstance(header.get("run"), str):
            raise FlannelError(f"{spool}: the spool's first line does not name its tracking store and run (\"uri\", "
                               "\"run\"); the spool is damaged: move it away")
        yield header, f


def _open_locked(path: Path, mode: str):
    """`path` opened and exclusively locked, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, mode, encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def send(client: Any, op: str, args: dict[str, Any], ids: dict[str, str]) -> Any:
    """Make the MLflow call a kept call describes; `ids` maps placeholder run ids to real ones (and is updated)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    run = ids.get(args.get("run"), args.get("run"))
    if op == "log_batch":
        client.log_batch(
            run,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in args.get("metrics", [])],
            params=[Param(k, v) for k, v in args.get("params", {}).items()],
            tags=[RunTag(k, ids.get(v, v) if k == PARENT_TAG else v) for k, v in args.get("tags", {}).items()],
        )
    elif op == "create_run":
        tags = {k: ids.get(v, v) for k, v in args["tags"].items()}
        created = client.create_run(args["experiment_id"], run_name=args["run_name"], tags=tags).info.run_id
        if "ref" in args:
            ids[args["ref"]] = created
        return created
    elif op == "set_terminated":
        client.set_terminated(run, args["status"])
    elif op == "log_artifact":
        client.log_artifact(run, args["path"], args.get("artifact_path"))
    elif op == "log_inputs":
        inputs = [DatasetInput(Dataset(**d), [InputTag("mlflow.data.context", "train")]) for d in args["datasets"]]
        client.log_inputs(run, datasets=inputs)
    else:
        raise FlannelError(f"tracking spool: unknown call {op!r}")
    return None


def _short(e: Exception) -> str:
    """The gist of a store error for the one warning line."""
    text = str(e)
    for gist in ("Connection refused", "timed out", "Name or service not known", "database is locked"):
        if gist in text:
            return gist.lower()
    return text[:160]
