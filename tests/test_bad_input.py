"""Bad input: one line on stderr naming the file or key and the fix, a non-zero exit, no traceback, nothing
overwritten. Each case goes through the CLI's `main` in-process (the same code path as the installed command, minus
5 s of imports); a few run as real subprocesses to pin the process-level behaviour too."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_tiny_data, run_cli, write_params
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from flannel_repro.cli import main
from flannel_repro.core.config import ConfigError, params_from_dict, parse_yaml
from flannel_repro.core.fsutil import TMP_PREFIX

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


# --- An output never replaces an input or another output, however the two are spelled. -----------------------------

CORPUS, TOKENIZER, MASKS = "data/flannel_model_corpus.txt", "data/flannel_tokenizer_chars.json", \
    "tensors/Flannel/live_dead_tokens.safetensors"
TOKENIZER_CORPUS = "data/flannel_tokenizer_corpus.txt"


@pytest.fixture(scope="module")
def recorded_template(tmp_path_factory, tiny_data) -> Path:
    """The tiny project with its trajectory recorded, once; each test gets a copy."""
    from flannel_repro.core.config import load_params
    from flannel_repro.training.loop import train

    root = tmp_path_factory.mktemp("recorded")
    copy_tiny_data(tiny_data, root)
    train(load_params(write_params(root)), root, progress=False)
    return root


@pytest.fixture
def recorded(recorded_template, tmp_path) -> Path:
    shutil.copytree(recorded_template, tmp_path / "p")
    return tmp_path / "p"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _one_error_line(capsys, command: str) -> str:
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert line.startswith(f"flannel-repro {command}: error: "), line
    assert out == ""  # nothing ran: no verdict, no result line
    return line


def _link_into_data(root: Path) -> None:
    (root / "data" / "sub").mkdir()
    os.symlink(root / "data" / "sub", root / "tensors" / "up")


# (case id, how to set it up, the command line, fragments the one line must contain)
SAME_FILE_CASES = [
    ("diff A B --csv A", None, ["diff", TRAJ, TRAJ, "--csv", TRAJ], ["--csv (", "is the same file as trajectory A"]),
    ("verify R --report R", None, ["verify", TRAJ, "--report", TRAJ], ["--report (", "the same file as the reference"]),
    ("verify R --report ./spelling", None, ["verify", TRAJ, "--report", f"./tensors/../{TRAJ}"],
     ["--report (", "the same file as the reference"]),
    ("metrics is the corpus", None, ["train", "-S", f"paths.metrics={CORPUS}"],
     ["paths.metrics (", "is the same file as paths.corpus", "in params.yaml"]),
    ("metrics is the corpus, absolute", None, ["train", "-S", "paths.metrics={root}/data/../" + CORPUS],
     ["paths.metrics (", "is the same file as paths.corpus"]),
    ("trajectory is the metrics", None, ["train", "-S", "paths.trajectory=metrics/train.json"],
     ["paths.metrics (", "is the same file as paths.trajectory"]),
    ("a hard link of the corpus as the SQLite store", lambda r: os.link(r / CORPUS, r / "store.db"),
     ["train", "-S", "tracking.enabled=true", "-S", "tracking.uri=sqlite:///store.db"],
     ["the tracking store (", "is the same file as paths.corpus"]),
    ("the corpus through a symbolic-linked folder", lambda r: os.symlink(r / "data", r / "d"),
     ["train", "-S", f"paths.metrics=d/{CORPUS.split('/')[1]}"], ["paths.metrics (", "is the same file as paths.corpus"]),
    # The kernel takes `..` after a symbolic link from the link's target: tensors/up/.. is data/, not tensors/.
    ("the corpus through a symbolic link and ..", _link_into_data,
     ["train", "-S", f"paths.trajectory=tensors/up/../{CORPUS.split('/')[1]}"],
     ["paths.trajectory (", "is the same file as paths.corpus"]),
    ("verify --report over the corpus through a symbolic link and ..", _link_into_data,
     ["verify", TRAJ, "--report", f"tensors/up/../{CORPUS.split('/')[1]}"],
     ["is the same file as the reference's paths.corpus"]),
    ("the reference through a symbolic link", lambda r: os.symlink(r / TRAJ, r / "link.st"),
     ["verify", "link.st", "--report", TRAJ], ["--report (", "is the same file as the reference (link.st)"]),
    ("the tracking store as metrics", None,
     ["train", "-S", "tracking.enabled=true", "-S", "paths.metrics=mlflow.db"],
     ["paths.metrics (", "is the same file as the tracking store"]),
    ("corpus over params.yaml", None, ["corpus", "-S", "paths.corpus=params.yaml"],
     ["paths.corpus (", "is the same file as --params"]),
    ("masks over the tokenizer", None, ["masks", "-S", f"paths.masks={TOKENIZER}"],
     ["paths.masks (", "is the same file as paths.tokenizer"]),
    ("tokenizer corpus over the model corpus", None,
     ["tokenizer-corpus", "-S", f"paths.tokenizer_corpus={CORPUS}"],
     ["paths.tokenizer_corpus (", "is the same file as paths.corpus"]),
    ("tokenizer over its corpus", None, ["tokenizer", "-S", f"paths.tokenizer={TOKENIZER_CORPUS}"],
     ["paths.tokenizer (", "is the same file as paths.tokenizer_corpus"]),
    ("diff --plot is --csv", None, ["diff", TRAJ, TRAJ, "--csv", "x.csv", "--plot", "data/../x.csv"],
     ["--plot (data/../x.csv) is the same file as --csv (x.csv)"]),
    ("diff --csv over A's masks", None, ["diff", TRAJ, TRAJ, "--csv", MASKS], ["is the same file as A's paths.masks"]),
    ("verify --report over the corpus", None, ["verify", TRAJ, "--report", CORPUS],
     ["is the same file as the reference's paths.corpus"]),
    ("check R --report R", None, ["check", TRAJ, "--report", TRAJ], ["--report (", "is the same file as the trajectory"]),
    ("check --report over params.yaml", None, ["check", TRAJ, "--report", "params.yaml"],
     ["is the same file as --params"]),
]


def _bind_mount(root: Path) -> None:
    (root / "alias").mkdir()
    if subprocess.run(["mount", "--bind", str(root / "data"), str(root / "alias")], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")


SAME_FILE_CASES.append(("the corpus through a bind mount", _bind_mount,
                        ["train", "-S", f"paths.metrics=alias/{CORPUS.split('/')[1]}"],
                        ["paths.metrics (", "is the same file as paths.corpus"]))


@pytest.mark.parametrize("case, setup, argv, expected", SAME_FILE_CASES, ids=[c[0] for c in SAME_FILE_CASES])
def test_an_output_is_never_an_input_or_another_output(recorded, capsys, monkeypatch, case, setup, argv, expected):
    if setup is not None:
        setup(recorded)
    before = _snapshot(recorded)
    monkeypatch.chdir(recorded)
    try:
        code = main([a.format(root=recorded) for a in argv])
        after = _snapshot(recorded)
    finally:
        if (recorded / "alias").exists():  # a bind mount on the same device is no `is_mount()`
            subprocess.run(["umount", str(recorded / "alias")], capture_output=True)
    line = _one_error_line(capsys, argv[0])
    assert code == 2
    assert all(x in line for x in expected), line
    assert "give " in line and "a path of its own" in line
    assert after == before  # nothing written, nothing replaced, no report folder made


def test_a_link_at_an_output_path_is_replaced_not_followed(recorded, capsys, monkeypatch):
    """Outputs are renamed into place, so an output at a hard link of the corpus, or at a symbolic link to the masks,
    replaces that link, never the file behind it: DVC's cache links identical files so (a tokenizer corpus copied
    from the model corpus), and their stages must rerun."""
    os.link(recorded / CORPUS, recorded / "m.json")
    os.symlink(recorded / MASKS, recorded / "curve.csv")
    write_params(recorded, {"tokenizer_corpus": {"source": CORPUS}})
    os.unlink(recorded / TOKENIZER_CORPUS)
    os.link(recorded / CORPUS, recorded / TOKENIZER_CORPUS)  # as `dvc checkout` leaves them
    corpus, masks = (recorded / CORPUS).read_bytes(), (recorded / MASKS).read_bytes()
    monkeypatch.chdir(recorded)
    assert main(["tokenizer-corpus"]) == 0
    assert main(["train", "-q", "-S", "paths.metrics=m.json", "-S", "paths.loss_curve=curve.csv"]) == 0
    capsys.readouterr()
    assert (recorded / CORPUS).read_bytes() == corpus and (recorded / TOKENIZER_CORPUS).read_bytes() == corpus
    assert (recorded / MASKS).read_bytes() == masks
    assert json.loads((recorded / "m.json").read_text())["trajectory_sha256"]
    assert not (recorded / "curve.csv").is_symlink()


@pytest.mark.parametrize("argv, key", [(["verify", TRAJ, "--report", "odd"], "--report"),
                                       (["diff", TRAJ, TRAJ, "--csv", "odd"], "--csv")])
def test_an_output_that_is_a_fifo_or_device_is_not_replaced(recorded, capsys, monkeypatch, argv, key):
    """Renaming a report over /dev/null (as root) would replace the device; a FIFO stands in for it here."""
    os.mkfifo(recorded / "odd")
    monkeypatch.chdir(recorded)
    assert main(argv) == 2
    assert f"odd: {key} is a FIFO (named pipe), not a file" in _one_error_line(capsys, argv[0])
    assert (recorded / "odd").is_fifo()


@pytest.mark.parametrize("argv, expected", [
    (["train", "-S", "paths.metrics=/proc/flannel/train.json"], "/proc/flannel: cannot write the output folder"),
    (["verify", TRAJ, "--report", "gone/v.json"], "gone is a symbolic link to /nonexistent/folder, which does not exist"),
])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(recorded, capsys, monkeypatch, argv,
                                                                          expected):
    os.symlink("/nonexistent/folder", recorded / "gone")
    before = _snapshot(recorded)
    monkeypatch.chdir(recorded)
    assert main(argv) == 2
    assert expected in _one_error_line(capsys, argv[0])  # and no verdict: the rerun never started
    assert _snapshot(recorded) == before  # the trajectory was not replaced by a run whose reports cannot be written


@pytest.mark.parametrize("kind", ["FIFO", "folder", "symbolic-link loop"])
def test_an_input_that_is_not_a_regular_file_is_named_as_what_it_is(recorded, capsys, monkeypatch, kind):
    target = recorded / "odd"
    expected = {"FIFO": "is a FIFO (named pipe), not a file", "folder": "is a folder, not a file",
                "symbolic-link loop": "is a loop of symbolic links"}[kind]
    {"FIFO": os.mkfifo, "folder": os.mkdir, "symbolic-link loop": lambda p: os.symlink(p, p)}[kind](target)
    monkeypatch.chdir(recorded)
    for argv in (["train", "-S", "paths.tokenizer=odd"], ["masks", "-S", "paths.corpus=odd"],
                 ["verify", "odd"], ["diff", TRAJ, "odd"]):
        assert main(argv) == 2, argv  # a FIFO would block the reader forever
        line = _one_error_line(capsys, argv[0])
        assert expected in line and "odd" in line, line


# --- One line for every bad input, before any expensive work. -------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping the data region as it is."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _unknown_dtype(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q8"


def _overlap(header: dict) -> None:
    """Move a tensor into the bytes of a larger one, neither of them the last: the data region still ends where the
    last tensor does, so only the overlap is wrong."""
    spans = sorted((hi - lo, k) for k, v in header.items() if k != "__metadata__" for lo, hi in [v["data_offsets"]])
    last = max((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")[1]
    candidates = [s for s in spans if s[1] != last and s[0] > 0]  # (size, name), smallest first
    (_, small), (_, big) = candidates[0], candidates[-1]
    lo = header[big]["data_offsets"][0]
    size = header[small]["data_offsets"][1] - header[small]["data_offsets"][0]
    header[small]["data_offsets"] = [lo, lo + size]


def _number_metadata(header: dict) -> None:
    key = "versions" if "versions" in header["__metadata__"] else "vocab_size"
    header["__metadata__"][key] = 300


HEADER_CORRUPTIONS = {
    "unknown dtype": (_unknown_dtype, "has dtype 'Q8', which no file of this project uses"),
    "overlapping offsets": (_overlap, "overlaps the tensor before it"),
    "non-string metadata": (_number_metadata, "__metadata__: holds a value that is not a string"),
}


@pytest.mark.parametrize("command", ["train", "verify", "diff"])
@pytest.mark.parametrize("corruption", list(HEADER_CORRUPTIONS))
def test_a_forged_safetensors_header_is_one_line(recorded, capsys, monkeypatch, command, corruption):
    """Masks for train, trajectory B for diff: one error line (read_header is the one gate). The reference for
    verify: its verdict, reference corrupt (exit 1), without a rerun or a traceback."""
    edit, expected = HEADER_CORRUPTIONS[corruption]
    target = {"train": MASKS, "verify": TRAJ, "diff": "b.safetensors"}[command]
    if command == "diff":
        shutil.copyfile(recorded / TRAJ, recorded / target)
    _rewrite_header(recorded / target, edit)
    monkeypatch.chdir(recorded)
    argv = {"train": ["train"], "verify": ["verify", TRAJ], "diff": ["diff", TRAJ, target]}[command]
    if command == "verify":
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert err == "" and "not rerun: the reference is corrupt" in out
        assert "verdict: reference corrupt (exit 1): " in out and expected.split(": ")[-1] in out, out
        return
    assert main(argv) == 2
    line = _one_error_line(capsys, command)
    assert f"{target}: " in line and "is truncated or corrupt: " in line, line
    assert expected.replace(": ", " ") in line, line


@pytest.mark.parametrize("command", ["verify", "diff"])
def test_recorded_provenance_of_the_wrong_json_type_is_one_line(recorded, capsys, monkeypatch, command):
    _rewrite_header(recorded / TRAJ, lambda h: h["__metadata__"].update(fingerprint="[1, 2]"))
    monkeypatch.chdir(recorded)
    assert main(["verify", TRAJ] if command == "verify" else ["diff", TRAJ, TRAJ]) == 2
    line = _one_error_line(capsys, command)
    assert f"{TRAJ}: the recorded fingerprint is a JSON list, not a JSON object" in line


def test_a_reference_with_a_bad_recorded_value_is_not_blamed_on_params_yaml(recorded, capsys, monkeypatch):
    def edit(header):
        params = json.loads(header["__metadata__"]["params"])
        params["train"]["learning_rate"] = -1.0
        header["__metadata__"]["params"] = json.dumps(params)

    _rewrite_header(recorded / TRAJ, edit)
    monkeypatch.chdir(recorded)
    assert main(["verify", TRAJ]) == 1  # a corrupt reference
    out, err = capsys.readouterr()
    assert err == "" and "train.learning_rate = -1.0 must be positive and finite" in out
    assert "(in params.yaml)" not in out and "params.yaml is not involved" in out


@pytest.mark.parametrize("command", ["masks", "train"])
def test_a_tokenizer_numbering_a_token_past_its_vocabulary_is_refused(recorded, capsys, monkeypatch, command):
    """The tokenizer declares 300 tokens but numbers a dead one 5000: W has no row for it, so the file is refused
    even though this corpus never gives that id (one it gives is refused after encoding: test_data_stages)."""
    doc = json.loads((recorded / TOKENIZER).read_text())
    vocab = doc["model"]["vocab"]
    dead = int(load_file(str(recorded / MASKS))["dead_indices"].max())
    vocab[next(k for k, i in vocab.items() if i == dead)] = 5000
    (recorded / TOKENIZER).write_text(json.dumps(doc))
    before = _snapshot(recorded)
    monkeypatch.chdir(recorded)
    assert main([command]) == 2
    line = _one_error_line(capsys, command)
    assert f"{TOKENIZER}: tokenizer gives token id 5000 but has 300 tokens (ids from 0 to 299)" in line
    assert _snapshot(recorded) == before


@pytest.mark.parametrize("command, text, what", [("masks", CORPUS, "corpus"),
                                                  ("tokenizer", TOKENIZER_CORPUS, "tokenizer corpus")])
def test_an_empty_corpus_is_refused(recorded, capsys, monkeypatch, command, text, what):
    (recorded / text).write_text("\n\n  \n")
    before = _snapshot(recorded)
    monkeypatch.chdir(recorded)
    assert main([command]) == 2
    assert f"{text}: {what} is empty" in _one_error_line(capsys, command)
    assert _snapshot(recorded) == before


def test_with_tracking_on_a_vocabulary_mismatch_blames_the_tokenizer(recorded, capsys, monkeypatch):
    monkeypatch.chdir(recorded)
    assert main(["train", "-S", "model.vocab_size=301", "-S", "tracking.enabled=true"]) == 2
    line = _one_error_line(capsys, "train")
    assert f"{TOKENIZER}: tokenizer has 300 tokens but model.vocab_size is 301" in line
    assert not (recorded / "mlflow.db").exists()  # checked before the tracking run was opened


def test_a_symbolic_link_loop_is_not_reported_as_missing(recorded, capsys, monkeypatch):
    (recorded / MASKS).unlink()
    os.symlink(recorded / MASKS, recorded / MASKS)
    monkeypatch.chdir(recorded)
    assert main(["train"]) == 2
    line = _one_error_line(capsys, "train")
    assert "paths.masks is a loop of symbolic links" in line and "not found" not in line


@pytest.mark.parametrize("command", ["train", "verify"])
@pytest.mark.parametrize("how", ["chattr +i", "read-only file"])
def test_a_tracking_store_that_cannot_be_written_is_one_line(recorded, how, command):
    """train refuses before any work; verify still gives its verdict, and one note that it could not be logged."""
    write_params(recorded, {"tracking": {"enabled": True}})
    db = recorded / "mlflow.db"
    db.write_bytes(b"")
    if how == "chattr +i":
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes a read-only file anyway")
        db.chmod(0o444)
    try:
        proc = run_cli(command, *([TRAJ] if command == "verify" else []), "-q", cwd=recorded)
    finally:
        subprocess.run(["chattr", "-i", str(db)], capture_output=True)
    if command == "train":
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"flannel-repro train: error: {db}: the tracking store cannot be written (")
        assert "tracking.enabled: false" in line
    else:
        assert proc.returncode == 0 and proc.stderr == ""
        *_, verdict, note = proc.stdout.splitlines()
        assert verdict == "verdict: bit-identical (exit 0)"
        assert note.startswith("note: the verdict could not be logged to tracking: tracking store ")
        assert "readonly database" in note


@pytest.mark.parametrize("after", ["yaml", "torch"])
def test_ctrl_c_during_start_up_is_one_line(tiny_project, after):
    """SIGINT as soon as `-X importtime` shows the start-up importing `after` (the params reader, torch)."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "flannel_repro", "train", "-q"], cwd=tiny_project,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("import time:") and line.split("|")[-1].strip().startswith(after):
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=120)
    said = [x for x in [*lines, *rest.splitlines(keepends=True)] if not x.startswith("import time:")]
    assert proc.returncode == 128 + signal.SIGINT, said
    assert [x.rstrip("\n") for x in said] == ["flannel-repro train: interrupted; no output was written"]
    assert not (tiny_project / TRAJ).exists()


