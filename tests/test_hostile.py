"""Hostile input, third sweep: every command ends in one line, in bounded time, with no secret in any file or line,
and exit 0/1 only for a verdict. Each test stands for a family of inputs (docs/security.md); real processes, a real
MLflow store and server.

The families: integers too long to print; JSON nested too deeply; header work bounded by the header's size; a file
that changes while it is read; YAML aliases, duplicate keys and sections that are not mappings; NUL bytes and
non-UTF-8 file names; integers out of range; malformed tracking URIs, missing database drivers and credentials in
URIs; exit codes after the verdict; kernel-selecting environment variables in the fingerprint; a corrupt sync
spool.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_tiny_data, mlflow_server, run_cli, write_params
from corrupt import edit_header, read_head

from flannel_repro.core.config import load_params
from flannel_repro.core.errors import ConfigError
from flannel_repro.core.safetensors_header import layout_problems, read_raw_header
from flannel_repro.trajectory.provenance import fingerprint_mismatches

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
SECRET = "S3cretPW"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """The tiny project and its trajectory, recorded once; tests damage copies."""
    from flannel_repro.training.loop import train

    root = tmp_path_factory.mktemp("hostile")
    copy_tiny_data(tiny_data, root)
    write_params(root)
    train(load_params(root / "params.yaml"), root, progress=False)
    return root


def one_line(proc: subprocess.CompletedProcess, code: int | tuple[int, ...] = 2) -> str:
    """The single stderr line of a refused command (its exit status `code`), with no traceback."""
    codes = code if isinstance(code, tuple) else (code,)
    assert proc.returncode in codes, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert len(lines[0]) < 1000, lines[0][:300]
    return lines[0]


def raw_header_file(src: Path, dst: Path, edit) -> None:
    """Copy `src` with its JSON header text rewritten by `edit(text) -> text` (no JSON round trip: the result may be
    JSON Python's own encoder could not write), padded to 8 bytes; the data region unchanged."""
    _, data = read_head(src)
    blob = src.read_bytes()
    raw = edit(blob[8:data].decode().rstrip(" ")).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[data:])


def with_params_text(src: Path, dst: Path, text: str) -> None:
    """Copy with the header's recorded params replaced by `text` (any string)."""
    def edit(h):
        h["__metadata__"]["params"] = text
    edit_header(src, dst, edit)


# -- 1. integers Python cannot print -----------------------------------------------------------------------------
def test_an_integer_of_thousands_of_digits_is_one_line_wherever_it_is(project, tmp_path):
    src = project / TRAJ
    big = "1" * 5000
    shape = tmp_path / "shape.safetensors"
    raw_header_file(src, shape, lambda t: t.replace('"shape":[1,7,300,16]', f'"shape":[1,7,300,{big}]', 1))
    for cmd in (["check", str(shape)], ["verify", "-q", str(shape)], ["diff", str(shape), str(src)]):
        assert "an integer of 5,000 digits" in one_line(run_cli(*cmd, cwd=project)), cmd
    params = tmp_path / "params.safetensors"  # inside the recorded params (a JSON string in the header)
    with_params_text(src, params, read_head(src)[0]["__metadata__"]["params"].replace('"steps": 6', f'"steps": {big}'))
    proc = run_cli("check", str(params), cwd=project)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "params cannot be read" in proc.stdout and "an integer of 5,000 digits" in proc.stdout
    assert "an integer of 5,000 digits" in one_line(run_cli("diff", str(params), str(src), cwd=project))
    # in params.yaml or an override: refused before conversion
    assert "5,000 digits" in one_line(run_cli("train", "-S", f"train.steps={big}", cwd=project))
    yaml_file = tmp_path / "big.yaml"
    yaml_file.write_text(f"train:\n  seed_list: [1, {big}]\n")
    with pytest.raises(ConfigError, match="line 2: an integer of 5,000 digits"):
        load_params(yaml_file)


def test_a_shape_of_tens_of_thousands_of_entries_is_refused_in_one_line(project, tmp_path):
    src = project / TRAJ
    wide = tmp_path / "wide.safetensors"
    edit_header(src, wide, lambda h: h["W"].update(shape=[7] * 30_000))
    proc = run_cli("check", str(wide), cwd=project, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stdout) < 5000
    assert "W: has a malformed header entry" in proc.stdout
    assert "Traceback" not in run_cli("diff", str(wide), str(src), cwd=project, timeout=120).stderr


