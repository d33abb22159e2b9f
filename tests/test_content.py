"""The content digest: one sha256 over the recorded numbers only, equal for runs that differ only in where they
write, what they log and how often, different as soon as one number differs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import copy_tiny_data, write_params
from safetensors import safe_open
from safetensors.torch import load_file

from flannel_repro.audit.check import check
from flannel_repro.core.config import load_params
from flannel_repro.training.stage import run_train_stage
from flannel_repro.trajectory.file import load_trajectory

NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL", torch.uint8: "U8"}


def documented_digest(path: Path) -> str:
    """The content digest exactly as the README defines it, from the tensors as safetensors loads them."""
    tensors = load_file(str(path))
    lines = ["flannel-content/1"]
    for name in sorted(k for k in tensors if not k.startswith("digest_")):
        t = tensors[name]
        per_step = f"digest_{name}" in tensors
        source = tensors[f"digest_{name}"] if per_step else t
        sha = hashlib.sha256(source.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        shape = json.dumps(list(t.shape), separators=(",", ":"))
        lines.append(f"{name} {NAMES[t.dtype]} {shape} {'steps' if per_step else 'bytes'}:{sha}")
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data) -> dict[str, tuple[Path, dict]]:
    """The tiny run four times: the baseline; other output paths with tracking on, another log_every and
    checkpoints every 2 steps; another train_seed; momentum recorded too. name -> (trajectory, metrics)."""
    root = tmp_path_factory.mktemp("content")
    copy_tiny_data(tiny_data, root)
    variants = {
        "baseline": {"paths": {"trajectory": "a.safetensors", "metrics": "a.json", "loss_curve": "a.csv"}},
        "elsewhere": {"paths": {"trajectory": "out/b.safetensors", "metrics": "out/b.json", "loss_curve": "out/b.csv"},
                      "tracking": {"enabled": True, "uri": "sqlite:///mlflow.db"},
                      "train": {"log_every": 3, "checkpoint_every": 2}},
        "seed 43": {"paths": {"trajectory": "c.safetensors", "metrics": "c.json", "loss_curve": "c.csv"},
                    "train": {"train_seed": 43}},
        "momentum": {"paths": {"trajectory": "d.safetensors", "metrics": "d.json", "loss_curve": "d.csv"},
                     "record": {"momentum": True}},
    }
    out = {}
    for name, overrides in variants.items():
        params = load_params(write_params(root, overrides))
        run_train_stage(params, root, progress=False)
        out[name] = (root / params.paths.trajectory, json.loads((root / params.paths.metrics).read_text()))
    return out


def test_paths_tracking_and_logging_change_the_file_but_not_the_content_digest(runs):
    (_, ma), (_, mb) = runs["baseline"], runs["elsewhere"]
    assert ma["trajectory_sha256"] != mb["trajectory_sha256"]  # the header's params differ
    assert ma["content_digest"] == mb["content_digest"]
    for path, metrics in (runs["baseline"], runs["elsewhere"]):
        assert load_trajectory(path).metadata["content_digest"] == metrics["content_digest"]


def test_another_seed_or_another_key_gives_another_content_digest(runs):
    digests = {name: metrics["content_digest"] for name, (_, metrics) in runs.items()}
    assert len({digests["baseline"], digests["seed 43"], digests["momentum"]}) == 3


def test_the_content_digest_is_what_the_readme_defines(runs):
    for path, metrics in runs.values():
        assert documented_digest(path) == metrics["content_digest"]


def test_check_recomputes_it(runs):
    for path, metrics in runs.values():
        report = check(path)
        assert report.intact, report.lines()
        assert report.content_digest == metrics["content_digest"]


def test_a_run_killed_after_sealing_its_header_still_resumes(tmp_path):
    """The writer fills in the content record and header digest just before the rename; a partial file caught in
    between has a header that is not the one a resume computes, and must still be accepted."""
    from flannel_repro.trajectory.file import TensorSpec, TrajectoryWriter

    specs = {"x": TensorSpec(torch.float32, (2, 3))}
    writer = TrajectoryWriter(tmp_path / "t.safetensors", specs, {"format": "test"})
    writer.write("x", (0,), torch.ones(3))
    writer.write("x", (1,), torch.zeros(3))
    writer.seal()
    writer.close()  # killed before the rename
    again = TrajectoryWriter(tmp_path / "t.safetensors", specs, {"format": "test"}, resume_from=writer.tmp_path)
    again.commit()
    assert again.content_digest == writer.content_digest
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["x"], torch.tensor([[1.0] * 3, [0.0] * 3]))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:  # the sealed header, not placeholders
        assert f.metadata()["content_digest"] == again.content_digest
