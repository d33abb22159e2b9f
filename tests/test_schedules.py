"""record.steps: the (V, H) tensors of the scheduled steps only, while training runs (and the loss, gradient norm,
rate and batch are kept) at every step. Tiny runs of 10 steps, recorded every step and at steps 0, 3, 6, 9, 10."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import REPO, copy_tiny_data, run_cli, write_params
from corrupt import rewrite_content_record, rewrite_slice_digest, xor_byte

from flannel_repro.analysis.exposure import exposure_of
from flannel_repro.audit.check import check
from flannel_repro.audit.diff import diff
from flannel_repro.audit.reference import Reference, file_reference
from flannel_repro.audit.verify import verify
from flannel_repro.core.config import load_params
from flannel_repro.core.errors import ConfigError, FlannelError
from flannel_repro.data.masks import load_masks
from flannel_repro.training.inputs import load_inputs
from flannel_repro.training.loop import train
from flannel_repro.trajectory.file import load_trajectory, manifest
from flannel_repro.trajectory.layout import trajectory_layout

STEPS = 10
SCHEDULE = (0, 3, 6, 9, 10)  # record.steps: 3 over 10 steps (the last step is always recorded)
PER_STEP = ("W", "grad_W", "digest_W", "digest_grad_W")


def _params(root: Path, steps, **train):
    return load_params(write_params(root, {"train": {"steps": STEPS, **train}, "record": {"steps": steps}}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """(root, params, result) of the same run recorded every step and on the schedule."""
    out = {}
    for name, steps in (("every", "every"), ("sparse", 3)):
        root = copy_tiny_data(tiny_data, tmp_path_factory.mktemp(name))
        params = _params(root, steps)
        out[name] = (root, params, train(params, root, progress=False))
    return out


@pytest.mark.parametrize(("value", "steps"), [
    ("every", tuple(range(11))), ("3", SCHEDULE), ("log", (0, 1, 2, 4, 8, 10)), ("[0, 5, 7]", (0, 5, 7))])
def test_each_form_of_record_steps_resolves_to_its_steps(tmp_path, value, steps):
    params = load_params(write_params(tmp_path), [f"train.steps={STEPS}", f"record.steps={value}"])
    assert params.record.schedule(STEPS) == steps


def test_the_log_schedule_is_pythias():
    """0, 1, 2, 4, ..., 512, then every 1,000: Pythia's 154 checkpoints over its 143,000 steps."""
    params = load_params(REPO / "params.yaml", ["train.steps=143000", "record.steps=log"])
    got = params.record.schedule(143_000)
    assert len(got) == 154 and got[:12] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    assert got[-1] == 143_000 and all(b - a == 1000 for a, b in zip(got[11:], got[12:], strict=False))


@pytest.mark.parametrize(("value", "why"), [
    ("0", "must be at least 1"), ("sometimes", "is not a schedule"), ("[1, 2]", "starts at 0"),
    ("[0, 4, 4]", "increasing"), ("[0, 11]", "past the last step train.steps = 10"), ("true", "must be str or int")])
def test_a_bad_record_steps_is_one_line_naming_it(tmp_path, value, why):
    with pytest.raises(ConfigError) as e:
        load_params(write_params(tmp_path), [f"train.steps={STEPS}", f"record.steps={value}"])
    assert "record.steps" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_schedule_with_exit_2(tiny_project):
    proc = run_cli("train", "-S", "record.steps=-5", cwd=tiny_project)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "record.steps = -5" in proc.stderr


def test_the_default_layout_is_unchanged():
    """The default (every step) file has no schedule key and (R, S+1, V, H) tensors, as before record.steps."""
    specs = trajectory_layout(load_params(REPO / "params.yaml"))
    assert "recorded_steps" not in specs and specs["W"].shape == (1, 501, 10_000, 64)
    assert load_params(REPO / "params.yaml").record.steps == "every"


