"""What the dead-token analysis reads from a trajectory: the two halves of the tied gradient (record.grad_parts),
recorded, digested, checked and verified like grad_W, and how they add up to grad_W bit for bit; exposure (which
tokens each step's loss saw), from the reader and from the exposure stage; the under-training indicators per step,
in flight, in the CSV, in tracking and per token from the reader."""

from __future__ import annotations

import csv
import hashlib

import pytest
import torch
from conftest import REPO, copy_tiny_data, run_cli, write_params
from corrupt import offset_of, rewrite_content_record, rewrite_slice_digest, xor_byte
from safetensors.torch import load_file

from flannel_repro.analysis.exposure import exposure_of, load_exposure
from flannel_repro.analysis.figures import indicators_png, read_curves
from flannel_repro.audit.check import check
from flannel_repro.audit.reference import file_reference
from flannel_repro.audit.verify import verify
from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.data.masks import load_masks
from flannel_repro.recording.indicators import INDICATOR_NAMES, indicators
from flannel_repro.recording.motion import set_means, token_sets
from flannel_repro.training.inputs import load_inputs
from flannel_repro.training.loop import train
from flannel_repro.training.model import TokenDataset
from flannel_repro.trajectory import content
from flannel_repro.trajectory.file import load_trajectory
from flannel_repro.trajectory.layout import trajectory_layout

STEPS = 6  # conftest TINY
PARTS = ("grad_W_input", "grad_W_output")


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory, tiny_data):
    """The tiny config recorded with grad_parts on, two runs (run 1 trains with another seed)."""
    root = tmp_path_factory.mktemp("grad_parts")
    copy_tiny_data(tiny_data, root)
    params = load_params(write_params(root, {"train": {"num_runs": 2}, "record": {"grad_parts": True}}))
    result = train(params, root, progress=False)
    return root, params, result


def test_grad_parts_are_off_by_default_and_two_more_keys_when_on(parts_run):
    root, params, result = parts_run
    default = trajectory_layout(load_params(REPO / "params.yaml"))  # the notebook's file: no such keys
    assert not [k for k in default if k.removeprefix("digest_") in PARTS]
    with load_trajectory(result.trajectory) as traj:
        for name in PARTS:
            assert traj.shapes[name] == traj.shapes["grad_W"] == (2, STEPS + 1, 300, 16)
            assert traj[name].dtype == torch.bfloat16
        record = {e.name: e for e in content.parse(traj.metadata["content"])}
    assert {record[name].kind for name in PARTS} == {"steps"}  # in the content record through their digests
    assert check(result.trajectory).exit_code == 0


def test_the_halves_add_up_to_grad_w_bit_for_bit(parts_run):
    """Autograd adds the two halves once, in bf16 (their float32 sum, which is exact unless their exponents are
    more than 16 apart, rounded once to bf16), so the same addition here gives grad_W exactly, at every step of
    every run, in either order."""
    _, _, result = parts_run
    with load_trajectory(result.trajectory) as traj:
        g, gin, gout = traj["grad_W"], traj["grad_W_input"], traj["grad_W_output"]
    assert not gin[:, 0].any() and not gout[:, 0].any()  # zero at t = 0, like grad_W
    assert gin[:, 1:].any() and gout[:, 1:].any()
    assert torch.equal(gout + gin, g) and torch.equal(gin + gout, g)  # bf16 addition is commutative
    assert torch.equal((gout.float() + gin.float()).bfloat16(), g)
    # Each half alone is not grad_W: both contribute at the rows of the batch's tokens.
    assert not torch.equal(gin, g) and not torch.equal(gout, g)


def test_the_input_half_is_zero_exactly_outside_the_batchs_input_tokens(parts_run):
    root, params, result = parts_run
    masks = load_masks(root / params.paths.masks, params.model.vocab_size)
    tokens = load_inputs(params, root).tokens
    windows = TokenDataset(tokens, params.model.max_seq_len, params.train.label_mode)
    with load_trajectory(result.trajectory) as traj:
        gin, gout, batches = traj["grad_W_input"], traj["grad_W_output"], traj["batch_indices"]
    for run in range(2):
        for t in range(1, STEPS + 1):
            ids = torch.stack([windows[int(i)]["input_ids"] for i in batches[run, t - 1] if i >= 0])  # (B, L)
            # A window's last position is not scored (the model shifts the labels), and with causal attention
            # nothing else reads it: a token only ever there gets no input gradient either.
            scored, anywhere = (torch.zeros(params.model.vocab_size, dtype=torch.bool) for _ in range(2))
            scored[ids[:, :-1]] = True
            anywhere[ids] = True
            rows_nonzero = gin[run, t].ne(0).any(dim=1)
            assert torch.equal(rows_nonzero, scored), (run, t)  # exactly the rows of the scored inputs' tokens
            assert not gin[run, t][~anywhere].any()
            assert not gin[run, t][masks.dead_mask].any()  # dead rows: exactly zero, so ...
            assert gout[run, t][masks.dead_mask].ne(0).any(dim=1).all()  # ... all their pull is the output half's