@pytest.fixture
def full_tmpfs(tmp_path) -> Path:
    """A real 64 KiB tmpfs, filled up; skipped where mounting is not allowed."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(mount / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_after_the_trajectory_is_committed_says_the_trajectory_is_in_place(
        tiny_project, capsys, monkeypatch, full_tmpfs):
    monkeypatch.chdir(tiny_project)
    metrics = full_tmpfs / "train.json"
    assert main(["train", "-q", "-S", f"paths.metrics={metrics}"]) == 2
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    sha = hashlib.sha256((tiny_project / TRAJ).read_bytes()).hexdigest()
    assert line.startswith(f"flannel-repro train: error: {metrics}: could not be written (No space left on device, ")
    assert f"the trajectory itself is complete and in place ({TRAJ}, sha256 {sha})" in line


def _file_size_limited(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


@pytest.mark.parametrize("command, limit, expected", [
    ("train", 64 * 1024, "cannot reserve "),  # the trajectory is larger than the limit
    ("corpus", 4096, f"{CORPUS}: could not be written ("),  # a plain output written past the limit
])
def test_a_file_size_limit_is_not_blamed_on_free_space(tiny_project, command, limit, expected):
    """RLIMIT_FSIZE (`ulimit -f`) makes writes fail with EFBIG, however much room the disk has."""
    proc = subprocess.run([sys.executable, "-m", "flannel_repro", command], cwd=tiny_project, capture_output=True,
                          text=True, preexec_fn=_file_size_limited(limit), timeout=300)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert expected in line and f"at most {limit:,} bytes (ulimit -f)" in line, line
    assert "free" not in line


def test_steps_beyond_the_disk_are_refused_with_the_size_and_the_free_space(tiny_project):
    """10**9 steps of the tiny run need about 19 TB; refused before any per-step memory is allocated (the address
    space is capped at 8 GiB, so a run that tried would fail on memory instead)."""
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "flannel_repro", "train", "-q", "-S", "train.steps=1000000000"],
                          cwd=tiny_project, capture_output=True, text=True, preexec_fn=limits, timeout=300)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    folder = tiny_project / TRAJ.rsplit("/", 1)[0]
    prefix = f"flannel-repro train: error: {folder}: cannot reserve "
    assert line.startswith(prefix), line
    size = int(line[len(prefix):].split()[0].replace(",", ""))
    assert size >= 10**9 * 2 * 300 * 16 * 2  # W and grad_W, (V, H) bf16 each, at every step
    assert " bytes for the trajectory (No space left on device: " in line and " bytes free); " in line
    assert not list(folder.glob(f"{TMP_PREFIX}*"))


def test_steps_beyond_the_memory_are_refused(tiny_project, capsys, monkeypatch):
    """Recording only the scalars, the file is small but the per-step records in memory are not."""
    from flannel_repro.training.preflight import BYTES_PER_STEP, available_memory

    available = available_memory()
    if available is None:
        pytest.skip("no MemAvailable here")
    steps = 2 * available // BYTES_PER_STEP
    monkeypatch.chdir(tiny_project)
    assert main(["train", "-q", "-S", f"train.steps={steps}", "-S", "record.W=false", "-S", "record.grads=false"]) == 2
    line = _one_error_line(capsys, "train")
    assert f"train.steps = {steps:,} x train.num_runs = 1 keeps about " in line and "GiB available" in line


def test_far_more_threads_than_cores_is_one_warning(tiny_project, capsys, monkeypatch):
    import torch

    cores = len(os.sched_getaffinity(0))
    monkeypatch.chdir(tiny_project)
    threads = torch.get_num_threads()
    try:
        assert main(["train", "-q", "-S", "train.steps=1", "-S", f"train.num_threads={4 * cores}"]) == 0
    finally:
        torch.set_num_threads(threads)
    _, err = capsys.readouterr()
    assert err.splitlines() == [f"flannel-repro: warning: {4 * cores} CPU threads (train.num_threads) on {cores} "
                                "available cores: this run may be much slower; keep the count only to match a "
                                "recorded run (it is part of the bits)"]


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_outputs_get_the_mode_the_umask_gives(tiny_project, capsys, monkeypatch, umask):
    """mkstemp makes 0600 files whatever the umask; a collaborator or a DVC remote on a shared folder reads ours."""
    monkeypatch.chdir(tiny_project)
    old = os.umask(umask)
    try:
        for command in ("corpus", "tokenizer", "masks", "train"):
            assert main([command, *(["-q"] if command == "train" else [])]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for rel in (CORPUS, TOKENIZER, MASKS, TRAJ, "metrics/train.json", "metrics/train_loss.csv"):
        assert (tiny_project / rel).stat().st_mode & 0o777 == 0o666 & ~umask, rel
