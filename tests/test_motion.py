"""Token motion (drift, speed, force of live and dead tokens) computed in flight, the per-step CSV that carries it
(also after a resume), and reading a token's path from the mapped trajectory."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import copy_tiny_data, write_params
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flannel_repro.core.config import load_params
from flannel_repro.data.masks import load_masks
from flannel_repro.recording.indicators import INDICATOR_NAMES
from flannel_repro.recording.motion import MOTION_NAMES
from flannel_repro.training.loop import train
from flannel_repro.training.stage import write_reports
from flannel_repro.trajectory.file import load_trajectory

STEPS = 6  # conftest TINY


def motion_from_file(traj, masks, run: int) -> dict[str, list[float]]:
    """The motion curves recomputed from a finished file with plain masked means, step by step."""
    W = traj["W"][run].float()  # (steps+1, V, H)
    G = traj["grad_W"][run].float()
    prev = torch.cat([W[:1], W[:-1]])  # W_(t-1), W_0 at t = 0
    norms = {"drift": (W - W[0]).norm(dim=2), "speed": (W - prev).norm(dim=2), "force": G.norm(dim=2)}  # (steps+1, V)
    out = {}
    for kind, n in norms.items():
        out[f"{kind}_live"] = n[:, masks.live_mask].mean(dim=1).tolist()
        out[f"{kind}_dead"] = n[:, masks.dead_mask].mean(dim=1).tolist()
    return out


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data):
    """The tiny config with num_runs = 2, trained once, reports written."""
    root = tmp_path_factory.mktemp("two_runs")
    copy_tiny_data(tiny_data, root)
    params = load_params(write_params(root, {"train": {"num_runs": 2}}))
    result = train(params, root, progress=False)
    write_reports(params, result, root)
    return root, params, result


def test_motion_is_the_masked_mean_row_distance_of_each_run(two_runs):
    root, params, result = two_runs
    masks = load_masks(root / params.paths.masks, params.model.vocab_size)
    assert masks.n_live and masks.n_dead  # the tiny vocabulary has both kinds
    with load_trajectory(result.trajectory) as traj:
        for run in range(2):
            want = motion_from_file(traj, masks, run)
            for name in MOTION_NAMES:
                got = result.motion[name][run]
                assert got[0] == 0.0, (name, run)  # each run starts from W_initial, with a zero gradient
                assert got == pytest.approx(want[name], rel=1e-5, abs=1e-9), (name, run)
    # Tokens moved, dead ones too (weight decay 0: only Adam's update of a zero gradient... and tied embeddings).
    assert result.motion["drift_live"][0][STEPS] > 0 and result.motion["speed_live"][0][STEPS] > 0
    assert result.motion["force_live"][0][1] > result.motion["force_dead"][0][1]  # dead tokens get no input gradient


def test_csv_carries_motion_per_run_and_step(two_runs):
    root, params, result = two_runs
    rows = read_csv(root / params.paths.loss_curve)
    assert list(rows[0]) == ["run", "step", "loss", "grad_norm", "learning_rate", *MOTION_NAMES, *INDICATOR_NAMES]
    want = [(run, t) for run in range(2) for t in range(1, STEPS + 1)]
    assert [(int(r["run"]), int(r["step"])) for r in rows] == want
    for r in rows:
        run, t = int(r["run"]), int(r["step"])
        for name in MOTION_NAMES:
            assert float(r[name]) == result.motion[name][run][t]  # repr of the float32 value, exactly


class StopAt:
    """A step sink that interrupts training at (run, step), as Ctrl-C would."""

    def __init__(self, run: int, step: int) -> None:
        self.run, self.step = run, step

    def __call__(self, rec) -> None:
        if (rec.run, rec.step) == (self.run, self.step):
            raise KeyboardInterrupt


@pytest.mark.parametrize("num_runs, stop", [(1, (0, 5)), (2, (1, 4))], ids=["one-run", "second-of-two-runs"])
def test_resumed_run_writes_the_same_csv(tiny_project, two_runs, num_runs, stop):
    """The steps before the resume point are replayed from the partial file, so the motion of those steps (and of the
    first step after it, whose speed needs W_(t-1)) is the uninterrupted run's."""
    write_params(tiny_project, {"train": {"num_runs": num_runs, "checkpoint_every": 2}})
    params = load_params(tiny_project / "params.yaml")
    with pytest.raises(KeyboardInterrupt):
        train(params, tiny_project, progress=False, observers=[StopAt(*stop)])
    result = train(params, tiny_project, progress=False, resume=True)
    write_reports(params, result, tiny_project)

    if num_runs == 2:
        reference = (two_runs[0] / params.paths.loss_curve).read_bytes()
    else:
        fresh = tiny_project / "fresh"
        fresh.mkdir()
        for sub in ("data", "tensors"):
            (fresh / sub).symlink_to(tiny_project / sub)
        write_params(fresh, {"train": {"num_runs": 1}, "paths": {"trajectory": "fresh.safetensors"}})
        ref_params = load_params(fresh / "params.yaml")
        write_reports(ref_params, train(ref_params, fresh, progress=False), fresh)
        reference = (fresh / ref_params.paths.loss_curve).read_bytes()
    assert (tiny_project / params.paths.loss_curve).read_bytes() == reference