def test_a_changed_half_is_found_by_check_and_by_verify_at_its_step(parts_run, tmp_path):
    root, params, result = parts_run
    assert verify(file_reference(result.trajectory), root).verdict == "identical"
    # A flipped byte with the digests untouched: check names the key, run and step.
    bad = tmp_path / "bad.safetensors"
    xor_byte(result.trajectory, bad, "grad_W_output", (1, 4), byte=6)
    report = check(bad)
    assert report.exit_code == 1 and report.problems[0].key == "grad_W_output"
    assert (report.problems[0].run, report.problems[0].step) == (1, 4)
    # The same byte with its digest and the content record rewritten: only the rerun can tell, at that step.
    consistent = tmp_path / "consistent.safetensors"
    xor_byte(result.trajectory, consistent, "grad_W_input", (0, 3), byte=2 * 16 * int(_an_input_row(result, 0, 3)))
    rewrite_slice_digest(consistent, "grad_W_input", 0, 3)
    rewrite_content_record(consistent)
    assert check(consistent).exit_code == 0
    rep = verify(file_reference(consistent), root)
    assert rep.verdict == "diverged" and (rep.first.run, rep.first.step) == (0, 3)
    assert rep.first.tensors == ["grad_W_input"]  # grad_W and W at that step still match the rerun


class StopAt:
    """An observer that interrupts the run at (run, step), as Ctrl-C would."""

    def __init__(self, run: int, step: int) -> None:
        self.at = (run, step)

    def __call__(self, rec) -> None:
        if (rec.run, rec.step) == self.at:
            raise KeyboardInterrupt


def test_a_resumed_run_records_the_same_halves(parts_run, tmp_path, tiny_data):
    """Interrupted in the second run and resumed from its checkpoint: the same numbers (content digest) as the
    uninterrupted run, the halves included."""
    _, _, result = parts_run
    copy_tiny_data(tiny_data, tmp_path)
    params = load_params(write_params(tmp_path, {"train": {"num_runs": 2, "checkpoint_every": 2},
                                                 "record": {"grad_parts": True}}))
    with pytest.raises(KeyboardInterrupt):
        train(params, tmp_path, progress=False, observers=[StopAt(1, 5)])
    resumed = train(params, tmp_path, progress=False, resume=True)
    assert resumed.content_digest == result.content_digest


def _an_input_row(result, run: int, step: int) -> int:
    with load_trajectory(result.trajectory) as traj:
        return int(traj.step("grad_W_input", step, run).ne(0).any(dim=1).nonzero()[0])


# -- exposure -----------------------------------------------------------------------------------------------------

def naive_exposure(traj, tokens: torch.Tensor, params) -> torch.Tensor:
    """(runs, steps+1, V): the labels each step's loss scored, counted one window at a time from the dataset the
    Trainer reads, shifted as GPT2LMHeadModel shifts them."""
    windows = TokenDataset(tokens, params.model.max_seq_len, params.train.label_mode)
    runs, steps, v = params.train.num_runs, params.train.steps, params.model.vocab_size
    out = torch.zeros(runs, steps + 1, v, dtype=torch.int64)
    for run in range(runs):
        for t in range(1, steps + 1):
            for i in traj["batch_indices"][run, t - 1].tolist():
                if i >= 0:
                    out[run, t] += torch.bincount(windows[i]["labels"][1:], minlength=v)
    return out


