"""A trajectory changed after it was written is never certified: `flannel-repro check` (no rerun) and `verify` (with
a rerun) name the first corrupt key, run and step, and exit 1.

Each case damages one key family of a copy of a tiny trajectory *without* touching any digest (or a digest without
touching its slice, or the header), as a bad disk, a bad copy or a careless edit would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_tiny_data, write_params
from corrupt import edit_header, read_head, reseal_header, rewrite_content_record, rewrite_slice_digest, xor_byte

from flannel_repro.audit.check import check
from flannel_repro.cli import main
from flannel_repro.core.config import load_params
from flannel_repro.trajectory.file import load_trajectory

STEPS = 6  # conftest TINY


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """The tiny project and its trajectory, recorded once; every test damages its own copy."""
    from flannel_repro.training.loop import train

    root = tmp_path_factory.mktemp("integrity")
    copy_tiny_data(tiny_data, root)
    write_params(root)
    train(load_params(root / "params.yaml"), root, progress=False)
    return root


@pytest.fixture
def source(project) -> Path:
    return project / load_params(project / "params.yaml").paths.trajectory


def swap_offsets(a: str, b: str):
    """A header edit: two tensors of the same size trade places, so each name reads the other's numbers."""
    def edit(h):
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    return edit


def set_format(h):
    h["__metadata__"]["format"] = "flannel-trajectorz/2"


# id: (damage(src, dst), check's first (key, step), verify's first (key, step)); step None = no step to name.
CASES = {
    "W byte at step 3": (lambda s, d: xor_byte(s, d, "W", (0, 3), byte=100), ("W", 3), ("W", 3)),
    "grad_W byte at the last step": (lambda s, d: xor_byte(s, d, "grad_W", (0, STEPS), byte=7),
                                     ("grad_W", STEPS), ("grad_W", STEPS)),
    "losses (bf16)": (lambda s, d: xor_byte(s, d, "losses", (0, 3)), ("losses", None), ("losses", 3)),
    "losses_f32": (lambda s, d: xor_byte(s, d, "losses_f32", (0, 3)), ("losses_f32", None), ("losses_f32", 3)),
    "grad_norm": (lambda s, d: xor_byte(s, d, "grad_norm", (0, 2)), ("grad_norm", None), ("grad_norm", 2)),
    "lr_schedule": (lambda s, d: xor_byte(s, d, "lr_schedule", (0, 2)), ("lr_schedule", None), ("lr_schedule", 2)),
    # batch_indices[run, t - 1] is the batch of step t
    "batch_indices": (lambda s, d: xor_byte(s, d, "batch_indices", (0, 4, 1)), ("batch_indices", None),
                      ("batch_indices", 5)),
    "W_initial": (lambda s, d: xor_byte(s, d, "W_initial", byte=10), ("W_initial", None), ("W_initial", None)),
    "n_dead scalar": (lambda s, d: xor_byte(s, d, "n_dead"), ("n_dead", None), ("n_dead", None)),
    "a digest, not its slice": (lambda s, d: xor_byte(s, d, "digest_W", (0, 4), byte=3), ("digest_W", 4),
                                ("digest_W", 4)),
    "header dtype": (lambda s, d: edit_header(s, d, lambda h: h["losses_f32"].update(dtype="BF16")),
                     ("losses_f32", None), ("losses_f32", None)),
    "header shape": (lambda s, d: edit_header(s, d, lambda h: h["grad_norm"].update(shape=[STEPS + 1, 1])),
                     ("grad_norm", None), ("grad_norm", None)),
    "header offsets": (lambda s, d: edit_header(s, d, swap_offsets("grad_norm", "lr_schedule")),
                       ("grad_norm", None), ("grad_norm", None)),
    "header format tag": (lambda s, d: edit_header(s, d, set_format), ("format", None), ("format", None)),
    # A slice changed and its digest rewritten to match: only the content record still knows.
    "slice and its digest": (lambda s, d: (xor_byte(s, d, "W", (0, 3), byte=11), rewrite_slice_digest(d, "W", 0, 3)),
                             ("W", None), ("W", 3)),
}


def verdict_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("verdict: "))


@pytest.mark.parametrize("case", CASES)
def test_check_names_the_first_corrupt_key_and_exits_1(case, source, tmp_path, capsys):
    damage, (key, step), _ = CASES[case]
    bad = tmp_path / "bad.safetensors"
    damage(source, bad)
    report = check(bad)
    first = report.problems[0]
    assert (first.key, first.step) == (key, step), report.lines()
    assert first.run == (None if step is None else 0)
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert verdict_line(out) == f"verdict: corrupt (exit 1): {first.line()}"
    assert json.loads(json.dumps(report.to_json()))["first_corrupt_key"] == key


