"""Operator traces: a real thread-count divergence is traced to the op that broke it, two traces of one environment
are byte-identical, tracing changes no number, and an edited trace is reported exactly.

The tiny run diverges between 1 and 2 CPU threads at step 1 inside the final layer norm's backward (its weight and
bias gradients are reductions over the batch's rows, split across threads), and shows in the recorded numbers only
at step 2 (grad_W at step 1 does not depend on them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import copy_tiny_data, run_cli, write_params

from flannel_repro.core.config import load_params
from flannel_repro.tracing.file import read_trace
from flannel_repro.trajectory.file import load_trajectory


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(root: Path, name: str, threads: int, trace_steps: list[int] | None = None, **sections) -> Path:
    """Train the tiny run with `threads` into <name>.safetensors and its trace into <name>.trace.jsonl."""
    from flannel_repro.training.loop import train

    overrides = {"train": {"num_threads": threads},
                 "paths": {"trajectory": f"{name}.safetensors", "trace": f"{name}.trace.jsonl"},
                 "record": {"trace_steps": [1] if trace_steps is None else trace_steps}, **sections}
    write_params(root, overrides)
    train(load_params(root / "params.yaml"), root, progress=False)
    write_params(root)
    return root / f"{name}.safetensors"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """ref2.safetensors: the tiny run with 2 threads, its step 1 traced into ref2.trace.jsonl."""
    root = copy_tiny_data(tiny_data, tmp_path_factory.mktemp("traces"))
    record(root, "ref2", threads=2)
    return root


@pytest.fixture(scope="module")
def here1(project) -> Path:
    """Step 1 of ref2 traced here with 1 thread (`flannel-repro trace --threads 1`)."""
    out = project / "here1.jsonl"
    run_cli("trace", "ref2.safetensors", "--step", "1", "--threads", "1", "--out", out.name, cwd=project, check=True)
    return out


def as_json(ops) -> list[str]:
    return [json.dumps(op.to_json(), sort_keys=True) for op in ops]


def test_thread_count_divergence_is_traced_to_an_op_with_equal_inputs(project, here1):
    proc = run_cli("verify", "ref2.safetensors", "--threads", "1", "--json", "-q", cwd=project)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["first_divergent_step"] == 2  # the recorded numbers first differ at step 2 ...
    origin = doc["origin"]
    # ... the ops at step 1
    assert origin["traced"] and origin["step"] == 1 and origin["first_recorded_difference_step"] == 2
    found = origin["comparison"]["origin"]
    assert (found["op"], found["module"], found["phase"]) == \
        ("aten::native_layer_norm_backward.default", "transformer.ln_f", "backward")
    assert "the ops already differ at step 1" in proc.stderr
    assert f"ORIGIN: aten::native_layer_norm_backward.default in transformer.ln_f, backward, op {found['position']}" \
        in proc.stderr

    # Checked on the traces themselves, not through the comparison: every op before the origin is identical in
    # both (key, module, phase, every digest), the origin's inputs are equal and its outputs differ.
    ref = read_trace(project / "ref2.trace.jsonl").steps[(0, 1)]
    ours = read_trace(here1).steps[(0, 1)]
    k = found["position"]
    assert as_json(ref[:k]) == as_json(ours[:k])
    assert ref[k].key == ours[k].key == found["key"]
    assert [t.to_json() for t in ref[k].inputs] == [t.to_json() for t in ours[k].inputs] == found["inputs"]
    differ = [i for i, (a, b) in enumerate(zip(ref[k].outputs, ours[k].outputs, strict=True)) if a.digest != b.digest]
    assert differ and differ == [o["index"] for o in found["outputs"]]
    for o in found["outputs"]:  # small outputs keep their bytes: counted element by element, in ULPs
        assert 0 < o["n_differ"] <= o["numel"] and o["max_ulp"] >= 1


def test_trace_diff_of_two_environments_names_the_same_origin(project, here1):
    proc = run_cli("trace-diff", "ref2.trace.jsonl", here1.name, "--json", cwd=project)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"key": "torch_threads", "a": 2, "b": 1} in doc["environment_differences"]
    (step,) = doc["steps"]
    assert step["comparison"]["origin"]["key"] == "aten::native_layer_norm_backward.default:0"
    assert step["comparison"]["control_flow_at"] is None and not step["comparison"]["only_a"]
    assert "environments differ in torch_threads: A 2, B 1" in proc.stderr
    assert "verdict: different (exit 1)" in proc.stderr


def test_two_traces_of_one_environment_are_byte_identical(project, tmp_path):
    # The run's own trace, recorded twice in two folders, and `trace` of the same step here, twice.
    copy_tiny_data(project, tmp_path)
    again = record(tmp_path, "ref2", threads=2)
    assert sha(again.with_suffix(".trace.jsonl")) == sha(project / "ref2.trace.jsonl")
    for name in ("a.jsonl", "b.jsonl"):
        run_cli("trace", str(project / "ref2.safetensors"), "--step", "3", "--out", name, cwd=tmp_path, check=True)
    assert sha(tmp_path / "a.jsonl") == sha(tmp_path / "b.jsonl")
    assert read_trace(tmp_path / "a.jsonl").steps.keys() == {(0, 3)}
    # The run-to-run mode: the step repeats itself op for op on this CPU.
    proc = run_cli("trace", str(project / "ref2.safetensors"), "--step", "2", "--repeat", "2", "--out", "r.jsonl",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trace 2 repeats trace 1: all " in proc.stdout


def test_tracing_changes_no_number(project, tmp_path):
    copy_tiny_data(project, tmp_path)
    off = record(tmp_path, "off", threads=2, trace_steps=[])
    on = record(tmp_path, "on", threads=2, trace_steps=[1, 2, 5])
    digest = {p: load_trajectory(p).metadata["content_digest"] for p in (off, on, project / "ref2.safetensors")}
    assert len(set(digest.values())) == 1, digest
    assert read_trace(tmp_path / "on.trace.jsonl").steps.keys() == {(0, 1), (0, 2), (0, 5)}
    assert read_trace(tmp_path / "off.trace.jsonl").steps == {}  # the output exists (DVC), with no step
    header = read_trace(tmp_path / "on.trace.jsonl").header
    assert header["content_digest"] == digest[on] and header["threads"] == 2


def _edit(src: Path, dst: Path, change) -> None:
    """Copy a trace with its op lines of step 1 passed through `change(ops) -> ops` and the counts fixed."""
    lines = src.read_text().splitlines()
    head, block, ops = json.loads(lines[0]), json.loads(lines[1]), [json.loads(x) for x in lines[2:]]
    ops = change(ops)
    head["steps"][0][2] = block["ops"] = len(ops)
    dst.write_text("".join(json.dumps(d, sort_keys=True, separators=(",", ":")) + "\n" for d in [head, block, *ops]))


def test_an_edited_trace_is_reported_exactly(project, tmp_path):
    src = project / "ref2.trace.jsonl"
    ops = read_trace(src).steps[(0, 1)]
    k = next(op.seq for op in ops if op.seq > 40 and op.outputs and op.phase == "forward")

    def change_digest(docs):
        docs[k]["out"][0]["digest"] = "0" * 32
        return docs

    _edit(src, tmp_path / "digest.jsonl", change_digest)
    proc = run_cli("trace-diff", str(src), "digest.jsonl", "--json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    comparison = json.loads(proc.stdout)["steps"][0]["comparison"]
    assert comparison["origin"]["key"] == ops[k].key and comparison["origin"]["position"] == k
    assert [o["index"] for o in comparison["origin"]["outputs"]] == [0]
    assert comparison["origin"]["outputs"][0]["b"] == "0" * 32
    assert comparison["origins"] == 1 and comparison["control_flow_at"] is None
    # Only that op differs: the ops reading its output keep their own recorded input digests.
    assert comparison["receivers"] == 0 and comparison["matched"] == len(ops) - 1

    m = len(ops) // 2
    _edit(src, tmp_path / "removed.jsonl", lambda docs: docs[:m] + docs[m + 1:])
    proc = run_cli("trace-diff", str(src), "removed.jsonl", "--json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    comparison = json.loads(proc.stdout)["steps"][0]["comparison"]
    assert comparison["only_a"] == [{"position": m, "key": ops[m].key, "module": ops[m].module,
                                     "phase": ops[m].phase}]
    assert comparison["only_b"] == [] and comparison["control_flow_at"] == m
    assert comparison["origin"] is None and comparison["receivers"] == 0
    assert f"CONTROL FLOW differs from op {m} of A: 1 op(s) only in A, 0 only in B" in proc.stderr


def test_an_untraced_divergent_step_gives_the_command_that_traces_it(project, tmp_path):
    copy_tiny_data(project, tmp_path)
    record(tmp_path, "plain", threads=2, trace_steps=[])
    proc = run_cli("verify", "plain.safetensors", "--threads", "1", "-q", cwd=tmp_path)
    assert proc.returncode == 1
    command = "flannel-repro trace plain.safetensors --step 2 --out plain.step2.$(hostname).jsonl"
    assert "origin: not traced: the reference traced step(s) none of run 0, not step 2" in proc.stdout
    assert f"trace it in both environments: `{command}`, then `flannel-repro trace-diff A B`" in proc.stdout
    # The command, run where the reference was made (its 2 threads) and here (1 thread), finds the origin.
    for out, threads in (("there.jsonl", []), ("here.jsonl", ["--threads", "1"])):
        run_cli("trace", "plain.safetensors", "--step", "2", "--out", out, *threads, cwd=tmp_path, check=True)
    proc = run_cli("trace-diff", "there.jsonl", "here.jsonl", cwd=tmp_path)
    # Step 2 already starts from other layer-norm weights (step 1 changed them, and the trajectory does not record
    # them): every difference is received, and the report says to trace an earlier step.
    assert proc.returncode == 1 and "ORIGIN" not in proc.stdout, proc.stdout
    assert "BEGAN APART: op 20 aten::native_layer_norm.default:0 (transformer.h.0.ln_1, forward)" in proc.stdout
    assert "trace an earlier step (down to step 1)" in proc.stdout


def test_bad_traces_are_one_line_and_exit_2(project, tmp_path):
    (tmp_path / "not.jsonl").write_text('{"format": "something else"}\n')
    lines = (project / "ref2.trace.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "short.jsonl").write_text("".join(lines[:100]))
    cases = {
        ("trace-diff", "not.jsonl", str(project / "ref2.trace.jsonl")): "not.jsonl: not a flannel-repro trace",
        ("trace-diff", "short.jsonl", str(project / "ref2.trace.jsonl")): "short.jsonl: trace file ends early",
        ("trace-diff", "missing.jsonl", "short.jsonl"): "missing.jsonl: trace file not found",
        ("trace", str(project / "ref2.safetensors"), "--step", "0"): "--step 0: the reference has steps 1 to 6",
    }
    for args, message in cases.items():
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    bad = write_params(tmp_path, {"record": {"trace_steps": [0]}})
    proc = run_cli("train", "-q", "--params", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "record.trace_steps = (0,) must list optimizer steps from 1" in proc.stderr


def test_the_audit_run_carries_the_origin_op_and_the_train_run_the_trace(project, tmp_path):
    from mlflow import MlflowClient

    from flannel_repro.training.stage import run_train_stage

    copy_tiny_data(project, tmp_path)
    write_params(tmp_path, {"train": {"num_threads": 2}, "tracking": {"enabled": True, "uri": "sqlite:///mlflow.db"}})
    params = load_params(tmp_path / "params.yaml")
    _, run_id = run_train_stage(params, tmp_path, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(run_id, "trace")] == [f"trace/{Path(params.paths.trace).name}"]

    write_params(tmp_path, {"tracking": {"enabled": True, "uri": "sqlite:///mlflow.db"}})
    proc = run_cli("verify", "--threads", "1", "-q", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    audit_id = proc.stdout.strip().splitlines()[-1].split()[7]
    tags = client.get_run(audit_id).data.tags
    assert tags["flannel.origin_op"] == "aten::native_layer_norm_backward.default"
    assert tags["flannel.origin_module"] == "transformer.ln_f"
    assert (tags["flannel.origin_phase"], tags["flannel.origin_step"]) == ("backward", "1")


def test_a_batch_of_one_is_traced(project):
    """Batch 1: the loss's gather reads a one-element view of the labels whose stride is the sequence length, which
    torch calls contiguous; its bytes are its one element, and the step is traced as any other."""
    import struct

    import torch

    from flannel_repro.tracing.ops import tensor_bytes

    view = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])[:1, 2]
    assert view.stride() == (4,) and view.is_contiguous()
    assert bytes(tensor_bytes(view)) == struct.pack("<q", 9)
    path = record(project, "one", threads=1, train={"num_threads": 1, "batch_size": 1, "steps": 2},
                  model={"max_seq_len": 16})
    trace = read_trace(project / "one.trace.jsonl")
    assert path.exists() and list(trace.steps) == [(0, 1)] and len(trace.steps[0, 1]) > 100
