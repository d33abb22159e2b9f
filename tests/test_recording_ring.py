"""The recording ring: steps are digested, written and observed on a writer thread, in order, with the same bytes
as synchronous recording; an observer's error or Ctrl-C stops the run with nothing recorded out of order, no file
at the output path, and a resume still ends in the uninterrupted run's sha256."""

from __future__ import annotations

import errno
import hashlib
import math
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_params
from safetensors.torch import load_file

from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import TMP_PREFIX
from flannel_repro.recording.records import StepRecord
from flannel_repro.recording.ring import OBSERVER_GRACE_S, RING_SLOTS, RecordingRing
from flannel_repro.training.loop import train

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
PREVIOUS = b"a previous trajectory that no failed run may touch\n"
STEPS = 12


class Seen:
    """Keeps the step numbers it was given and the sha256 of each recorded slice, as it saw them."""

    def __init__(self, delay: float = 0.0) -> None:
        self.steps: list[int] = []
        self.sha: list[dict[str, bytes]] = []
        self.delay = delay

    def __call__(self, rec) -> None:
        time.sleep(self.delay)
        self.steps.append(rec.step)
        self.sha.append({n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).digest()
                         for n, t in rec.tensors.items()})


class Fail:
    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    def __call__(self, rec) -> None:
        if rec.step == self.step:
            raise self.error


@pytest.fixture
def project(tiny_project) -> Path:
    write_params(tiny_project, {"train": {"steps": STEPS, "checkpoint_every": 0},
                                "record": {"momentum": True, "variance": True}})
    (tiny_project / TRAJ).write_bytes(PREVIOUS)
    return tiny_project


def _temps(project: Path) -> list[str]:
    return sorted(p.name for p in (project / TRAJ).parent.glob(f"{TMP_PREFIX}*"))


class Threads:
    """The intra-op thread count that observers run with."""

    def __init__(self) -> None:
        self.counts: set[int] = set()

    def __call__(self, rec) -> None:
        self.counts.add(torch.get_num_threads())


def test_writer_thread_runs_single_threaded_and_leaves_training_threads_alone(project):
    """Observers on the writer thread get one intra-op thread (no second OpenMP team beside training's); the training
    thread keeps its count, and so do threads started after the ring (torch's process-wide default is put back)."""
    write_params(project, {"train": {"num_threads": 2}})
    params = load_params(project / "params.yaml")
    on_writer, on_training = Threads(), Threads()
    train(params, project, observers=[on_writer], progress=False)
    train(params, project, observers=[on_training], progress=False, ring_slots=0)
    assert on_writer.counts == {1}
    assert on_training.counts == {2}
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]


def test_ring_writes_the_bytes_of_synchronous_recording_even_when_full(project):
    """A slow observer keeps every slot in flight (the training thread waits); the file, its digests and what each
    observer sees are the same as with synchronous recording (ring_slots=0) and a ring of one slot."""
    params = load_params(project / "params.yaml")
    runs = {}
    for slots, delay in ((0, 0.0), (1, 0.0), (RING_SLOTS, 0.05)):
        seen = Seen(delay)
        result = train(params, project, observers=[seen], progress=False, ring_slots=slots)
        runs[slots] = result.sha256, seen.steps, seen.sha, result.losses
    assert runs[0] == runs[1] == runs[RING_SLOTS]
    sha, steps, seen_sha, _ = runs[RING_SLOTS]
    assert steps == list(range(STEPS + 1))
    d = load_file(str(project / TRAJ))
    for t in range(STEPS + 1):  # every observer saw the slices the file holds, not a reused slot's later contents
        for name in ("W", "grad_W", "momentum", "variance"):
            assert seen_sha[t][name] == bytes(d[f"digest_{name}"][0, t].tolist()), (t, name)


@pytest.mark.parametrize("slots", [0, RING_SLOTS])
def test_an_observer_error_stops_the_run_with_nothing_after_its_step(project, slots):
    before, after, k = Seen(), Seen(), 5
    with pytest.raises(RuntimeError, match="^observer failed at step 5$"):
        train(load_params(project / "params.yaml"), project, observers=[before, Fail(k, RuntimeError(
            f"observer failed at step {k}")), after], progress=False, ring_slots=slots)
    assert before.steps == list(range(k + 1))  # in order, and nothing after the failed step reaches any observer
    assert after.steps == list(range(k))
    assert (project / TRAJ).read_bytes() == PREVIOUS
    assert _temps(project) == []


def test_a_write_error_on_the_writer_thread_is_one_line(project):
    full = OSError(errno.ENOSPC, "No space left on device", str(project / "tensors"))
    with pytest.raises(FlannelError) as e:
        train(load_params(project / "params.yaml"), project, observers=[Fail(3, full)], progress=False)
    # Raised on the writer thread, it reaches the user as the same one line as on the training thread.
    assert re.fullmatch(re.escape(f"{project / 'tensors'}: cannot write the trajectory (No space left on device, ")
                        + r"[\d,]+ bytes free\); free space there and run again", str(e.value))
    assert (project / TRAJ).read_bytes() == PREVIOUS
    assert _temps(project) == []