def test_the_file_holds_the_scheduled_steps_and_says_which(runs):
    _, _, every = runs["every"]
    _, params, sparse = runs["sparse"]
    with load_trajectory(every.trajectory) as a, load_trajectory(sparse.trajectory) as b:
        assert b.recorded_steps == SCHEDULE and a.recorded_steps == tuple(range(STEPS + 1))
        assert torch.equal(b["recorded_steps"], torch.tensor(SCHEDULE))
        for key in PER_STEP:
            assert b.shapes[key][1] == len(SCHEDULE) and a.shapes[key][1] == STEPS + 1
        # The same training: each recorded slice is the every-step run's slice at that step, bit for bit.
        for i, t in enumerate(SCHEDULE):
            for name in ("W", "grad_W"):
                assert torch.equal(b[name][0, i], a[name][0, t])
                assert torch.equal(b.step(name, t), a.step(name, t))
        # Every step's loss, gradient norm, rate and batch.
        for key in ("losses_f32", "grad_norm", "lr_schedule", "batch_indices"):
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes()  # bit for bit, NaN at t = 0 included
        # The reader works in recorded steps.
        assert torch.equal(b.token_rows("W", 7), a["W"][0, list(SCHEDULE), 7])
        assert torch.equal(b.token_rows("W", [7, 8], steps=slice(4, 10)), a["W"][0, [6, 9]][:, [7, 8]])
        assert torch.equal(b.step_block("W", 3, 10), a["W"][0, [3, 6, 9]])
        with pytest.raises(FlannelError, match="step 5 was not recorded .* nearest recorded steps are 3, 6"):
            b.step("W", 5)
        assert b.step("losses_f32", 5) == a.step("losses_f32", 5)
    assert sparse.trajectory.stat().st_size < every.trajectory.stat().st_size / 2
    assert sparse.content_digest != every.content_digest  # the schedule is part of the content


def test_check_and_verify_know_the_schedule(runs, tmp_path):
    root, _, sparse = runs["sparse"]
    report = check(sparse.trajectory)
    assert report.exit_code == 0 and report.n_slices == 2 * len(SCHEDULE)
    assert verify(file_reference(sparse.trajectory), root).verdict == "identical"
    # A flipped byte of W at index 3 is named at training step 9.
    bad = tmp_path / "bad.safetensors"
    xor_byte(sparse.trajectory, bad, "W", (0, 3), byte=10)
    first = check(bad).problems[0]
    assert (first.key, first.run, first.step) == ("W", 0, 9)
    # A schedule key edited with its content record rewritten: check compares it with the params' schedule.
    moved = tmp_path / "moved.safetensors"
    xor_byte(sparse.trajectory, moved, "recorded_steps", (1,), byte=0)  # 3 -> 2
    rewrite_content_record(moved)
    problems = check(moved).problems
    assert [p.key for p in problems] == ["recorded_steps"]


def test_verify_checks_the_loss_of_a_step_that_is_not_recorded(runs, tmp_path):
    """A loss changed at step 5 (no W there) with the content record rewritten to match: the rerun finds it."""
    root, _, sparse = runs["sparse"]
    edited = tmp_path / "edited.safetensors"
    xor_byte(sparse.trajectory, edited, "losses_f32", (0, 5), byte=0)
    rewrite_content_record(edited)
    assert check(edited).exit_code == 0
    rep = verify(file_reference(edited), root)
    assert rep.verdict == "diverged" and (rep.first.run, rep.first.step) == (0, 5)
    assert rep.first.tensors == ["loss"]


def test_diff_compares_recorded_steps_and_refuses_another_schedule(runs, tiny_data, tmp_path):
    root, params, sparse = runs["sparse"]
    _, _, every = runs["every"]
    with pytest.raises(FlannelError, match="record.steps = 'every'.* those of 3; diff compares the same recorded"):
        diff(sparse.trajectory, every.trajectory, root)
    same = diff(sparse.trajectory, sparse.trajectory, root)
    assert [r.step for r in same.rows] == list(SCHEDULE) and same.first is None
    # Another training seed: the first difference is the loss of step 1, which has no recorded W.
    other = copy_tiny_data(tiny_data, tmp_path)
    seed43 = train(_params(other, 3, train_seed=43), other, progress=False)
    result = diff(sparse.trajectory, seed43.trajectory, root)
    assert result.first == (0, 1, "loss") and [r.step for r in result.rows] == list(SCHEDULE)
    assert result.rows[1].differs[:2] == ("loss", "grad_W")  # step 3


