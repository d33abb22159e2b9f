"""`record.format: packed`: train writes the packed file while it runs. It is byte for byte what `pack` makes of the
safetensors file of the same run (sha256 of the bytes, not the reader's opinion), it unpacks to that safetensors
file, its numbers are the safetensors run's (one content digest), a stop and `--resume` at any point end in the same
bytes, and nothing is at the output path until the commit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_tiny_data, run_cli, write_params

from flannel_repro.audit.check import check
from flannel_repro.core.config import load_params
from flannel_repro.core.errors import ConfigError
from flannel_repro.core.safetensors_header import read_checked_header
from flannel_repro.trajectory.file import load_trajectory
from flannel_repro.trajectory.packed import pack, unpack

SAFE = "tensors/Flannel/1.20h_flannel_7.safetensors"
PACKED = "tensors/Flannel/1.20h_flannel_7.flpack"
STEPS = 40  # past a key frame (every 32 steps), so delta frames follow a key frame after it
RUN = {"train": {"num_runs": 2, "steps": STEPS, "checkpoint_every": 4}}
AS_PACKED = {"record": {"format": "packed"}, "paths": {"trajectory": PACKED}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_bytes(path: Path) -> bytes:
    """A safetensors file's data region (after its header): the numbers, without the params the header records."""
    return path.read_bytes()[read_checked_header(path).data_start:]


def project(tiny_data: Path, folder: Path, overrides: dict) -> Path:
    root = copy_tiny_data(tiny_data, folder)
    doc = {k: dict(v) for k, v in RUN.items()}
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    write_params(root, doc)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    """The same run recorded twice: as safetensors and straight into the packed form."""
    safe = project(tiny_data, tmp_path_factory.mktemp("safe"), {})
    packed = project(tiny_data, tmp_path_factory.mktemp("packed"), AS_PACKED)
    for root in (safe, packed):
        proc = run_cli("train", cwd=root)
        assert proc.returncode == 0, proc.stderr
    return safe, packed


def test_the_packed_run_is_what_pack_makes_of_its_safetensors_form(runs, tmp_path):
    safe, packed = runs
    out = packed / PACKED
    unpacked = tmp_path / "back.safetensors"
    unpack(out, unpacked)
    assert data_bytes(unpacked) == data_bytes(safe / SAFE)  # the numbers of the safetensors run, byte for byte
    pack(unpacked, tmp_path / "again.flpack")
    assert sha256(tmp_path / "again.flpack") == sha256(out)  # the packer and the training writer: one layout
    with load_trajectory(out) as p, load_trajectory(safe / SAFE) as s:
        assert p.metadata["content_digest"] == s.metadata["content_digest"]
    assert out.stat().st_size < (safe / SAFE).stat().st_size  # the default run: about 3x (docs/packed.md)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".flannel-tmp")]
    assert leftovers == []


