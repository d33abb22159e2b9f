"""Files the Flannel 7 notebook wrote itself (tests/notebook_reference.py runs its cells): `check`, `verify`, `diff`
and `adopt` take them, and find what can be found without the digests such a file lacks.

The notebook files here are tiny (300 tokens, 16 wide, a few steps) but use the notebook's own fixed values for
what its file does not record (2 layers, 2 heads, 128-token windows, batches of 32, torch's default thread count)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flannel_repro.core.config import load_params
from flannel_repro.data.corpus import corpus
from flannel_repro.data.masks import masks
from tests.conftest import REPO, copy_tiny_data, run_cli, write_params

STEPS = 5
SHAPE = {"vocab_size": 300, "hidden_dim": 16}
# What a flannel-repro train run needs to be the notebook's run: its fixed values, and its thread count (torch's).
NOTEBOOK_RUN = {"model": {**SHAPE, "n_layer": 2, "n_head": 2, "max_seq_len": 128},
                "train": {"steps": STEPS, "batch_size": 32, "num_threads": None}}


def notebook_file(root: Path, name: str, train_seed: int = 42, init_seed: int = 42) -> Path:
    """A file written by the notebook's own cells on the data under `root`."""
    cfg = {"init_seed": init_seed, "train_seed": train_seed, **SHAPE, "n_layer": 2, "n_head": 2, "max_seq_len": 128,
           "batch_size": 32, "steps": STEPS,
           "tokenizer": str(root / "data/flannel_tokenizer_chars.json"),
           "corpus": str(root / "data/flannel_model_corpus.txt"),
           "masks": str(root / "tensors/Flannel/live_dead_tokens.safetensors"),
           "scratch_dir": str(root / f"{name}_scratch"), "output": str(root / f"{name}.safetensors")}
    (root / f"{name}.json").write_text(json.dumps(cfg))
    subprocess.run([sys.executable, str(REPO / "tests/notebook_reference.py"), str(root / f"{name}.json")],
                   check=True, capture_output=True, cwd=root)
    return Path(cfg["output"])


@pytest.fixture(scope="module")
def notebook_files(tmp_path_factory, tiny_data) -> Path:
    """A folder with the tiny data and two notebook files: notebook.safetensors (seeds 42) and seed43.safetensors
    (train_seed 43)."""
    root = copy_tiny_data(tiny_data, tmp_path_factory.mktemp("notebook"))
    notebook_file(root, "notebook")
    notebook_file(root, "seed43", train_seed=43)
    return root


@pytest.fixture
def project(tmp_path, notebook_files) -> Path:
    """A tiny project (params.yaml at the tiny defaults) holding copies of the notebook files."""
    copy_tiny_data(notebook_files, tmp_path)
    for name in ("notebook", "seed43"):
        shutil.copy(notebook_files / f"{name}.safetensors", tmp_path)
    write_params(tmp_path)
    return tmp_path


def header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def offset(path: Path, key: str, index: tuple[int, ...] = ()) -> int:
    """Byte offset of `key[index]` (leading indices) in the file."""
    head, start = header(path)
    shape, flat = head[key]["shape"], 0
    for i, n in zip(index, shape, strict=False):
        flat = flat * n + i
    for n in shape[len(index):]:
        flat *= n
    size = {"BF16": 2, "F32": 4, "I64": 8, "BOOL": 1}[head[key]["dtype"]]
    return start + head[key]["data_offsets"][0] + flat * size