def test_a_resumed_run_gives_the_same_bytes(runs, tiny_data, tmp_path, capfd):
    """Stopped after a checkpoint at step 4 (not a recorded step) of the second run, resumed: the same file, byte
    for byte, as the same two runs uninterrupted."""
    class StopAt:
        def __call__(self, rec) -> None:
            if (rec.run, rec.step) == (1, 5):
                raise KeyboardInterrupt

    whole_root = copy_tiny_data(tiny_data, tmp_path / "whole")
    whole = train(_params(whole_root, 3, num_runs=2, checkpoint_every=4), whole_root, progress=False)
    root = copy_tiny_data(tiny_data, tmp_path / "stopped")
    params = _params(root, 3, num_runs=2, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(params, root, progress=False, observers=[StopAt()])
    capfd.readouterr()
    resumed = train(params, root, progress=False, resume=True)
    assert "resuming run 2/2 after step 4" in capfd.readouterr().err  # from the unrecorded step's checkpoint
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (whole.trajectory, resumed.trajectory)]
    assert digest[0] == digest[1] and resumed.content_digest == whole.content_digest


def test_motion_and_indicators_follow_the_schedule(runs):
    """In-flight curves at the recorded steps (NaN between), equal to the every-step run's where both hold W."""
    _, _, every = runs["every"]
    _, _, sparse = runs["sparse"]
    for name in ("drift_dead", "force_live", "dist_dead", "cos_live", "dead_centroid"):
        a, b = every.motion[name][0], sparse.motion[name][0]
        assert all(b[t] == a[t] for t in SCHEDULE[1:]), name
        assert all(b[t] != b[t] for t in range(STEPS + 1) if t not in SCHEDULE), name  # NaN


def test_exposure_up_to_each_recorded_step(runs):
    root, params, sparse = runs["sparse"]
    masks = load_masks(root / params.paths.masks, params.model.vocab_size)
    tokens = load_inputs(params, root).tokens
    with load_trajectory(sparse.trajectory) as traj:
        ex = exposure_of(traj, tokens, masks)
        by = ex.seen_by(traj.recorded_steps)
    assert by.shape == (1, len(SCHEDULE), params.model.vocab_size)
    assert torch.equal(by[0, -1], ex.total[0]) and int(by[0, 0].sum()) == 0
    assert torch.equal(by[0, 2], ex.counts[0, 1:7].sum(dim=0))  # steps 1..6


def test_a_digests_only_reference_is_checked_at_the_recorded_steps(runs, tmp_path):
    """The manifest an MLflow run logs (digests.json) holds the recorded steps' digests: a slice changed at step 6
    (index 2) is named at step 6, and the rerun's later recorded steps match again."""
    root, _, sparse = runs["sparse"]
    flipped = tmp_path / "flipped.safetensors"
    xor_byte(sparse.trajectory, flipped, "W", (0, 2), byte=4)
    rewrite_slice_digest(flipped, "W", 0, 2)
    with load_trajectory(flipped) as traj:
        doc = manifest(traj)
        params = traj.params
    assert [len(run) for run in doc["digests"]["W"]] == [len(SCHEDULE)]
    report = verify(Reference("MLflow run abc", doc, params, run_id="abc"), root, full=True)
    assert [(d.step, d.tensors) for d in report.reruns[0].divergences] == [(6, ["W"])]
    assert report.reruns[0].steps_checked == STEPS + 1
    checked = report.to_json()["checked"][0]
    assert checked == "grad_W, W digests at each step record.steps = 3 recorded against the rerun"


@pytest.mark.parametrize("value", ["every", "1", "log"])
def test_a_run_too_long_for_the_disk_is_refused_whatever_the_schedule(tiny_project, value):
    """10**12 steps: sized without listing them (an every-step or every-1 schedule is counted, not built)."""
    proc = run_cli("train", "-q", "-S", "train.steps=1000000000000", "-S", f"record.steps={value}", cwd=tiny_project)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot reserve" in proc.stderr
