"""`--resume` never destroys or invents data: a refused resume keeps every file and names what differs; the marker,
the partial trajectory and the checkpoint are checked against each other before training continues."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_tiny_data, run_cli, write_params

from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import TMP_PREFIX, sha256_file
from flannel_repro.core.safetensors_header import read_header
from flannel_repro.recording.checkpoint import checkpoint_root
from flannel_repro.training.loop import train

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
STEPS, EVERY, STOP = 12, 3, 7  # interrupted during step 7: the last checkpoint is step 6
PARAMS = {"train": {"steps": STEPS, "checkpoint_every": EVERY, "num_threads": None},
          "record": {"momentum": True}}


class Stop:
    """Ctrl-C during step STOP."""

    def __call__(self, rec) -> None:
        if rec.step == STOP:
            raise KeyboardInterrupt


@pytest.fixture
def threads():
    """Run with 1 torch thread (train.num_threads: null leaves the count to the environment), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def interrupted(tiny_project, threads) -> Path:
    """A project whose run was interrupted after the checkpoint of step 6."""
    params = load_params(write_params(tiny_project, PARAMS))
    with pytest.raises(KeyboardInterrupt):
        train(params, tiny_project, progress=False, observers=[Stop()])
    assert json.loads((checkpoint_root(tiny_project, TRAJ) / "resume.json").read_text())["step"] == 2 * EVERY
    return tiny_project


def _files(project: Path) -> dict[str, str]:
    """sha256 of every file the interrupted run left: partial trajectory, marker, checkpoints."""
    found = [*(project / TRAJ).parent.glob(f"{TMP_PREFIX}*"), *checkpoint_root(project, TRAJ).rglob("*")]
    return {str(p.relative_to(project)): sha256_file(p) for p in found if p.is_file() and p.name != "lock"}


def _resume(project: Path):
    return train(load_params(project / "params.yaml"), project, progress=False, resume=True)


def test_another_thread_count_is_named_and_every_file_is_kept(interrupted, tmp_path_factory, tiny_data):
    before = _files(interrupted)
    torch.set_num_threads(2)
    with pytest.raises(FlannelError, match=r"the interrupted run was recorded in another setting "
                                           r"\(fingerprint.torch_threads: 1 -> 2\); resume it in the same setting, or "
                                           r"run `flannel-repro train` without --resume to start over"):
        _resume(interrupted)
    assert _files(interrupted) == before  # nothing deleted, nothing touched
    torch.set_num_threads(1)
    done = _resume(interrupted)  # the right resume still finds everything, and matches an uninterrupted run
    solo = tmp_path_factory.mktemp("solo")
    copy_tiny_data(tiny_data, solo)
    assert done.sha256 == train(load_params(write_params(solo, PARAMS)), solo, progress=False).sha256


def test_other_code_is_refused_even_with_the_same_installed_metadata(interrupted, monkeypatch):
    """A checkout of another version over the same editable install keeps the install's metadata: the version that
    counts is the running code's own, so other code never resumes a partial run it did not record."""
    import flannel_repro

    before, recorded = _files(interrupted), flannel_repro.__version__
    monkeypatch.setattr(flannel_repro, "__version__", "0.0.1")
    with pytest.raises(FlannelError, match=rf"another setting \(versions.flannel-repro: '{recorded}' -> '0.0.1'\)"):
        _resume(interrupted)
    assert _files(interrupted) == before


@pytest.mark.parametrize("field, value, why", [
    ("run", 3, "run 4 of a file of train.num_runs = 1"),
    ("step", STEPS, f"step {STEPS} of a run of train.steps = {STEPS}"),
])
def test_marker_values_out_of_range_are_refused(interrupted, field, value, why):
    marker = checkpoint_root(interrupted, TRAJ) / "resume.json"
    doc = json.loads(marker.read_text())
    doc[field] = value
    forged = f"run-{doc['run']}/checkpoint-{doc['step']}"  # a checkpoint where the forged marker says
    shutil.copytree(marker.parent / "run-0/checkpoint-6", marker.parent / forged)
    doc["checkpoint"] = forged
    marker.write_text(json.dumps(doc))
    before = _files(interrupted)
    with pytest.raises(FlannelError, match=rf"resume.json: resume marker is corrupt \({why}\)"):
        _resume(interrupted)
    assert _files(interrupted) == before


def _w_offset(weights: Path) -> int:
    """Byte offset of W (transformer.wte.weight) in a checkpoint's model.safetensors."""
    header = read_header(weights, "weights")
    n = int.from_bytes(weights.read_bytes()[:8], "little")
    return 8 + n + header["transformer.wte.weight"]["data_offsets"][0]


def test_a_flipped_bit_in_the_checkpoint_weights_is_refused(interrupted):
    weights = checkpoint_root(interrupted, TRAJ) / "run-0/checkpoint-6/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[_w_offset(weights) + 100] ^= 0x01
    weights.write_bytes(bytes(data))
    before = _files(interrupted)
    with pytest.raises(FlannelError, match=r"model.safetensors: the checkpoint's W is not the one the trajectory "
                                           r"recorded at run 1, step 6 \(digest_W differs\)"):
        _resume(interrupted)
    assert _files(interrupted) == before


def test_another_runs_optimizer_state_is_refused(interrupted, tmp_path_factory, tiny_data):
    """A checkpoint file from another seed's run: Adam's moments of W are not the recorded ones."""
    other = tmp_path_factory.mktemp("other")
    copy_tiny_data(tiny_data, other)
    with pytest.raises(KeyboardInterrupt):
        train(load_params(write_params(other, {**PARAMS, "train": {**PARAMS["train"], "train_seed": 7}})), other,
              progress=False, observers=[Stop()])
    ours = checkpoint_root(interrupted, TRAJ) / "run-0/checkpoint-6/optimizer.pt"
    shutil.copy(checkpoint_root(other, TRAJ) / "run-0/checkpoint-6/optimizer.pt", ours)
    with pytest.raises(FlannelError, match=r"optimizer.pt: the checkpoint's momentum is not the one the trajectory "
                                           r"recorded at run 1, step 6"):
        _resume(interrupted)


def test_a_truncated_checkpoint_file_is_one_line(interrupted):
    state = checkpoint_root(interrupted, TRAJ) / "run-0/checkpoint-6/scheduler.pt"
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(FlannelError, match=r"scheduler.pt: checkpoint file is corrupt \(.*\); run `flannel-repro "
                                           r"train` without --resume to start over"):
        _resume(interrupted)


class _Payload:
    """A pickle that would create a file if it were ever loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_that_safe_loading_refuses_is_one_line_and_never_runs(interrupted, tmp_path):
    """Through the CLI: exit 2, one line, no advice to turn the protection off, and the payload never ran."""
    owned = tmp_path / "owned"
    rng = checkpoint_root(interrupted, TRAJ) / "run-0/checkpoint-6/rng_state.pth"
    torch.save({"cpu_rng_state": _Payload(owned)}, rng)
    proc = run_cli("train", "-q", "--resume", cwd=interrupted, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"flannel-repro train: error: {rng}: checkpoint file is not a plain tensor file (safe loading refuses what it "
        "holds, and it is never loaded otherwise); run `flannel-repro train` without --resume to start over")
    assert len(proc.stderr.splitlines()) == 2  # "resuming run 1/1 after step 6", then the error
    assert "weights_only" not in proc.stderr and not owned.exists()