@pytest.mark.parametrize("case", CASES)
def test_verify_refuses_a_corrupt_reference_with_exit_1(case, project, source, tmp_path, capsys):
    damage, _, (key, step) = CASES[case]
    bad = tmp_path / "bad.safetensors"
    damage(source, bad)
    report = tmp_path / "verify.json"
    code = main(["verify", str(bad), "-q", "--params", str(project / "params.yaml"), "--report", str(report)])
    out = capsys.readouterr().out
    doc = json.loads(report.read_text())
    assert code == 1 and doc["exit_code"] == 1 and doc["verdict"] == "corrupt", out
    assert (doc["first_corrupt_key"], doc["first_corrupt_step"]) == (key, step), out
    where = f" at run 0, step {step}" if step is not None else ""
    assert verdict_line(out).startswith(f"verdict: reference corrupt (exit 1): {key}{where}: ")
    if step is None:  # nothing a rerun could locate: verify stops before training
        assert doc["reruns"] == [] and "not rerun: the reference is corrupt" in out
    else:  # stopped at the corrupt step
        assert doc["reruns"][0]["steps_checked"] == step + 1


def test_intact_file_passes_check_with_its_content_digest(source, capsys):
    assert main(["check", str(source)]) == 0
    out = capsys.readouterr().out
    digest = load_trajectory(source).metadata["content_digest"]
    assert f"content digest: {digest}" in out
    assert verdict_line(out).startswith("verdict: intact (exit 0)")


@pytest.mark.parametrize("tail", ["truncated", "appended"])
def test_truncated_or_extended_file_is_corrupt(tail, source, tmp_path):
    bad = tmp_path / "bad.safetensors"
    data = source.read_bytes()
    bad.write_bytes(data[:-100] if tail == "truncated" else data + bytes(8))
    report = check(bad)
    assert report.exit_code == 1
    expect = "the file is truncated: its header describes" if tail == "truncated" else "8 bytes follow the last tensor"
    assert report.problems[0].key == "" and expect in report.problems[0].what


def test_swapped_steps_with_swapped_digests_are_corrupt(source, tmp_path):
    """Two steps' W slices and their digests traded: every slice matches its digest, but not the content record,
    and the rerun finds the first swapped step."""
    bad = tmp_path / "bad.safetensors"
    shutil.copyfile(source, bad)
    header, data = read_head(bad)
    blob = bytearray(bad.read_bytes())
    for key, size in (("W", 300 * 16 * 2), ("digest_W", 32)):
        lo = data + header[key]["data_offsets"][0]
        a, b = lo + 2 * size, lo + 4 * size
        blob[a : a + size], blob[b : b + size] = blob[b : b + size], blob[a : a + size]
    bad.write_bytes(bytes(blob))
    report = check(bad)
    assert [(p.key, p.step) for p in report.problems] == [("W", None)]
    assert "changed together" in report.problems[0].what


def test_header_param_that_changes_no_number(project, source, tmp_path):
    """train.log_every changes no number: a header edit of it is caught by the header digest, and once the header
    digest is recomputed too, the file is consistent again (and its numbers are indeed the run's)."""
    bad = tmp_path / "bad.safetensors"

    def edit(h):
        h["__metadata__"]["params"] = h["__metadata__"]["params"].replace('"log_every": 2', '"log_every": 3')

    edit_header(source, bad, edit)
    report = check(bad)
    assert [(p.key, p.step) for p in report.problems] == [("header", None)]
    assert "no longer hashes to its header_digest" in report.problems[0].what
    reseal_header(bad)
    assert check(bad).exit_code == 0
    assert load_trajectory(bad).metadata["content_digest"] == load_trajectory(source).metadata["content_digest"]


def test_fully_consistent_forgery_passes_check_but_not_verify(project, source, tmp_path):
    """A slice changed with its digest, the content record and the header digest rewritten to match: no file can
    tell by itself. check passes it (and says what to compare the content digest with); only the rerun diverges,
    and the content digest no longer matches the one the run logged."""
    bad = tmp_path / "bad.safetensors"
    xor_byte(source, bad, "W", (0, 3), byte=11)
    rewrite_slice_digest(bad, "W", 0, 3)
    forged = rewrite_content_record(bad)
    assert check(bad).exit_code == 0
    assert forged != load_trajectory(source).metadata["content_digest"]
    assert main(["verify", str(bad), "-q", "--params", str(project / "params.yaml")]) == 1