def test_check_and_verify_take_the_packed_run(runs):
    _, packed = runs
    assert check(packed / PACKED).exit_code == 0
    proc = run_cli("verify", PACKED, cwd=packed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BIT-IDENTICAL" in proc.stdout


def test_metrics_report_the_size_and_the_ratio(runs):
    import json

    safe, packed = runs
    for root, path in ((safe, SAFE), (packed, PACKED)):
        metrics = json.loads((root / "metrics/train.json").read_text())
        assert metrics["trajectory_bytes"] == (root / path).stat().st_size
    plain = json.loads((safe / "metrics/train.json").read_text())
    small = json.loads((packed / "metrics/train.json").read_text())
    assert plain["trajectory_ratio"] == 1.0
    assert small["trajectory_ratio"] == round(plain["trajectory_bytes"] / small["trajectory_bytes"], 3)
    assert small["content_digest"] == plain["content_digest"]


def _train_process(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flannel_repro", "train", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("signum, after", [(signal.SIGTERM, 6), (signal.SIGKILL, 37), (signal.SIGKILL, 60)])
def test_a_stopped_or_killed_packed_run_resumes_to_the_same_bytes(runs, tmp_path, tiny_data, signum, after):
    """Stopped by SIGTERM, or killed with SIGKILL (no chance to clean up), at a point chosen by the progress the
    frames file shows: `train --resume` ends with the uninterrupted run's bytes. Of the 82 (run, step)s the two runs
    record, the 37th is in run 1's second key-frame span and the 60th in run 2."""
    _, packed = runs
    root = project(tiny_data, tmp_path / "p", AS_PACKED)
    proc = _train_process(root)
    folder = root / PACKED
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        frames = [p for p in folder.parent.glob(".flannel-tmp-*.frames.*")]
        if frames and _steps_in(frames[0]) >= after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    assert not folder.exists()  # nothing at the output path until the commit
    done = run_cli("train", "--resume", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sha256(folder) == sha256(packed / PACKED)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".flannel-tmp")] == []


def test_a_full_disk_while_training_keeps_the_partial_run_and_the_resume_ends_in_the_same_bytes(tmp_path, tiny_data):
    """The disk of the trajectory fills up under a packed run (a real tmpfs, filled from outside while it trains; the
    checkpoints are on another disk, so the frames' own writes hit it): one line naming the file and the free space,
    exit 2, the partial run kept; with room again, `--resume` ends in the bytes of an uninterrupted run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "t.flpack"
        root = project(tiny_data, tmp_path / "p", {"record": {"format": "packed"}, "paths": {"trajectory": str(out)}})
        proc = _train_process(root)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            frames = list(disk.glob(".flannel-tmp-*.frames.*"))
            if frames and _steps_in(frames[0]) >= 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        _, err = proc.communicate(timeout=300)
        lines = [x for x in err.splitlines() if "steps/s" not in x]
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert lines[-1].startswith(f"flannel-repro train: error: {disk}/.flannel-tmp-t.flpack"), err
        assert "No space left on device" in lines[-1] and "`flannel-repro train --resume` continues" in lines[-1], err
        assert not out.exists()
        (disk / "filler").unlink()
        done = run_cli("train", "--resume", cwd=root)
        assert done.returncode == 0, done.stdout + done.stderr
        resumed = sha256(out)
        out.unlink()
        again = run_cli("train", cwd=root)
        assert again.returncode == 0, again.stdout + again.stderr
        assert sha256(out) == resumed
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_run_killed_after_its_packed_commit_is_known_by_its_file(runs):
    """Killed between the rename of the packed file and the end of the commit, a resume finds the complete file
    at the output path and says so (recognised by its header, read through the packed form)."""
    from flannel_repro.recording.output import _completed_here

    _, packed = runs
    with load_trajectory(packed / PACKED) as traj:
        metadata = dict(traj.metadata)
    assert _completed_here(packed / PACKED, metadata)
    assert not _completed_here(packed / PACKED, {**metadata, "params": metadata["params"].replace("40", "41")})


def _steps_in(frames: Path) -> int:
    """Frames written so far, counted in (run, step)s: the tiny run has one W chunk and one grad_W frame a step."""
    from flannel_repro.trajectory.packed import scan

    with open(frames, "rb") as f:
        return sum(1 for _, rec in scan(f, os.fstat(f.fileno()).st_size) if rec is not None) // 2


@pytest.mark.parametrize("record, paths, says", [
    ({"format": "packed"}, {}, "record.format is packed but paths.trajectory is "
                              "'tensors/Flannel/1.20h_flannel_7.safetensors'; name it with .flpack"),
    ({}, {"trajectory": PACKED}, "record.format is safetensors but paths.trajectory is "
                                 f"'{PACKED}'; set record.format: packed, or name it .safetensors"),
    ({"format": "zarr"}, {}, "record.format = 'zarr' is not one of safetensors, packed"),
    ({"format": "packed", "steps": 5}, {"trajectory": PACKED}, "record.format = 'packed' needs record.steps: every"),
])
def test_a_format_that_does_not_fit_is_refused_in_one_line(tmp_path, tiny_data, record, paths, says):
    root = project(tiny_data, tmp_path / "p", {"record": record, "paths": paths})
    with pytest.raises(ConfigError) as e:
        load_params(root / "params.yaml")
    assert says in str(e.value)
    proc = run_cli("train", cwd=root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert says in proc.stderr