# -- 2. deep JSON --------------------------------------------------------------------------------------------
def test_header_params_nested_a_hundred_thousand_deep_is_one_line_in_check_verify_and_diff(project, tmp_path):
    src = project / TRAJ
    deep = tmp_path / "deep.safetensors"
    with_params_text(src, deep, "[" * 100_000)
    check = run_cli("check", str(deep), cwd=project)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "nested too deeply" in check.stdout
    verify = run_cli("verify", "-q", str(deep), cwd=project)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert "verdict: reference corrupt (exit 1): params" in verify.stdout
    assert "nested too deeply" in one_line(run_cli("diff", str(deep), str(src), cwd=project))
    # the header itself nested too deeply
    nested = tmp_path / "nested.safetensors"
    raw_header_file(src, nested, lambda t: t[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}")
    for cmd in (["check", str(nested)], ["verify", "-q", str(nested)], ["diff", str(nested), str(src)]):
        assert "nested too deeply" in one_line(run_cli(*cmd, cwd=project)), cmd


# -- 3. header work bounded by the header's size ------------------------------------------------------------------
def test_a_shape_longer_than_any_tensor_has_is_refused_before_its_product(project, tmp_path):
    """A shape of 200,000 entries of 10**19 each: its product has millions of digits (minutes of work before the
    bound); refused as malformed without computing it."""
    src = project / TRAJ
    huge = tmp_path / "huge.safetensors"
    edit_header(src, huge, lambda h: h["W"].update(shape=[10**19] * 200_000))
    problems = dict(layout_problems(read_raw_header(huge)))
    assert problems["W"] == "has a malformed header entry"
    edit_header(src, huge, lambda h: h["W"].update(shape=[1] * 9))  # one entry past the bound
    assert dict(layout_problems(read_raw_header(huge)))["W"] == "has a malformed header entry"
    proc = run_cli("check", str(huge), cwd=project, timeout=300)  # a stall guard, not a speed target
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


# -- 4. a file that changes while it is read ----------------------------------------------------------------
CHANGE_DURING = """
import os, shutil, sys
from pathlib import Path
import flannel_repro.{module} as m
path, how = Path(sys.argv[1]), sys.argv[2]
real = m.{function}
def changing(*args, **kwargs):
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # cp over it: O_TRUNC, then the same bytes again
        data = path.read_bytes()
        with open(path, "wb") as f:
            f.write(data)
    return real(*args, **kwargs)
m.{function} = changing
from flannel_repro.cli import entry
sys.argv = ["flannel-repro", *sys.argv[3:]]
entry()
"""


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
@pytest.mark.parametrize("command", ["check", "verify"])
def test_a_file_changed_while_check_or_verify_reads_it_is_one_line(project, tmp_path, how, command):
    """The change lands after the header is read, while the slices are read (check's hashing; verify's rerun).
    Through a memory map, a truncation killed the process with SIGBUS (exit 135, no word)."""
    path = tmp_path / "moving.safetensors"
    shutil.copyfile(project / TRAJ, path)
    module, function = ("audit.check", "_hash_slices") if command == "check" else ("training.loop", "train")
    code = CHANGE_DURING.format(module=module, function=function)
    proc = subprocess.run([sys.executable, "-c", code, str(path), how, command, *(["-q"] * (command == "verify")),
                           str(path)], cwd=project, capture_output=True, text=True, timeout=600)
    line = one_line(proc, 2)
    assert line.endswith(f"{path}: the file changed while it was read (it was {(project / TRAJ).stat().st_size:,} "
                         "bytes); check it again once nothing writes to it"), line
    assert "verdict" not in proc.stdout


# -- 5. YAML ---------------------------------------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_at_once_without_expanding_it(tiny_project):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    params = tiny_project / "params.yaml"
    params.write_text("bomb:\n" + "".join(f"  {ln}\n" for ln in levels) + "train:\n  steps: *a8\n")
    assert params.stat().st_size < 2000
    line = one_line(run_cli("train", cwd=tiny_project, timeout=120))
    assert "a YAML alias (*a0)" in line and "line 3" in line


def test_a_long_value_of_the_wrong_type_is_shown_cut_short(tiny_project):
    (tiny_project / "params.yaml").write_text("train:\n  steps: [" + ", ".join(["12345"] * 100_000) + "]\n")
    line = one_line(run_cli("train", cwd=tiny_project))
    assert line.startswith("flannel-repro train: error: params: train.steps must be int, got [12345, 12345, 12345, "
                           "12345, ...] (list)"), line


def test_a_key_given_twice_is_refused_as_dvc_refuses_it(tiny_project):
    params = tiny_project / "params.yaml"
    params.write_text(params.read_text() + "train:\n  steps: 3\n")  # a second train section
    line = one_line(run_cli("train", cwd=tiny_project))
    assert "key 'train' is given twice" in line
    params.write_text("model:\n  hidden_dim: 16\n  hidden_dim: 32\n")
    assert "line 3: key 'hidden_dim' is given twice (also at line 2)" in one_line(run_cli("train", cwd=tiny_project))


@pytest.mark.parametrize("text", ["model: false\n", "train: []\n", "record: 0\n", "paths: some/file\n"])
def test_a_section_that_is_not_a_mapping_is_refused_naming_it(tmp_path, text):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"section '{text.split(':')[0]}' must be a mapping of keys"):
        load_params(tmp_path / "params.yaml")