def test_interrupted_ring_run_resumes_to_the_uninterrupted_bytes(project, tmp_path):
    """Interrupted on the writer thread a few steps after a checkpoint: the marker names a step that is in the
    file, and the resumed file is bit-identical to a run that was never interrupted."""
    write_params(project, {"train": {"steps": STEPS, "checkpoint_every": 3}})
    params = load_params(project / "params.yaml")
    reference = tmp_path / "reference"
    shutil.copytree(project, reference)
    expected = train(params, reference, progress=False).sha256

    with pytest.raises(KeyboardInterrupt, match="`flannel-repro train --resume` continues after run 1, step 6$"):
        train(params, project, observers=[Seen(0.02), Fail(8, KeyboardInterrupt())], progress=False)
    assert (project / TRAJ).read_bytes() == PREVIOUS
    assert len(_temps(project)) == 1
    assert train(params, project, progress=False, resume=True).sha256 == expected


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flannel_repro.core.config import load_params
    from flannel_repro.training.loop import train

    def slow(rec):  # the writer thread falls behind: the training thread soon waits for a free slot
        print(f"seen {rec.step}", file=sys.stderr, flush=True)
        time.sleep(0.5)

    try:
        train(load_params("params.yaml"), Path("."), observers=[slow], progress=False)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
""")


def test_sigint_while_the_ring_is_full_stops_promptly_and_leaves_nothing(project):
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=project, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:
        if line == "seen 2\n":  # 1 s in: training (milliseconds a step) has filled every slot long ago
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, rest
    assert time.monotonic() - sent < 30  # the writer finishes the step it is on (0.5 s), drops the rest
    lines = rest.splitlines()
    assert lines[-1] == "interrupted"
    assert all(ln.startswith("seen ") for ln in lines[:-1]) and len(lines) <= 2  # at most the step in progress
    assert (project / TRAJ).read_bytes() == PREVIOUS
    assert _temps(project) == []


HUNG_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flannel_repro.core.config import load_params
    from flannel_repro.core.errors import Interrupted
    from flannel_repro.recording.stopping import StopSignals
    from flannel_repro.training.loop import train

    def hung(rec):  # a tracking store that stopped answering: its call blocks the writer thread for long
        print(f"seen {rec.step}", file=sys.stderr, flush=True)
        time.sleep(10)
        print(f"done {rec.step}", file=sys.stderr, flush=True)

    try:
        with StopSignals() as stops:
            train(load_params("params.yaml"), Path("."), observers=[hung], progress=False, stops=stops)
    except Interrupted as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
""")


def test_a_second_signal_stops_at_once_while_an_observer_hangs(project):
    """README (Interrupted runs): a second signal while a run is stopping stops it at once. The first one is a
    request for the next step boundary, which the training thread, waiting for a free slot, does not reach while
    the writer thread is stuck in an observer; the second must not wait for that observer either."""
    proc = subprocess.Popen([sys.executable, "-c", HUNG_CHILD], cwd=project, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line == "seen 0\n":
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(1)  # the request is noted; the training thread waits for a slot
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest
    assert rest.splitlines()[-1].startswith("stopped by SIGINT; no output was written"), rest
    assert "done 0" not in rest  # it did not wait for the hung observer call to return
    assert (project / TRAJ).read_bytes() == PREVIOUS
    assert _temps(project) == []


class Blocking:
    """An observer whose call takes `seconds` (or until released), with the ring's `abandoned()` hook."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.entered, self.release, self.told = seconds, threading.Event(), threading.Event(), False

    def __call__(self, rec) -> None:
        self.entered.set()
        self.release.wait(self.seconds)

    def abandoned(self) -> None:
        self.told = True


@pytest.mark.parametrize(("seconds", "left"), [(0.05, False), (60, True)])
def test_close_lets_a_slow_observer_finish_and_leaves_a_hung_one(seconds, left):
    """close() on an abort: an observer call that ends within the grace (a slow one) ends and is not reported
    abandoned, so tracking goes on normally; one that hangs is left running, the sinks are told, and close()
    returns at once after the grace. Either way no sink runs after close()."""
    slow, after = Blocking(seconds), Seen()
    ring = RecordingRing([slow, after], cuda=False)
    slot = ring.acquire()
    tensors = {"W": slot.copy("W", torch.zeros(4, 2, dtype=torch.bfloat16))}
    slot.ready()
    ring.submit(StepRecord(0, 0, math.nan, math.nan, math.nan, tensors), slot)
    assert slow.entered.wait(30)
    start = time.monotonic()
    ring.close()
    assert time.monotonic() - start < OBSERVER_GRACE_S + 5
    assert ring.abandoned is left and slow.told is left
    assert after.steps == []
    slow.release.set()