def test_no_dead_tokens_gives_nan_not_zero(tiny_project):
    """A masks file with every token live: the dead means are NaN (no tokens), never a made-up 0."""
    params = load_params(tiny_project / "params.yaml")
    path = tiny_project / params.paths.masks
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("n_dead_")}  # counts of the real dead set
    tensors = load_file(path)
    v = params.model.vocab_size
    tensors.update(live_mask=torch.ones(v, dtype=torch.bool), dead_mask=torch.zeros(v, dtype=torch.bool),
                   live_indices=torch.arange(v), dead_indices=torch.zeros(0, dtype=torch.int64))
    save_file(tensors, path, metadata=meta)
    result = train(params, tiny_project, progress=False)
    assert all(math.isnan(x) for x in result.motion["drift_dead"][0])
    assert all(math.isfinite(x) for x in result.motion["drift_live"][0])


# Reading a token's path


@pytest.mark.parametrize("name", ["W", "grad_W"])
def test_token_rows_match_the_full_tensor(two_runs, name):
    _, _, result = two_runs
    with load_trajectory(result.trajectory) as traj:
        full = traj[name]  # (runs, steps+1, V, H)
        V = full.shape[2]
        for run in range(2):
            for token in (0, 7, V - 1):
                got = traj.token_rows(name, token, run=run)
                assert got.dtype == torch.bfloat16 and got.shape == (STEPS + 1, full.shape[3])
                assert torch.equal(got.view(torch.int16), full[run, :, token].view(torch.int16))  # bits, NaN-safe
            tokens = [V - 1, 3, 3, 120]
            got = traj.token_rows(name, tokens, run=run, steps=slice(2, 5))
            assert got.shape == (3, 4, full.shape[3])
            assert torch.equal(got.view(torch.int16), full[run, 2:5][:, tokens].view(torch.int16))
            got = traj.token_rows(name, torch.tensor(tokens), run=run)  # a tensor of ids, e.g. masks.dead_indices
            assert torch.equal(got.view(torch.int16), full[run][:, tokens].view(torch.int16))
            many = list(range(V - 1, 0, -23))  # past the few read row by row: whole slices, in order
            assert len(many) > 8
            got = traj.token_rows(name, many, run=run, steps=slice(1, None))
            assert torch.equal(got.view(torch.int16), full[run, 1:][:, many].view(torch.int16))
            block = traj.step_block(name, 1, 4, run=run)
            assert block.shape == (3, *full.shape[2:])
            assert torch.equal(block.view(torch.int16), full[run, 1:4].view(torch.int16))
            assert torch.equal(traj.step_block(name, 0, STEPS + 1, run=run).view(torch.int16),
                               full[run].view(torch.int16))


def test_token_rows_outlive_the_trajectory_and_refuse_bad_keys(two_runs):
    _, _, result = two_runs
    with load_trajectory(result.trajectory) as traj:
        path = traj.token_rows("W", 5)
        want = traj["W"][0, :, 5].clone()
        with pytest.raises(IndexError, match=r"run 2 is out of range: .* holds 2 run\(s\)"):
            traj.token_rows("W", 5, run=2)
        with pytest.raises(Exception, match=r"'losses' is not a per-step tensor of this trajectory; it has W, grad_W"):
            traj.token_rows("losses", 5)
    assert torch.equal(path.view(torch.int16), want.view(torch.int16))  # a copy: valid after close