# -- 6. NUL bytes and non-UTF-8 file names --------------------------------------------------------------------
@pytest.mark.parametrize("key", ["paths.corpus", "corpus.source", "tokenizer.source", "audit.report",
                                 "tracking.uri", "tracking.experiment"])
def test_a_nul_byte_in_a_path_or_uri_is_one_line(tiny_project, key):
    section, name = key.split(".")
    write_params(tiny_project, {section: {name: "sqlite:///a\0b" if name == "uri" else "data/a\0b.txt"}})
    line = one_line(run_cli("train", cwd=tiny_project))
    assert f"{key} = " in line and "holds a NUL byte" in line


def test_a_file_name_that_is_not_utf8_is_refused_alike_by_every_command(project, tmp_path):
    odd = os.fsencode(tmp_path) + b"/traj\xff.safetensors"
    shutil.copyfile(project / TRAJ, odd)
    src = str(project / TRAJ).encode()
    for cmd in ([b"check", odd], [b"verify", b"-q", odd], [b"diff", odd, src], [b"diff", src, odd]):
        proc = subprocess.run([sys.executable, "-m", "flannel_repro", *cmd], cwd=project, capture_output=True)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        assert "traj\\xff.safetensors): the path is not UTF-8 text" in one_line(proc), cmd
    for key in (b"paths.trajectory", b"tokenizer.source", b"corpus.source"):
        proc = subprocess.run([sys.executable, "-m", "flannel_repro", b"train", b"-S", key + b"=out\xff"],
                              cwd=project, capture_output=True)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        assert "holds bytes that are not UTF-8" in one_line(proc), key


# -- 7. integers out of range -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.num_threads=100000000000", "train.steps=1000000000000000000000000",
                                      "train.batch_size=-100000000000000000000", "corpus.n_words=9223372036854775808"])
def test_an_integer_out_of_range_in_params_is_one_line(tiny_project, override):
    key = override.split("=")[0]
    assert f"{key} = " in one_line(run_cli("train", "-S", override, cwd=tiny_project))


@pytest.mark.parametrize("option", [["verify", "--threads", "100000000000"], ["verify", "--repeat", "1" * 5000],
                                    ["check", "--threads", "100000000000"]])
def test_an_integer_out_of_range_on_the_command_line_is_refused(project, option):
    proc = run_cli(*option, str(project / TRAJ), cwd=project)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"argument {option[1]}: " in proc.stderr.splitlines()[-1]


# -- 8. tracking URIs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["http://[::1", "http://127.0.0.1:port", "mysql://user@localhost/db",
                                 "postgresql://localhost/db", "mssql+pyodbc://localhost/db"])
@pytest.mark.parametrize("where", ["params", "environment"])
def test_a_malformed_uri_or_a_missing_driver_is_one_line(tiny_project, uri, where):
    if where == "params":
        proc = run_cli("train", "-S", "tracking.enabled=true", "-S", f"tracking.uri={uri}", cwd=tiny_project)
    else:
        proc = run_cli("train", "-S", "tracking.enabled=true", cwd=tiny_project, env={"MLFLOW_TRACKING_URI": uri})
    line = one_line(proc)
    assert "not a valid URI" in line or "needs the Python package" in line, line


def test_a_password_in_tracking_uri_is_refused_without_repeating_it(tiny_project):
    proc = run_cli("train", "-S", "tracking.enabled=true", "-S", f"tracking.uri=https://alice:{SECRET}@127.0.0.1:1",
                   cwd=tiny_project)
    line = one_line(proc)
    assert SECRET not in proc.stderr + proc.stdout
    assert "https://alice:***@127.0.0.1:1" in line and "MLFLOW_TRACKING_PASSWORD" in line


def test_credentials_in_mlflow_tracking_uri_reach_the_server_and_nothing_else(tiny_project, tmp_path):
    """The probe sends the URI's credentials as MLflow's client does (and is not fooled by them); the password is in
    no output line, no file the run writes, no spool, and nothing the store holds."""
    write_params(tiny_project, {"tracking": {"enabled": True}})
    with mlflow_server(tmp_path) as url:
        uri = url.replace("http://", f"http://alice:{SECRET}@")
        proc = run_cli("train", cwd=tiny_project, env={"MLFLOW_TRACKING_URI": uri})
        assert proc.returncode == 0, proc.stderr
        assert "http://alice:***@127.0.0.1" in proc.stdout
        verify = run_cli("verify", "-q", cwd=tiny_project, env={"MLFLOW_TRACKING_URI": uri})
        assert verify.returncode == 0, verify.stderr
        assert "logged to tracking as audit run" in verify.stdout
        outputs = proc.stdout + proc.stderr + verify.stdout + verify.stderr
    assert SECRET not in outputs
    for path in [*tiny_project.rglob("*"), *tmp_path.rglob("*")]:
        if path.is_file() and path.name != "server.log":
            assert SECRET.encode() not in path.read_bytes(), path
    with sqlite3.connect(tmp_path / "server.db") as db:
        for table in ("params", "tags"):
            assert not [row for row in db.execute(f"select * from {table}") if SECRET in str(row)], table


