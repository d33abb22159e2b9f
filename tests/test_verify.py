"""`flannel-repro verify`: an identical rerun passes, a one-bit change is found at its step and token row, a thread
mismatch is reported and diverges, and a bad reference is one clear line with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, thread_pair, write_params
from corrupt import edit_header, rewrite_content_record, rewrite_slice_digest, xor_byte

from flannel_repro.audit.bits import bf16_order
from flannel_repro.audit.reference import Reference, file_reference
from flannel_repro.audit.verify import log_audit, verify
from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.safetensors_header import read_header
from flannel_repro.data.masks import load_masks
from flannel_repro.trajectory.file import load_trajectory, manifest

FLIP_STEP, FLIP_ROW, FLIP_COL = 3, 5, 7


def flip_bit(src: Path, dst: Path, step: int, row: int, col: int, run: int = 0) -> None:
    """Copy `src` to `dst` with the lowest mantissa bit of W[run, step, row, col] flipped (one bf16 ULP), and
    digest_W[run, step] and the header's content record rewritten to describe the changed file, as if the run had
    produced it: a file consistent in every way it can check itself, which only a rerun can tell apart."""
    hidden = read_header(src)["W"]["shape"][3]
    # little-endian bf16: the first byte of an element holds the mantissa's low bits
    xor_byte(src, dst, "W", (run, step), byte=(row * hidden + col) * 2)
    rewrite_slice_digest(dst, "W", run, step)
    rewrite_content_record(dst)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """A tiny project with two references: ref1.safetensors (1 thread) and ref2.safetensors (2 threads)."""
    return thread_pair(tmp_path_factory.mktemp("verify"), tiny_data, "ref")


@pytest.fixture(scope="module")
def flipped(project) -> Path:
    out = project / "flipped.safetensors"
    flip_bit(project / "ref1.safetensors", out, FLIP_STEP, FLIP_ROW, FLIP_COL)
    return out


def test_identical_rerun_exits_0_and_uses_the_references_params(project, tmp_path):
    # params.yaml says 9 steps; the reference was recorded with 6: the rerun must use 6 and say so.
    write_params(tmp_path, {"train": {"steps": 9}})
    shutil.copyfile(tmp_path / "params.yaml", project / "params_other.yaml")
    before = sorted(p.name for p in project.rglob("*"))
    proc = run_cli("verify", "ref1.safetensors", "--params", "params_other.yaml", "--json", "-q",
                   "--report", "reports/verify.json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "identical" and doc["exit_code"] == 0
    assert doc["reruns"][0]["steps_checked"] == 7  # t = 0..6
    assert doc["first_divergent_step"] is None
    assert {"key": "train.steps", "params_yaml": 9, "reference": 6} in doc["params_differences"]
    assert "train.steps (9 -> 6)" in proc.stderr and "the rerun uses the reference's" in proc.stderr
    assert "verdict: bit-identical (exit 0)" in proc.stderr
    # The rerun's content digest (over everything it would record) is the file's, and the report says what it covered.
    recorded = load_trajectory(project / "ref1.safetensors").metadata["content_digest"]
    assert doc["content_digest"] == doc["rerun_content_digest"] == recorded
    assert f"content digest: {recorded} (the rerun's is the same)" in proc.stderr
    assert doc["not_checked"] == [] and doc["checked"][0].startswith("the file's own bytes")
    assert json.loads((project / "reports/verify.json").read_text()) == doc
    # No second trajectory (nor any temporary file) was written.
    after = sorted(p.name for p in project.rglob("*"))
    assert set(after) - set(before) == {"reports", "verify.json"}
    (project / "params_other.yaml").unlink()
    shutil.rmtree(project / "reports")


def test_a_seed_other_than_init_seed_reruns_identically(project, tmp_path):
    # verify recomputes W_initial from init_seed while the rerun trains with train_seed: the rerun's own random
    # state (its data order) must not notice.
    write_params(tmp_path, {"train": {"train_seed": 43}, "paths": {"trajectory": "seed43.safetensors"}})
    params = load_params(tmp_path / "params.yaml")
    from flannel_repro.training.loop import train

    train(params, project, progress=False)
    report = verify(file_reference(project / "seed43.safetensors"), project)
    assert report.verdict == "identical", report.lines()
    (project / "seed43.safetensors").unlink()


def test_flipped_bit_is_found_at_its_step_and_token_row(project, flipped):
    proc = run_cli("verify", str(flipped), "--json", "-q", cwd=project)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["first_divergent_step"], doc["first_divergent_tensor"]) == (FLIP_STEP, "W")
    rerun = doc["reruns"][0]
    assert rerun["steps_checked"] == FLIP_STEP + 1  # stopped at the divergent step
    d = rerun["divergences"][0]
    assert d["tensors"] == ["W"]  # loss and grad_W at that step still match
    w = d["detail"]["W"]
    assert (w["n_differ"], w["max_ulp"], w["n_rows"]) == (1, 1, 1)
    live = bool(load_masks(project / "tensors/Flannel/live_dead_tokens.safetensors", 300).live_mask[FLIP_ROW])
    assert w["rows"] == [{"row": FLIP_ROW, "kind": "live" if live else "dead", "n_differ": 1}]
    original = load_trajectory(project / "ref1.safetensors").step("W", FLIP_STEP)[FLIP_ROW, FLIP_COL].float()
    changed = load_trajectory(flipped).step("W", FLIP_STEP)[FLIP_ROW, FLIP_COL].float()
    assert w["max_abs_diff"] == abs(float(original - changed)) > 0
    assert f"DIVERGED at run 0, step {FLIP_STEP}: W differ" in proc.stderr
    assert f"first token rows (live/dead, elements): {FLIP_ROW} ({'live' if live else 'dead'}, 1)" in proc.stderr


def test_full_reports_every_divergent_step(project, flipped):
    report = verify(file_reference(flipped), project, full=True)
    (rerun,) = report.reruns
    assert rerun.steps_checked == 7  # ran to the end
    # Only the edited slice differs: the steps after it match the reference again.
    assert [(d.step, d.tensors) for d in rerun.divergences] == [(FLIP_STEP, ["W"])]
    assert report.exit_code == 1


def test_reference_from_digests_alone_names_the_step_without_elementwise_detail(project, flipped):
    # A run-id reference is the same manifest without the file behind it.
    traj = load_trajectory(flipped)
    ref = Reference("MLflow run abc", manifest(traj), traj.params, run_id="abc")
    report = verify(ref, project)
    d = report.first
    assert (d.step, d.tensors, d.detail) == (FLIP_STEP, ["W"], {})
    assert any("needs the trajectory file" in n for n in d.notes)
    doc = report.to_json()
    assert doc["audited_run_id"] == "abc"
    # Its verdict says what a digests-only reference could and could not check.
    assert doc["checked"] == [
        "grad_W, W digests at every step against the rerun", "the f32 loss at every step",
        "every other key (losses, losses_f32, grad_norm, lr_schedule, batch_indices, W_initial, the scalars) against "
        "the run's content record, after the last step"]
    assert doc["not_checked"] == [
        "the trajectory file's own bytes (give the file too, or run `flannel-repro check FILE`)"]
    assert "reference: MLflow run abc (digests only, 1 run(s) x 6 steps)" in report.lines()


def test_thread_count_is_pinned_and_a_mismatch_is_reported_and_diverges(project):
    ref = file_reference(project / "ref2.safetensors")
    pinned = verify(ref, project, repeat=2)
    assert pinned.params.train.num_threads == 2
    assert pinned.mismatches == [] and [r.identical for r in pinned.reruns] == [True, True]
    assert "note: thread count pinned to the reference's: 2" in pinned.lines()

    other = verify(ref, project, threads=1)
    assert ("torch_threads", 2, 1) in other.mismatches
    lines = other.lines()
    assert "warning: this machine differs from the reference in torch_threads: reference 2, here 1" in lines
    assert "warning: the differences above are the likely cause of any divergence below" in lines
    assert other.exit_code == 1 and other.first.step >= 1

    with pytest.raises(FlannelError, match=r"--strict: .*torch_threads \(reference 2, here 1\)"):
        verify(ref, project, threads=1, strict=True)


def test_changed_input_is_reported_up_front(project, tmp_path):
    shutil.copytree(project / "data", tmp_path / "data")
    shutil.copytree(project / "tensors", tmp_path / "tensors")
    corpus = tmp_path / "data/flannel_model_corpus.txt"
    corpus.write_text(corpus.read_text() + " extra")
    with pytest.raises(FlannelError, match=r"--strict: .*data/flannel_model_corpus\.txt"):
        verify(file_reference(project / "ref1.safetensors"), tmp_path, strict=True)


@pytest.mark.parametrize("kind", ["not safetensors", "header not JSON", "not a trajectory", "older format"])
def test_unreadable_reference_is_one_line_and_exit_2(project, tmp_path, kind):
    bad = tmp_path / "bad.safetensors"
    if kind == "not safetensors":
        bad.write_text("W,grad_W\n1,2\n")
        expect = "is not a safetensors file"
    elif kind == "header not JSON":
        data = bytearray((project / "ref1.safetensors").read_bytes())
        data[8:16] = b"\xff" * 8
        bad.write_bytes(bytes(data))
        expect = "header is not JSON"
    elif kind == "older format":
        edit_header(project / "ref1.safetensors", bad,
                    lambda h: h["__metadata__"].update(format="flannel-trajectory/1"))
        expect = "trajectory format flannel-trajectory/1, but this flannel-repro reads flannel-trajectory/2"
    else:
        shutil.copyfile(project / "tensors/Flannel/live_dead_tokens.safetensors", bad)
        expect = "not a flannel-repro trajectory"
    proc = run_cli("verify", str(bad), "-q", cwd=project)
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"flannel-repro verify: error: {bad}: ") and expect in line


def test_bf16_order_counts_ulps_across_zero():
    bits = torch.tensor([0x0000, -0x8000, 0x3F80, -0x4080], dtype=torch.int16)  # +0, -0, 1.0, -1.0
    x = bits.view(torch.bfloat16)
    assert x.tolist() == [0.0, -0.0, 1.0, -1.0]
    assert bf16_order(x).tolist() == [0, 0, 0x3F80, -0x3F80]
    one_up = (bits + 1).view(torch.bfloat16)  # the next larger magnitude of each
    assert (bf16_order(one_up) - bf16_order(x)).abs().tolist() == [1, 1, 1, 1]
    # The smallest positive and negative subnormals are two ULPs apart, through zero.
    assert int(bf16_order(one_up[0:1]) - bf16_order(one_up[1:2])) == 2


def test_run_id_reference_is_audited_and_the_verdict_logged_beside_the_run(tiny_project, flipped):
    from mlflow import MlflowClient

    from flannel_repro.audit.reference import audit_store, load_reference
    from flannel_repro.training.stage import run_train_stage

    write_params(tiny_project, {"tracking": {"enabled": True, "uri": "sqlite:///mlflow.db"}})
    params = load_params(tiny_project / "params.yaml")
    _, run_id = run_train_stage(params, tiny_project, progress=False)

    ref = load_reference(None, run_id, params, tiny_project)
    assert (ref.trajectory, ref.run_id, ref.source) == (None, run_id, f"MLflow run {run_id}")
    report = verify(ref, tiny_project, current=params)
    assert report.identical and report.reruns[0].steps_checked == 7
    logged = log_audit(report, params, tiny_project)
    line = logged.note
    assert line.startswith("logged to tracking as audit run ") and line.endswith(f" of run {run_id}")
    assert (logged.audited_run_id, logged.audit_run_id) == (run_id, line.split()[6])

    client = MlflowClient(audit_store(params, tiny_project).uri)
    audit = client.get_run(line.split()[6])
    assert audit.data.tags["flannel.audit_of"] == audit.data.tags["mlflow.parentRunId"] == run_id
    assert audit.data.tags["flannel.verdict"] == "identical"
    assert audit.data.tags["flannel.first_divergent_step"] == "none"

    # A file alone is linked to the run that wrote it, found by the file's sha256.
    by_file = verify(load_reference(None, None, params, tiny_project), tiny_project, current=params)
    assert by_file.identical and by_file.reference.run_id is None
    line = log_audit(by_file, params, tiny_project).note
    assert line.endswith(f" of run {run_id}"), line
    assert client.get_run(line.split()[6]).data.tags["flannel.audit_of"] == run_id
    assert log_audit(verify(file_reference(flipped), tiny_project, current=params), params, tiny_project).note == (
        "the verdict is not logged to tracking: no train run in the store wrote this file; name the audited run "
        "with --run-id ID")

    # A file given with the run id must be that run's file.
    with pytest.raises(FlannelError, match=f"not the trajectory of MLflow run {run_id}"):
        load_reference(flipped, run_id, params, tiny_project)
    same = load_reference(tiny_project / params.paths.trajectory, run_id, params, tiny_project)
    assert same.trajectory is not None and same.run_id == run_id

    # A logged digest changed in the artifact store: the run's own content record gives it away before any rerun.
    (artifact,) = tiny_project.glob(f"mlruns/**/{run_id}/artifacts/digests.json")
    doc = json.loads(artifact.read_text())
    doc["digests"]["W"][0][3] = "00" * 32
    artifact.write_text(json.dumps(doc))
    with pytest.raises(FlannelError, match=r"digests.json artifact is corrupt \(digests.W no longer match"):
        load_reference(None, run_id, params, tiny_project)


def test_tracking_disabled_logs_nothing(project, flipped):
    report = verify(file_reference(flipped), project)
    params = load_params(project / "params.yaml")
    assert log_audit(report, params, project).note.startswith("tracking is disabled (tracking.enabled: false")