@pytest.mark.parametrize("label_mode", ["notebook", "next_token"])
def test_exposure_counts_the_labels_each_step_scored(tmp_path, tiny_data, label_mode):
    copy_tiny_data(tiny_data, tmp_path)
    params = load_params(write_params(tmp_path, {"train": {"label_mode": label_mode, "num_runs": 2}}))
    result = train(params, tmp_path, progress=False)
    tokens = load_inputs(params, tmp_path).tokens
    masks = load_masks(tmp_path / params.paths.masks, params.model.vocab_size)
    with load_trajectory(result.trajectory) as traj:
        ex = exposure_of(traj, tokens, masks)
        want = naive_exposure(traj, tokens, params)
    assert ex.label_mode == label_mode and ex.counts.dtype == torch.int32
    assert torch.equal(ex.counts.long(), want)
    assert not ex.counts[:, 0].any() and not ex.counts[:, :, masks.dead_mask].any()
    seen = want.cumsum(dim=1) > 0  # (runs, steps+1, V)
    first = torch.where(seen.any(dim=1), seen.int().argmax(dim=1), -1)
    assert torch.equal(ex.first_step, first) and torch.equal(ex.total, want.sum(dim=1))
    assert (ex.first_step > 1).any()  # some tokens first become labels after step 1