# -- 9. exit codes that lie ----------------------------------------------------------------------------------------
def test_a_verdict_that_cannot_be_written_is_exit_4_not_a_verdict(project, tmp_path):
    for redirect, why in (("> /dev/full", "the result could not be written to stdout (No space left on device)"),
                          (">&-", "stdout is closed, so the result was not written")):
        proc = subprocess.run(f"{sys.executable} -m flannel_repro check {TRAJ} {redirect}", shell=True, cwd=project,
                              stderr=subprocess.PIPE, text=True)
        assert one_line(proc, 4).startswith(f"flannel-repro check: error: {why}")
    report = run_cli("check", TRAJ, "--report", "/dev/full/report.json", cwd=project)
    assert report.returncode in (2, 4) and "Traceback" not in report.stderr  # refused before the work, or after


def test_a_tracking_failure_after_the_verdict_leaves_its_exit_code(project, tmp_path):
    """A store that breaks after the verdict (here a SQLite file that is not a database): a note, exit 0."""
    root = shutil.copytree(project, tmp_path / "project")
    write_params(root, {"tracking": {"enabled": True}})
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    proc = run_cli("verify", "-q", TRAJ, cwd=root, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "verdict: bit-identical (exit 0)" in proc.stdout
    assert "note: the verdict could not be logged to tracking" in proc.stdout


# -- 10. kernel-selecting settings in the fingerprint ---------------------------------------------------------
def test_a_kernel_setting_is_in_the_fingerprint_and_strict_verify_refuses_it(project, tmp_path):
    proc = run_cli("verify", "-q", "--strict", TRAJ, cwd=project, env={"DNNL_MAX_CPU_ISA": "AVX2"})
    line = one_line(proc)
    assert "kernel_env (reference {}, here {'DNNL_MAX_CPU_ISA': 'AVX2'})" in line, line
    report = tmp_path / "verify.json"
    proc = run_cli("verify", "-q", TRAJ, "--report", str(report), cwd=project, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr
    assert "warning: this machine differs from the reference in kernel_env" in proc.stdout
    doc = json.loads(report.read_text())
    # the fingerprint of the rerun as it ran: determinism on
    assert doc["fingerprint"]["deterministic_algorithms"] is True
    assert doc["fingerprint"]["kernel_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert fingerprint_mismatches({"torch": "x"}, {"torch": "x", "kernel_env": {}}) == []  # an older record


# -- 11. a corrupt sync spool -----------------------------------------------------------------------------------
HEADER = '{"format": "flannel-tracking-spool/1", "uri": "URI", "run": "RUN"}'


@pytest.mark.parametrize("case", ["list", "no op", "bad metrics", "sent not json", "header without uri",
                                  "unknown run", "header a list", "bad tags"])
def test_a_corrupt_sync_spool_is_one_line_naming_the_spool(tiny_project, case):
    store = f"sqlite:///{tiny_project / 'mlflow.db'}"
    spool = tiny_project / ".flannel" / "tracking" / "0123456789abcdef.jsonl"
    spool.parent.mkdir(parents=True)
    header = HEADER.replace("URI", store).replace("RUN", "0123456789abcdef")
    call = '{"op": "log_batch", "run": "0123456789abcdef", "metrics": [["loss", 1.5, 1700000000000, 1]]}'
    lines = {
        "list": [header, "[1, 2]", call],
        "no op": [header, '{"run": "x"}', call],
        "bad metrics": [header, '{"op": "log_batch", "run": "x", "metrics": [1, 2]}', call],
        "sent not json": [header, call],
        "header without uri": [header.replace(f'"uri": "{store}", ', ""), call],
        "unknown run": [header, call],
        "header a list": ["[1]", call],
        "bad tags": [header, '{"op": "log_batch", "run": "x", "tags": {"a": 1}}', call],
    }[case]
    spool.write_text("\n".join(lines) + "\n")
    if case == "sent not json":
        spool.with_suffix(".sent").write_text("{not json")
    line = one_line(run_cli("sync", cwd=tiny_project))
    assert str(spool.with_suffix(".sent") if case == "sent not json" else spool) in line, line
    assert "fix tracking.uri" not in line
    if case == "unknown run":
        assert "names run '0123456789abcdef', which the tracking store does not hold" in line
