"""Ray, the engine under the sweep: it starts in this process or joins a cluster, places each point on a node with
the CPUs (or GPU) its run needs, retries a point whose worker died, and cancels the points left on Ctrl-C.

The only module that imports ray. A point is a plain Ray task (`run_point` of worker.py): `max_retries` covers a
worker or node that dies (kill -9, a lost node), `retry_exceptions=[WorkerLost]` a train killed by a signal; a point
that fails on its own (a bad value) comes back as a failed result and is not retried.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flannel_repro.core.errors import FlannelError
from flannel_repro.sweep.audit import AuditResult, AuditTask, run_audit
from flannel_repro.sweep.worker import PointFailed, PointResult, PointTask, WorkerLost, run_point

# The embedded Ray's object store: the tasks pass only small results, so the smallest store Ray allows will do.
EMBEDDED_OBJECT_STORE_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class Resources:
    num_cpus: float  # train.num_threads
    num_gpus: float  # 1 on CUDA
    max_retries: int


def connect(address: str | None, num_cpus: int | None = None) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray inside this process with `num_cpus` CPUs
    (default: this machine's cores). Returns what it did, for the sweep's first line."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"configure_logging": True, "logging_level": "ERROR", "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
            return f"joined the Ray cluster at {address}"
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=EMBEDDED_OBJECT_STORE_BYTES, **quiet)
    except ConnectionError as e:
        raise FlannelError(f"--address {address}: no Ray cluster answers there ({e}); start one with "
                           "`ray start --head` or leave --address out to run on this machine") from None
    return f"started Ray in this process with {cpus} CPUs"


def shutdown() -> None:
    import ray

    ray.shutdown()


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _point(task: PointTask) -> PointResult:
    """The Ray task: the point on whichever node Ray chose, a failure of the point itself returned as a result."""
    node = node_label()
    try:
        return run_point(task, node)
    except (PointFailed, FlannelError) as e:
        return PointResult(name=task.name, overrides=task.overrides, node=node, status="failed", message=str(e))


def node_label() -> str:
    """`<node ip>/<first 8 digits of the Ray node id>`: two nodes on one host stay apart."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def alive_nodes() -> dict[str, str]:
    """Each alive node's label (node_label) -> its Ray node id."""
    import ray

    return {f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}": n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _audit(task: AuditTask) -> AuditResult:
    """The Ray task of an audit: verify on the node it was pinned to; no verdict is a result that says why."""
    node = node_label()
    try:
        return run_audit(task, node)
    except (PointFailed, FlannelError) as e:
        return AuditResult(name=task.point.name, trained_on=task.trained_on, verified_on=node,
                           trained_fingerprint=task.trained_fingerprint, verified_fingerprint=None, verdict="failed",
                           detail=str(e))


def run_audits(tasks: list[tuple[AuditTask, str]], num_cpus: float) -> list[AuditResult]:
    """Each audit pinned to its node (a node id of alive_nodes), at most one at a time per node's free CPUs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(_audit)
    refs = [remote.options(num_cpus=num_cpus, max_retries=0,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(task)
            for task, node_id in tasks]
    out = []
    for ref, (task, _) in zip(refs, tasks, strict=True):
        try:
            out.append(ray.get(ref))
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            out.append(AuditResult(name=task.point.name, trained_on=task.trained_on, verified_on="?",
                                   trained_fingerprint=task.trained_fingerprint, verified_fingerprint=None,
                                   verdict="failed", detail=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
    return out


def _probe(device: str) -> tuple[str, dict[str, Any]]:
    from flannel_repro.sweep.nodes import node_fingerprint

    return node_label(), node_fingerprint(device)


def node_fingerprints(device: str) -> dict[str, dict[str, Any]]:
    """Every alive node's fingerprint for runs on `device`, each measured on that node (a task pinned to it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_probe)
    refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(device) for n in ray.nodes() if n["Alive"]]
    return dict(ray.get(refs))


class Points:
    """The submitted points, in flight: `finished()` yields each result as it comes (a point whose retries ran out
    is a failed result naming why); `cancel()` stops those left (Ctrl-C)."""

    def __init__(self, tasks: list[PointTask], resources: dict[str, Resources], jobs: int | None) -> None:
        import ray

        self._remote = ray.remote(_point)
        self._waiting = list(tasks)
        self._resources = resources
        self._jobs = jobs
        self._running: dict[Any, PointTask] = {}

    def _submit(self) -> None:
        while self._waiting and (self._jobs is None or len(self._running) < self._jobs):
            task = self._waiting.pop(0)
            r = self._resources[task.name]
            ref = self._remote.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=r.max_retries,
                                       retry_exceptions=[WorkerLost]).remote(task)
            self._running[ref] = task

    def finished(self) -> Iterator[PointResult]:
        import ray

        self._submit()
        while self._running:
            done, _ = ray.wait(list(self._running), num_returns=1)
            task = self._running.pop(done[0])
            yield self._result(done[0], task)
            self._submit()

    def _result(self, ref: Any, task: PointTask) -> PointResult:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # WorkerLost on the last try, or a bug
            why = f"{type(e.cause).__name__}: {e.cause}" if e.cause is not None else str(e).splitlines()[0]
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            why = f"its worker died on every try ({type(e).__name__})"
        except ray.exceptions.TaskCancelledError:
            why = "stopped"
        retries = self._resources[task.name].max_retries
        return PointResult(name=task.name, overrides=task.overrides, node="?", status="failed",
                           message=f"{why} (after {retries} retries)")

    def left(self) -> list[PointTask]:
        return [*self._running.values(), *self._waiting]

    def cancel(self, grace_s: float) -> None:
        """Cancel the running points (a KeyboardInterrupt in each task: its train stops at a step boundary and keeps
        its checkpoint) and wait up to `grace_s` for them to wind down."""
        import ray

        # A Ctrl-C from a terminal reaches the embedded Ray's own processes too: once they are gone there is
        # nothing left to cancel, and their workers' trains died with them (worker.py).
        with contextlib.suppress(ray.exceptions.RayError, ConnectionError):
            for ref in self._running:
                ray.cancel(ref, force=False)
            if self._running:
                ray.wait(list(self._running), num_returns=len(self._running), timeout=grace_s)