def patch(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def flip(path: Path, at: int) -> None:
    """Flip the lowest bit of the byte at `at` (a bf16's lowest mantissa bit: still a finite number)."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 1]))


def key_sha256(path: Path, key: str) -> str:
    head, start = header(path)
    lo, hi = head[key]["data_offsets"]
    return hashlib.sha256(path.read_bytes()[start + lo : start + hi]).hexdigest()


def content_lines(path: Path) -> dict[str, str]:
    text = header(path)[0]["__metadata__"]["content"]
    return {line.split(" ")[0]: line for line in text.splitlines()[1:]}


NOTEBOOK_KEYS = ("W", "grad_W", "losses", "W_initial", "n_runs", "init_seed", "train_seed", "n_steps", "n_live",
                 "n_dead", "vocab_size", "hidden_dim", "init_scale", "learning_rate", "weight_decay", "adam_beta1",
                 "adam_beta2", "recorded_W", "recorded_grads", "recorded_losses")


# -- check ---------------------------------------------------------------------------------------------------------
def test_check_recognises_a_notebook_file_and_says_what_it_cannot_prove(project):
    proc = run_cli("check", "notebook.safetensors", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "written by the Flannel 7 notebook's save cell" in proc.stdout
    assert "not proven: the file holds no digests" in proc.stdout
    assert "W_initial is exactly what torch" in proc.stdout  # drawn again from init_seed and init_scale
    assert "verdict: intact as far as it can be checked (exit 0)" in proc.stdout
    doc = json.loads(run_cli("check", "notebook.safetensors", "--json", cwd=project).stdout)
    assert doc["kind"] == "notebook" and doc["verdict"] == "intact"


def _set_i64(value: int):
    return lambda p, key: patch(p, offset(p, key), struct.pack("<q", value))


@pytest.mark.parametrize("key, index, edit, expect", [
    ("n_steps", (), _set_i64(STEPS + 1), "W: has 6 along steps+1, but the file's n_steps + 1 is 7"),
    ("n_live", (), _set_i64(1), "n_live: n_live 1 + n_dead"),
    ("vocab_size", (), _set_i64(301), "W_initial: has 300 along vocab_size, but the file's vocab_size is 301"),
    ("recorded_grads", (), lambda p, k: patch(p, offset(p, k), b"\x00"), "grad_W: is in the file, but recorded_grads"),
    ("learning_rate", (), lambda p, k: patch(p, offset(p, k), struct.pack("<f", -1.0)), "learning_rate"),
    ("W", (0, 0, 7, 3), lambda p, k: flip(p, offset(p, k, (0, 0, 7, 3))), "W at run 0, step 0: the slice is not "
                                                                          "W_initial"),
    ("grad_W", (0, 0, 2, 1), lambda p, k: flip(p, offset(p, k, (0, 0, 2, 1))), "grad_W at run 0, step 0: the slice "
                                                                               "is not zeros"),
    ("losses", (0, 0), lambda p, k: patch(p, offset(p, k, (0, 0)), b"\x00\x00"), "losses at run 0, step 0: is not "
                                                                                  "NaN"),
    ("W", (0, 3), lambda p, k: patch(p, offset(p, k, (0, 3)), bytes(300 * 16 * 2)), "W at run 0, step 3: the slice "
                                                                                   "is all zeros"),
])
def test_check_finds_where_a_notebook_file_contradicts_itself(project, key, index, edit, expect):
    path = project / "notebook.safetensors"
    edit(path, key)
    proc = run_cli("check", str(path), cwd=project)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expect in proc.stdout
    assert "verdict: corrupt (exit 1)" in proc.stdout


def test_check_of_a_truncated_notebook_file_is_corrupt(project):
    path = project / "notebook.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    proc = run_cli("check", str(path), cwd=project)
    assert proc.returncode == 1 and "the file is truncated" in proc.stdout


def test_check_cannot_see_a_changed_byte_after_step_0_and_says_so(project):
    """What only a rerun can find: check passes it, and says so; verify (below) finds it."""
    path = project / "notebook.safetensors"
    flip(path, offset(path, "W", (0, 3, 5, 2)))
    proc = run_cli("check", str(path), cwd=project)
    assert proc.returncode == 0 and "only a rerun finds it" in proc.stdout


# -- verify --------------------------------------------------------------------------------------------------------
def test_verify_of_a_notebook_file_on_its_own_data_is_bit_identical(project):
    proc = run_cli("verify", "notebook.safetensors", "--report", "verify.json", "-q", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"BIT-IDENTICAL: all {STEPS + 1} recorded steps match" in out
    assert "verdict: bit-identical (exit 0)" in out
    # params.yaml (the tiny defaults) sets what the file and the notebook fix otherwise: named, not used
    assert "model.max_seq_len (16 -> 128)" in out and "train.batch_size (4 -> 32)" in out
    assert "train.steps (6 -> 5)" in out
    # the inputs it used, the masks checked, the device it reran on
    assert "inputs (not recorded in the file, so a divergence may come from them): corpus " \
           "data/flannel_model_corpus.txt" in out
    assert "n_live" in out and "match tensors/Flannel/live_dead_tokens.safetensors" in out
    assert "does not record its device" in out and "the rerun ran on cpu" in out
    doc = json.loads((project / "verify.json").read_text())
    assert doc["verdict"] == "identical" and doc["reruns"][0]["record_differences"] == []
    assert any("losses_f32" in x for x in doc["not_checked"])


@pytest.mark.parametrize("key, step, index", [("W", 3, (0, 3, 11, 4)), ("grad_W", 2, (0, 2, 40, 0)),
                                              ("losses", 4, (0, 4))])
def test_verify_finds_one_changed_byte_at_its_step(project, key, step, index):
    path = project / "notebook.safetensors"
    flip(path, offset(path, key, index))
    proc = run_cli("verify", str(path), "--json", "-q", cwd=project)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "diverged"
    assert (doc["first_divergent_step"], doc["first_divergent_tensor"]) == (step, key)
    assert f"DIVERGED at run 0, step {step}: {key}" in proc.stderr


def test_verify_of_a_notebook_file_on_other_data_is_diverged_and_names_the_inputs(project):
    """The same tokenizer, another corpus (so other masks): the file's n_live/n_dead and its numbers differ."""
    params = load_params(write_params(project, {"corpus": {"seed": 5}}))
    corpus(params, project)
    masks(params, project)
    proc = run_cli("verify", "notebook.safetensors", "--json", "-q", cwd=project)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "diverged" and doc["first_divergent_step"] == 0
    assert {"n_live", "n_dead"} <= set(doc["reruns"][0]["divergences"][0]["tensors"])
    assert "these are not the masks the notebook ran with" in proc.stderr
    assert "a divergence may come from them" in proc.stderr


def test_verify_of_a_notebook_file_whose_seed_was_edited_is_diverged(project):
    """seed43 trained with train_seed 43; its scalar made to say 42: the rerun with 42 parts from it at step 1."""
    path = project / "seed43.safetensors"
    patch(path, offset(path, "train_seed"), struct.pack("<q", 42))
    proc = run_cli("verify", str(path), "--json", "-q", cwd=project)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "diverged" and doc["first_divergent_step"] == 1
    assert {"losses", "grad_W", "W"} <= set(doc["reruns"][0]["divergences"][0]["tensors"])


# -- diff and adopt ------------------------------------------------------------------------------------------------
@pytest.fixture
def trained(project) -> Path:
    """`flannel-repro train` of the notebook's run (the same params) in `project`: ours.safetensors."""
    write_params(project, {**NOTEBOOK_RUN, "paths": {"trajectory": "ours.safetensors"}})
    run_cli("train", "-q", cwd=project, check=True)
    return project / "ours.safetensors"


def test_diff_takes_a_notebook_file_on_either_side(project, trained):
    for a, b in (("notebook.safetensors", "ours.safetensors"), ("ours.safetensors", "notebook.safetensors")):
        proc = run_cli("diff", a, b, cwd=project)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"agree bit for bit at all {STEPS + 1} steps" in proc.stdout
        assert "was written by the notebook: its inputs are not recorded" in proc.stdout
    proc = run_cli("diff", "seed43.safetensors", "ours.safetensors", cwd=project)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "first divergence: run 0, step 1, tensor loss" in proc.stdout


def test_adopt_then_check_is_intact_with_the_content_lines_of_a_train_run(project, trained):
    source = project / "notebook.safetensors"
    proc = run_cli("adopt", str(source), "adopted.safetensors", cwd=project)
    assert proc.returncode == 0, proc.stderr
    adopted = project / "adopted.safetensors"
    assert f"adopted: {adopted.name}" in proc.stdout
    check = run_cli("check", "adopted.safetensors", cwd=project)
    assert check.returncode == 0, check.stdout
    assert "verdict: intact" in check.stdout
    ours, theirs = content_lines(trained), content_lines(adopted)
    for key in NOTEBOOK_KEYS:
        assert theirs[key] == ours[key], key
        if key not in ("W", "grad_W"):  # every key the notebook wrote, byte for byte (per-step ones via digests)
            assert key_sha256(adopted, key) == key_sha256(source, key), key
    for key in ("W", "grad_W"):
        assert key_sha256(adopted, key) == key_sha256(source, key), key
    meta = header(adopted)[0]["__metadata__"]
    assert "adopted, not recorded" in json.loads(meta["fingerprint"])["recorded"]
    assert json.loads(meta["adopted"])["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert set(json.loads(meta["inputs"])) == {"corpus_sha256", "tokenizer_sha256", "masks_sha256"}
    # and the adopted file verifies like a recorded one, the keys the notebook did not record left out
    proc = run_cli("verify", "adopted.safetensors", "-q", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BIT-IDENTICAL" in proc.stdout and "adopted from a notebook file" in proc.stdout


def test_adopt_refuses_a_notebook_file_that_contradicts_itself(project):
    path = project / "notebook.safetensors"
    patch(path, offset(path, "n_dead"), struct.pack("<q", 7))
    proc = run_cli("adopt", str(path), "adopted.safetensors", cwd=project)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not adopted: n_live: n_live" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "adopted.safetensors").exists()


def test_check_tells_a_flannel_repro_file_saved_again_without_its_header(project):
    """safetensors' load_file + save_file keeps a trajectory's keys and drops its metadata: not a notebook file."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(project / "notebook.safetensors"))
    tensors["digest_W"] = torch.zeros((1, STEPS + 1, 32), dtype=torch.uint8)
    tensors["losses_f32"] = torch.zeros((1, STEPS + 1))
    save_file(tensors, str(project / "resaved.safetensors"))
    proc = run_cli("check", "resaved.safetensors", cwd=project)
    assert proc.returncode == 1
    assert "holds flannel-repro's own keys (digest_W, losses_f32) but no header metadata" in proc.stdout