def test_the_exposure_stage_writes_a_file_the_reader_reads_back(tmp_path, tiny_data):
    copy_tiny_data(tiny_data, tmp_path)
    params = load_params(write_params(tmp_path))
    train(params, tmp_path, progress=False)
    proc = run_cli("exposure", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / params.paths.exposure
    assert f"exposure: {params.paths.exposure} ({STEPS} steps" in proc.stdout
    with load_trajectory(tmp_path / params.paths.trajectory) as traj:
        want = exposure_of(traj, load_inputs(params, tmp_path).tokens)
    got = load_exposure(path)
    assert torch.equal(got.counts, want.counts) and got.label_mode == "notebook"
    stored = load_file(path)  # the file's own first_step and total, written beside the compact counts
    assert torch.equal(stored["first_step"], want.first_step) and torch.equal(stored["total"], want.total)
    # A rerun of the stage on the same inputs writes the same bytes (a DVC output that does not churn).
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert run_cli("exposure", cwd=tmp_path).returncode == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_exposure_refuses_another_corpus_and_a_batch_outside_it(tmp_path, tiny_data):
    copy_tiny_data(tiny_data, tmp_path)
    params = load_params(write_params(tmp_path))
    result = train(params, tmp_path, progress=False)
    corpus = tmp_path / params.paths.corpus
    original = corpus.read_bytes()
    corpus.write_bytes(original + b" more words")
    proc = run_cli("exposure", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("differs from the one the trajectory recorded); give the run's corpus")
    assert len(proc.stderr.strip().splitlines()) == 1
    corpus.write_bytes(original)
    tokens = load_inputs(params, tmp_path).tokens
    with load_trajectory(result.trajectory) as traj:
        with pytest.raises(FlannelError, match=r"batch_indices\[0, \d+, \d+\] = \d+ is not a window of this corpus"):
            exposure_of(traj, tokens[: len(tokens) // 4])  # a shorter corpus: some windows are past its end


# -- indicators ---------------------------------------------------------------------------------------------------

def indicators_from_file(w: torch.Tensor, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """The indicators of one (V, H) bf16 slice, recomputed in float64 with plain torch."""
    x = w.double() - w.double().mean(dim=0)
    r = x[dead].mean(dim=0)
    cos = 1 - (x @ r) / (x.norm(dim=1) * r.norm())
    return {"dist": (x - r).norm(dim=1), "cos": cos, "dead_centroid": r.norm()}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, tiny_data):
    """The tiny config with two runs (seeds 42 and 43), trained through the train stage (reports written)."""
    from flannel_repro.training.stage import write_reports

    root = tmp_path_factory.mktemp("indicators")
    copy_tiny_data(tiny_data, root)
    params = load_params(write_params(root, {"train": {"num_runs": 2}}))
    result = train(params, root, progress=False)
    write_reports(params, result, root)
    return root, params, result


def test_indicators_per_step_are_the_papers_distances_from_the_dead_mean(two_seeds):
    root, params, result = two_seeds
    masks = load_masks(root / params.paths.masks, params.model.vocab_size)
    with load_trajectory(result.trajectory) as traj:
        for run in range(2):
            for t in range(STEPS + 1):
                want = indicators_from_file(traj.step("W", t, run), masks.dead_mask)
                got = indicators(traj.step("W", t, run).float(), masks.dead_mask)  # the reader's per-token values
                for kind in ("dist", "cos"):
                    assert torch.allclose(got[kind].double(), want[kind], rtol=1e-4, atol=1e-6), (kind, run, t)
                    for side, mask in (("live", masks.live_mask), ("dead", masks.dead_mask)):
                        curve = result.motion[f"{kind}_{side}"][run][t]
                        assert curve == pytest.approx(float(want[kind][mask].mean()), rel=1e-4), (kind, side, t)
                        # the per-token values of the reader give the in-flight summary exactly
                        assert curve == set_means(got[kind].numpy(), token_sets(masks))[side == "dead"]
                assert result.motion["dead_centroid"][run][t] == pytest.approx(float(want["dead_centroid"]),
                                                                               rel=1e-4)
    # Live tokens are trained away from the dead mean; the dead ones stay near it.
    dist_live, dist_dead = result.motion["dist_live"][0], result.motion["dist_dead"][0]
    assert dist_live[STEPS] > dist_dead[STEPS]
    assert result.motion["dead_centroid"][0][STEPS] != result.motion["dead_centroid"][0][0]


def test_indicators_go_to_the_csv_and_the_figure(two_seeds, tmp_path):
    root, params, result = two_seeds
    with open(root / params.paths.loss_curve, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for name in INDICATOR_NAMES:
            assert float(r[name]) == result.motion[name][int(r["run"])][int(r["step"])]
    out = indicators_png(params, root, tmp_path / "indicators.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # read_curves gives the figure exactly the CSV's curves, both seeds
    curves = read_curves(root / params.paths.loss_curve, list(INDICATOR_NAMES))
    assert [c[1:] for c in curves["dist_dead"]] == [result.motion["dist_dead"][run][1:] for run in range(2)]


def test_indicators_are_logged_to_tracking_per_step(tmp_path, tiny_data):
    from mlflow.tracking import MlflowClient

    from flannel_repro.training.stage import run_train_stage

    copy_tiny_data(tiny_data, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(write_params(tmp_path, {"tracking": {"enabled": True, "uri": uri}}))
    result, run_id = run_train_stage(params, tmp_path, progress=False)
    client = MlflowClient(tracking_uri=uri)
    for name in INDICATOR_NAMES:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert [s for s, _ in history] == list(range(STEPS + 1))
        assert [v for _, v in history] == pytest.approx(result.motion[name][0], rel=1e-6)


def test_a_file_that_is_not_an_exposure_file_is_one_clear_error(tmp_path, tiny_data):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(FlannelError, match=r"garbage.safetensors: cannot read the exposure file \(.*\); make it"):
        load_exposure(garbage)
    masks = tiny_data / "tensors/Flannel/live_dead_tokens.safetensors"  # safetensors, but not exposure
    with pytest.raises(FlannelError, match=r"live_dead_tokens.safetensors: not an exposure file"):
        load_exposure(masks)


def test_exposure_of_an_epochs_short_last_batch_counts_its_windows_only(tiny_project):
    """A corpus of 24 windows and batch 5: the Trainer keeps the short 5th batch, whose empty slot reads -1; its
    exposure counts the windows it has, and an index after a -1 is refused."""
    from tokenizers import Tokenizer

    from flannel_repro.data.masks import encode_corpus, masks

    params = load_params(write_params(tiny_project, {"train": {"batch_size": 5, "steps": 6}}))
    corpus, tok_path = tiny_project / params.paths.corpus, tiny_project / params.paths.tokenizer
    tokens = encode_corpus(corpus, tok_path, 300)
    corpus.write_text(Tokenizer.from_file(str(tok_path)).decode(tokens[:40].tolist()))
    masks(params, tiny_project)
    result = train(params, tiny_project, progress=False)
    tokens = load_inputs(params, tiny_project).tokens
    with load_trajectory(result.trajectory) as traj:
        batches = traj["batch_indices"][0]
        ex = exposure_of(traj, tokens)
        want = naive_exposure(traj, tokens, params)
    assert (batches == -1).any()  # the short batch is in the run
    assert torch.equal(ex.counts.long(), want)
    short = int((batches == -1).any(dim=1).nonzero()[0])
    assert int(ex.counts[0, short + 1].sum()) == int((batches[short] >= 0).sum()) * (params.model.max_seq_len - 1)
    # The same file with step 1's first slot emptied: windows after a -1 are not a batch the Trainer makes.
    bad = tiny_project / "bad.safetensors"
    data = bytearray(result.trajectory.read_bytes())
    at = offset_of(result.trajectory, "batch_indices", (0, 0, 0))
    data[at : at + 8] = (-1).to_bytes(8, "little", signed=True)
    bad.write_bytes(bytes(data))
    with load_trajectory(bad) as traj:
        with pytest.raises(FlannelError, match=r"batch_indices\[0, 0, 1\] = \d+ is not a window"):
            exposure_of(traj, tokens)
