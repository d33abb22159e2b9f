"""Bit-for-bit fidelity: flannel-repro's trajectory equals what the notebook's own code records on the same
files, device and thread count, byte for byte, for every key the notebook saves."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli, write_params

# Big enough that attention, clipping and Adam all matter; small enough to run in seconds.
SHAPE = {"vocab_size": 300, "hidden_dim": 32, "n_layer": 2, "n_head": 2, "max_seq_len": 32}
STEPS, BATCH = 8, 8


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# (threads, checkpoint_every): resumable checkpoints are saved in between steps and must not change a number.
@pytest.mark.parametrize("threads, checkpoint_every", [(1, 0), (2, 3)])
def test_trajectory_equals_the_notebook_bit_for_bit(tiny_project, threads, checkpoint_every):
    write_params(tiny_project, {"model": SHAPE, "train": {"steps": STEPS, "batch_size": BATCH, "num_threads": threads,
                                                          "checkpoint_every": checkpoint_every}})
    run_cli("train", cwd=tiny_project, check=True)
    ours = load_file(str(tiny_project / "tensors/Flannel/1.20h_flannel_7.safetensors"))

    cfg = {
        "init_seed": 42, "train_seed": 42, **SHAPE, "batch_size": BATCH, "steps": STEPS, "num_threads": threads,
        "tokenizer": str(tiny_project / "data/flannel_tokenizer_chars.json"),
        "corpus": str(tiny_project / "data/flannel_model_corpus.txt"),
        "masks": str(tiny_project / "tensors/Flannel/live_dead_tokens.safetensors"),
        "scratch_dir": str(tiny_project / "notebook_scratch"),
        "output": str(tiny_project / "notebook.safetensors"),
    }
    (tiny_project / "notebook.json").write_text(json.dumps(cfg))
    subprocess.run([sys.executable, str(REPO / "tests/notebook_reference.py"), str(tiny_project / "notebook.json")],
                   check=True, capture_output=True, cwd=tiny_project)
    theirs = load_file(cfg["output"])

    assert set(theirs) <= set(ours)
    for key, ref in theirs.items():
        assert ours[key].dtype == ref.dtype and ours[key].shape == ref.shape, key
        assert _bytes(ours[key]) == _bytes(ref), f"{key} differs from the notebook's"
    assert theirs["grad_W"][0, 1:].any() and not torch.equal(theirs["W"][0, -1], theirs["W"][0, 0])
