"""Bad input: one line on stderr naming the file or key and the fix, a non-zero exit, no traceback, nothing
overwritten. Each case goes through the CLI's `main` in-process (the same code path as the installed command, minus
5 s of imports); a few run as real subprocesses to pin the process-level behaviour too."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from flannel_repro.cli import main
from flannel_repro.config import ConfigError, params_from_dict, parse_yaml
from flannel_repro.fsutil import TMP_PREFIX

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
PREVIOUS = b"a previous trajectory\n"


def _set(root: Path, section: str, key: str, value) -> None:
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(doc))


def _write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


# (case id, how to break the project, a fragment the one line must contain)
CASES = [
    ("missing corpus", lambda r: (r / "data/flannel_model_corpus.txt").unlink(), "flannel_model_corpus.txt: corpus not found"),
    ("missing tokenizer", lambda r: (r / "data/flannel_tokenizer_chars.json").unlink(), "tokenizer file not found"),
    ("missing masks", lambda r: (r / "tensors/Flannel/live_dead_tokens.safetensors").unlink(), "masks file not found"),
    ("vocab mismatch", lambda r: _set(r, "model", "vocab_size", 301), "tokenizer has 300 tokens but model.vocab_size is 301"),
    ("short corpus", lambda r: _write(r, "data/flannel_model_corpus.txt", b"the of and"), "fewer than model.max_seq_len + 1"),
    ("non-utf8 corpus", lambda r: _write(r, "data/flannel_model_corpus.txt", b"caf\xe9 " * 100), "is not UTF-8 text"),
    ("masks of other vocab", lambda r: _write_masks(r, 200), "masks file is for a vocabulary of 200 tokens"),
    ("params not yaml", lambda r: _write(r, "params.yaml", b"train: [steps\n"), "params.yaml: not valid YAML"),
    ("unknown key", lambda r: _set(r, "train", "stepz", 3), "unknown key 'train.stepz'"),
    ("wrong type", lambda r: _set(r, "train", "steps", "ten"), "train.steps must be int"),
    ("steps 0", lambda r: _set(r, "train", "steps", 0), "train.steps = 0 must be at least 1"),
    ("batch 0", lambda r: _set(r, "train", "batch_size", 0), "train.batch_size = 0 must be at least 1"),
    ("negative lr", lambda r: _set(r, "train", "learning_rate", -0.1), "train.learning_rate = -0.1 must be positive"),
    ("n_head", lambda r: _set(r, "model", "n_head", 3), "model.n_head = 3 does not divide model.hidden_dim = 16"),
    ("logits", lambda r: _set(r, "record", "logits", True), "record.logits = True is not supported"),
    ("masks not safetensors", lambda r: _write(r, "tensors/Flannel/live_dead_tokens.safetensors", b"hello world, not a tensor file"), "not a safetensors file"),
    ("masks truncated", lambda r: _truncate(r / "tensors/Flannel/live_dead_tokens.safetensors"), "truncated"),
    ("masks corrupt header", lambda r: _corrupt_header(r / "tensors/Flannel/live_dead_tokens.safetensors"), "masks file"),
    ("output parent is a file", lambda r: (_write(r, "blocker", b"x"), _set(r, "paths", "trajectory", "blocker/t.st")), "blocker is a file, not a folder"),
    ("output under /proc", lambda r: _set(r, "paths", "trajectory", "/proc/flannel/t.st"), "/proc/flannel: cannot write the output folder"),
]


def _write_masks(root: Path, vocab: int) -> None:
    """A well-formed masks file, but for a vocabulary of `vocab` tokens."""
    import torch
    from safetensors.torch import save_file

    live = torch.ones(vocab, dtype=torch.bool)
    tensors = {"live_mask": live, "dead_mask": ~live, "live_indices": torch.arange(vocab),
               "dead_indices": torch.zeros(0, dtype=torch.long), "counts": torch.ones(vocab, dtype=torch.long)}
    save_file(tensors, str(root / "tensors/Flannel/live_dead_tokens.safetensors"), metadata={"vocab_size": str(vocab)})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe\x00{"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, breaks, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_overwrites_nothing(tiny_project, capsys, monkeypatch, case, breaks, expected):
    _write(tiny_project, TRAJ, PREVIOUS)
    breaks(tiny_project)
    monkeypatch.chdir(tiny_project)
    code = main(["train", "-q"])
    out, err = capsys.readouterr()
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("flannel-repro train: error: ") and expected in line, line
    assert (tiny_project / TRAJ).read_bytes() == PREVIOUS
    assert list((tiny_project / TRAJ).parent.glob(f"{TMP_PREFIX}*")) == []
    assert not (tiny_project / "metrics").exists()


@pytest.mark.parametrize("case", ["params not yaml", "missing corpus", "masks truncated"])
def test_bad_input_through_a_real_process(tiny_project, case):
    _, breaks, expected = next(c for c in CASES if c[0] == case)
    _write(tiny_project, TRAJ, PREVIOUS)
    breaks(tiny_project)
    proc = run_cli("train", "-q", cwd=tiny_project)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert expected in line
    assert (tiny_project / TRAJ).read_bytes() == PREVIOUS


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=8)
keys = st.sampled_from(["corpus", "tokenizer", "model", "train", "record", "paths", "tracking", "other", 1, None])
field_names = st.sampled_from(["steps", "batch_size", "learning_rate", "n_head", "hidden_dim", "logits", "device",
                               "num_threads", "checkpoint_every", "uri", "source", "bogus"])
documents = st.dictionaries(keys, st.dictionaries(field_names, values, max_size=4) | values, max_size=4) | values


@settings(max_examples=150, deadline=None)
@given(documents)
def test_any_params_document_is_accepted_or_a_config_error(doc):
    try:
        params_from_dict(doc)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=string.printable + "é\u2028", max_size=80))
def test_any_yaml_text_is_accepted_or_a_config_error(text):
    try:
        params_from_dict(parse_yaml(text, "params.yaml"))
    except ConfigError:
        pass
