"""Tracking against real MLflow stores: the default SQLite file at the project root (through the CLI, as a user runs
`flannel-repro train`) and a real `mlflow server` process on 127.0.0.1 (over HTTP). Each store gets one tiny train
in a git repository, shared by the tests that read it back."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import copy_tiny_data, free_port, run_cli, write_params
from conftest import mlflow_server as start_mlflow_server
from mlflow import MlflowClient

from flannel_repro.core.config import Params, TrackingConfig, load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.core.store_uri import tracking_uri
from flannel_repro.data.masks import load_masks
from flannel_repro.recording.motion import MOTION_NAMES
from flannel_repro.tracking.base import AuditRun
from flannel_repro.tracking.mlflow_store import MlflowAuditStore, training_runs_url
from flannel_repro.training.stage import run_train_stage
from flannel_repro.trajectory.file import load_trajectory, manifest

STEPS = 6  # conftest TINY


def git(root: Path, *args: str) -> str:
    ident = ["-c", "user.name=Flannel Tests", "-c", "user.email=tests@flannel.invalid"]
    return subprocess.run(["git", *ident, *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def git_project(root: Path, tiny_data: Path, tracking: dict) -> Path:
    """A tiny project committed to a fresh git repository (outputs ignored, so the tree stays clean)."""
    copy_tiny_data(tiny_data, root)
    write_params(root, {"tracking": {"enabled": True, **tracking}})
    (root / ".gitignore").write_text("/data/\n/tensors/\n/metrics/\n/mlflow.db\n/mlruns/\n/.flannel/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny project")
    return root


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1, started once for the module and killed at teardown."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


@dataclass
class Tracked:
    root: Path
    params: Params
    uri: str
    run_id: str
    client: MlflowClient

    @property
    def run(self):
        return self.client.get_run(self.run_id)


@pytest.fixture(scope="module", params=["sqlite", "http"])
def tracked(request, tmp_path_factory, tiny_data) -> Tracked:
    """One tiny tracked train per store: the default SQLite store through the CLI, the server in-process."""
    root = tmp_path_factory.mktemp(f"tracked_{request.param}")
    if request.param == "sqlite":
        git_project(root, tiny_data, {})
        # System metrics sampled every half second, so the tiny run has some (MLflow's default is 10 s).
        env = {"MLFLOW_TRACKING_URI": "", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}
        proc = run_cli("train", "-q", cwd=root, env=env, check=True)
        view, line = proc.stdout.strip().splitlines()[-2:]
        uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"
        assert line.startswith("mlflow: run ") and line.endswith(f" in experiment 'flannel' at {uri}")
        assert view == ("mlflow: training runs at http://127.0.0.1:5000/#/experiments/1/runs?"
                        f"workflowType=machine_learning (`mlflow ui --host 127.0.0.1 --backend-store-uri {uri}`)")
        run_id = line.split()[2]
    else:
        uri = request.getfixturevalue("mlflow_server")
        git_project(root, tiny_data, {"uri": uri})
        _, run_id = run_train_stage(load_params(root / "params.yaml"), root, progress=False)
    return Tracked(root, load_params(root / "params.yaml"), uri, run_id, MlflowClient(uri))


def test_run_has_every_resolved_param_as_written_and_a_name_that_says_what_it_recorded(tracked):
    run = tracked.run
    assert run.info.status == "FINISHED"
    # The seed, the steps, the device and the short content digest of the numbers it recorded.
    digest = run.data.tags["digest"]
    assert run.info.run_name == f"flannel7-seed42-{STEPS}steps-cpu-{digest[:12]}"
    assert tracked.client.get_experiment(run.info.experiment_id).name == "flannel"
    params = run.data.params
    assert {k: v for k, v in params.items() if not k.startswith("tokens.")} == {
        k: v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v)
        for k, v in tracked.params.flat().items()}
    assert params["train.learning_rate"] == "0.001" and params["model.hidden_dim"] == "16"
    # As params.yaml writes them, not as Python prints them: ('synthetic',), None, True, ().
    assert (params["corpus.build"], params["audit.verify"], params["record.W"], params["record.momentum"]) == (
        '["synthetic"]', '["rerun"]', "true", "false")
    uri = params["tracking.uri"]
    assert uri == ("null" if tracked.uri.startswith("sqlite") else tracked.uri)
    found = tracked.client.search_runs([run.info.experiment_id], """params.`audit.verify` = '["rerun"]'""")
    assert tracked.run_id in {r.info.run_id for r in found}


def test_loss_history_is_the_trajectory_losses_exactly(tracked):
    with load_trajectory(tracked.root / tracked.params.paths.trajectory) as traj:
        losses = traj["losses_f32"][0]  # (steps+1,) float32, NaN at t = 0
        W = [traj.step("W", t).float() for t in range(STEPS + 1)]  # (V, H) each
    history = sorted(tracked.client.get_metric_history(tracked.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == [float(x) for x in losses[1:]]  # the float32 values, exactly
    for name in ("grad_norm", "learning_rate"):
        steps = sorted(m.step for m in tracked.client.get_metric_history(tracked.run_id, name))
        assert steps == list(range(1, STEPS + 1))

    masks = load_masks(tracked.root / tracked.params.paths.masks, tracked.params.model.vocab_size)
    for name, mask in (("W_norm_live", masks.live_mask), ("W_norm_dead", masks.dead_mask)):
        got = {m.step: m.value for m in tracked.client.get_metric_history(tracked.run_id, name)}
        want = {t: float(w.norm(dim=1)[mask].mean()) for t, w in enumerate(W)}
        assert got == pytest.approx(want, rel=1e-6)
    assert want[STEPS] != want[0]  # the rows moved: the norms are the trained W's, not W_initial's


def test_the_dead_set_is_logged_once_as_params_not_as_step_charts(tracked):
    """n_live, n_dead, the dead share and its single bytes / merges, as the masks file records them: constants of
    the run's data, so params (one value in the run's table), not metrics (a one-point chart each)."""
    masks = load_masks(tracked.root / tracked.params.paths.masks, tracked.params.model.vocab_size)
    logged = tracked.run.data.params
    assert (logged["tokens.n_live"], logged["tokens.n_dead"]) == (str(masks.n_live), str(masks.n_dead))
    assert float(logged["tokens.dead_share"]) == round(masks.n_dead / tracked.params.model.vocab_size, 4)
    assert (logged["tokens.n_dead_bytes"], logged["tokens.n_dead_merges"]) == (
        str(masks.n_dead_bytes), str(masks.n_dead_merges))
    assert masks.n_dead_bytes is not None and masks.n_dead_bytes + masks.n_dead_merges == masks.n_dead
    metrics = tracked.run.data.metrics
    assert not {"n_live", "n_dead", "dead_share", "n_dead_bytes", "n_dead_merges"} & set(metrics)
    # The summary metrics of metrics/train.json stay metrics, each one value at the last step.
    summary = json.loads((tracked.root / tracked.params.paths.metrics).read_text())
    for name in ("final_loss", "runtime_s", "steps_per_s"):
        [point] = tracked.client.get_metric_history(tracked.run_id, name)
        assert (point.step, point.value) == (STEPS, summary[name])


def test_system_metrics_are_logged_beside_the_training_metrics(tracked):
    """MLflow's system metrics (psutil): CPU and memory, sampled on their own thread while the run trained."""
    if not tracked.uri.startswith("sqlite"):
        pytest.skip("the sampling interval is set for the CLI run only")
    metrics = tracked.run.data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert 0 < metrics["system/system_memory_usage_megabytes"]


def test_token_motion_is_logged_at_every_step_as_in_the_csv(tracked):
    with open(tracked.root / tracked.params.paths.loss_curve, newline="") as f:
        rows = list(csv.DictReader(f))  # steps 1..N
    for name in MOTION_NAMES:
        got = {m.step: m.value for m in tracked.client.get_metric_history(tracked.run_id, name)}
        assert got == {0: 0.0, **{int(r["step"]): float(r[name]) for r in rows}}, name  # the same floats, exactly
    assert tracked.run.data.metrics["drift_dead"] > 0


def test_experiment_opens_on_training_runs_and_the_run_says_what_it_is(tracked):
    experiment = tracked.client.get_experiment(tracked.run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    note = tracked.run.data.tags["mlflow.note.content"]
    path = tracked.params.paths.trajectory
    assert note.startswith(f"Flannel 7 training: seed 42; {STEPS} steps, init seed 42; on cpu: ")
    assert ", 1 torch threads." in note.splitlines()[0]
    assert f"- trajectory: `{path}`, sha256 `{sha256_file(tracked.root / path)}`" in note
    digest = tracked.run.data.tags["digest"]
    assert f"- content digest of its numbers: `{digest}`" in note
    assert f"- audit it: `flannel-repro verify {path}` or `flannel-repro verify --run-id {tracked.run_id}`" in note
    base = tracked.uri if tracked.uri.startswith("http") else "http://127.0.0.1:5000"
    assert training_runs_url(tracked.uri, tracked.run_id) == (
        f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")


def test_tags_name_the_file_hash_the_commit_and_the_device(tracked):
    tags = tracked.run.data.tags
    path = tracked.root / tracked.params.paths.trajectory
    assert tags["sha256"] == sha256_file(path)  # short tag names: a runs table column shows them whole
    assert tags["trajectory.path"] == tracked.params.paths.trajectory
    # The content digest, a column to compare runs' numbers by: the file's header and metrics/train.json hold it too.
    metrics = json.loads((tracked.root / tracked.params.paths.metrics).read_text())
    with load_trajectory(path) as traj:
        assert tags["digest"] == traj.metadata["content_digest"] == metrics["content_digest"]
    # The commit and branch once, as MLflow's own source tags (the UI shows them); no copy under another name.
    assert tags["mlflow.source.git.commit"] == git(tracked.root, "rev-parse", "HEAD")
    assert (tags["mlflow.source.git.branch"], tags["git.dirty"]) == ("main", "false")
    assert not {"git.commit", "git.branch", "trajectory.sha256", "trajectory.content_digest"} & set(tags)
    assert "dvc.exp_name" not in tags  # not run by `dvc exp`

    with load_trajectory(path) as traj:
        fp = traj.meta_json("fingerprint")
    # The fingerprint once, a tag per key (digests.json holds it whole).
    assert {k: v for k, v in tags.items() if k.startswith("fingerprint")} == {
        f"fingerprint.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in fp.items()}
    assert tags["fingerprint.device_type"] == "cpu" and tags["fingerprint.torch_threads"] == "1"
    # The README's filter for comparing devices finds the run.
    found = tracked.client.search_runs([tracked.run.info.experiment_id], "tags.fingerprint.device_type = 'cpu'")
    assert tracked.run_id in {r.info.run_id for r in found}


def test_inputs_are_the_files_with_their_full_sha256(tracked):
    datasets = {d.dataset.name: d.dataset for d in tracked.run.inputs.dataset_inputs}
    assert set(datasets) == {"corpus", "tokenizer", "masks"}
    for name, ds in datasets.items():
        sha = sha256_file(tracked.root / getattr(tracked.params.paths, name))
        assert json.loads(ds.profile)["sha256"] == sha == tracked.run.data.tags[f"inputs.{name}.sha256"]
        assert ds.digest == sha[:36]  # MLflow's digest column holds 36 characters


def test_artifacts_let_an_audit_work_from_the_run_id_alone(tracked, tmp_path):
    client, run_id, root, params = tracked.client, tracked.run_id, tracked.root, tracked.params
    assert {a.path for a in client.list_artifacts(run_id)} == {"params.yaml", "digests.json", "loss_curve.png",
                                                              "metrics", "trace"}  # not the trajectory: DVC has it
    assert {a.path for a in client.list_artifacts(run_id, "metrics")} == {"metrics/train.json",
                                                                          "metrics/train_loss.csv"}

    logged = Path(client.download_artifacts(run_id, "params.yaml", str(tmp_path)))
    assert load_params(logged) == params  # the resolved params, loadable as a params.yaml
    train_json = Path(client.download_artifacts(run_id, "metrics/train.json", str(tmp_path)))
    assert train_json.read_bytes() == (root / params.paths.metrics).read_bytes()
    png = Path(client.download_artifacts(run_id, "loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with load_trajectory(root / params.paths.trajectory) as traj:
        want = manifest(traj)
    got = MlflowAuditStore(tracked.uri).run_manifest(run_id)
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def test_audit_is_nested_under_the_run_with_its_duration_and_the_run_shows_its_verdict(tracked, tmp_path):
    report = tmp_path / "verify.json"
    report.write_text('{"verdict": "diverged"}\n')
    started = 1_700_000_000.25
    audit_id = MlflowAuditStore(tracked.uri).log_audit_run(tracked.run_id, AuditRun(
        verdict="diverged", first_divergent_step=3, fingerprint={"device_type": "cpu", "torch_threads": 2},
        params={"train.steps": 6, "audit.verify": ("rerun",), "train.num_threads": None}, started_at=started,
        runtime_s=113.5, steps_checked=4, steps_per_s=0.0352, report=report))
    audit = tracked.client.get_run(audit_id)
    assert audit.info.experiment_id == tracked.run.info.experiment_id and audit.info.status == "FINISHED"
    assert audit.info.run_name == f"audit-{tracked.run.info.run_name}"
    tags = audit.data.tags
    assert tags["mlflow.parentRunId"] == tracked.run_id  # the UI nests it under the audited run
    assert (tags["flannel.audit_of"], tags["flannel.verdict"], tags["flannel.first_divergent_step"]) == (
        tracked.run_id, "diverged", "3")
    assert (tags["fingerprint.device_type"], tags["fingerprint.torch_threads"]) == ("cpu", "2")
    # The rerun's own duration, not the few milliseconds of logging it.
    assert (audit.info.start_time, audit.info.end_time) == (1_700_000_000_250, 1_700_000_113_750)
    assert audit.data.metrics == {"first_divergent_step": 3, "steps_checked": 4, "steps_per_s": 0.0352,
                                  "rerun_s": 113.5, "identical": 0.0}
    assert audit.data.params == {"train.steps": "6", "audit.verify": '["rerun"]', "train.num_threads": "null"}
    assert [a.path for a in tracked.client.list_artifacts(audit_id)] == ["verify.json"]
    # The audited run carries its latest verdict, and which audit run gave it.
    audited = tracked.run.data.tags
    assert (audited["flannel.verdict"], audited["flannel.audit_run"]) == ("diverged", audit_id)


def test_unreachable_server_fails_fast_before_training(tiny_project):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    write_params(tiny_project, {"tracking": {"enabled": True, "uri": uri}})
    proc = run_cli("train", "-q", cwd=tiny_project)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"flannel-repro train: error: tracking server {uri} is not reachable")
    assert "tracking.enabled: false" in lines[0]  # says how to fix it
    assert not (tiny_project / "tensors/Flannel/1.20h_flannel_7.safetensors").exists()
    assert sorted(p.name for p in (tiny_project / "tensors/Flannel").iterdir()) == ["live_dead_tokens.safetensors"]
    assert not (tiny_project / "metrics").exists() and not (tiny_project / "mlflow.db").exists()  # no fallback store


def test_a_store_that_cannot_be_used_fails_before_training(tiny_project):
    write_params(tiny_project, {"tracking": {"enabled": True, "uri": "sqlite:///params.yaml"}})  # not a database
    params = load_params(tiny_project / "params.yaml")
    with pytest.raises(FlannelError, match=r"tracking store sqlite:///.*/params.yaml cannot be used \(.*file is not a "
                                           r"database\); fix tracking.uri or MLFLOW_TRACKING_URI"):
        run_train_stage(params, tiny_project, progress=False)
    assert not (tiny_project / params.paths.trajectory).exists()


class FailAfter:
    """A step sink that raises once training is past `step`, like a disk filling up mid-run."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    def __call__(self, rec) -> None:
        if rec.step > self.step:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("disk full at step 3"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_a_failing_run_ends_failed_or_killed_with_the_reason(tiny_project, error):
    write_params(tiny_project, {"tracking": {"enabled": True, "uri": "sqlite:///runs.db"}})  # relative: project root
    params = load_params(tiny_project / "params.yaml")
    with pytest.raises(type(error)):
        run_train_stage(params, tiny_project, observers=[FailAfter(2, error)], progress=False)

    client = MlflowClient(f"sqlite:///{tiny_project.resolve() / 'runs.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("flannel").experiment_id])
    if isinstance(error, RuntimeError):
        assert run.info.status == "FAILED"
        assert run.data.tags["flannel.error"] == "RuntimeError: disk full at step 3"
    else:  # interrupted: KILLED, with what the user was told
        assert run.info.status == "KILLED"
        assert run.data.tags["flannel.error"] == "Interrupted: interrupted; no output was written"
    # What was logged before the failure is kept: steps 1..3 (the tracking sink ran before the failing one).
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
    assert not (tiny_project / params.paths.trajectory).exists()


def test_several_runs_are_a_parent_with_a_child_per_seed(tiny_project):
    write_params(tiny_project, {"train": {"num_runs": 2}, "tracking": {"enabled": True, "uri": "sqlite:///runs.db"}})
    params = load_params(tiny_project / "params.yaml")
    _, parent_id = run_train_stage(params, tiny_project, progress=False)

    uri = f"sqlite:///{tiny_project.resolve() / 'runs.db'}"
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    short = parent.data.tags["digest"][:12]
    assert parent.info.run_name == f"flannel7-seeds42-43-{STEPS}steps-cpu-{short}" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["params.`run.seed` ASC"])
    assert [c.info.run_name for c in children] == [f"flannel7-seed{s}-{STEPS}steps-cpu-{short}" for s in (42, 43)]
    with load_trajectory(tiny_project / params.paths.trajectory) as traj:
        losses = traj["losses_f32"]  # (runs, steps+1)
        want = manifest(traj)
    for r, child in enumerate(children):
        assert child.info.status == "FINISHED"
        assert child.data.params == {**parent.data.params, "run.index": str(r), "run.seed": str(42 + r)}
        assert child.data.tags["sha256"] == parent.data.tags["sha256"]
        history = sorted(client.get_metric_history(child.info.run_id, "loss"), key=lambda m: m.step)
        assert [m.value for m in history] == [float(x) for x in losses[r, 1:]]
        drift = client.get_metric_history(child.info.run_id, "drift_live")
        assert sorted(m.step for m in drift) == list(range(STEPS + 1))  # each child has its own motion curves
        note = child.data.tags["mlflow.note.content"]
        assert note.startswith(f"Flannel 7 training: seed {42 + r}, run {r + 1} of 2 in the file of run `{parent_id}`;")
        assert f"`flannel-repro verify --run-id {parent_id}`" in note
    assert parent.data.tags["mlflow.note.content"].startswith(
        "Flannel 7 training: 2 runs, seeds 42-43 (one child run each); ")
    assert "drift_live" not in parent.data.metrics
    assert "loss" not in parent.data.metrics  # per-step curves live in the children
    # A child's reference is its parent's manifest: one file holds every seed.
    got = MlflowAuditStore(uri).run_manifest(children[1].info.run_id)
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    with pytest.raises(FlannelError, match="MLflow run 'f00' not found in sqlite:///"):
        MlflowAuditStore(uri).run_manifest("f00")


def test_a_reused_experiment_is_tagged_unless_it_has_a_kind(tiny_project):
    """An experiment made before this tag existed (or by hand) gets it; a kind the user chose is kept."""
    write_params(tiny_project, {"tracking": {"enabled": True, "uri": "sqlite:///runs.db"}})
    client = MlflowClient(f"sqlite:///{tiny_project.resolve() / 'runs.db'}")
    old = client.create_experiment("flannel")
    chosen = client.create_experiment("genai-by-choice", tags={"mlflow.experimentKind": "genai_development"})
    params = load_params(tiny_project / "params.yaml")
    run_train_stage(params, tiny_project, progress=False)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    params = load_params(tiny_project / "params.yaml", ["tracking.experiment=genai-by-choice"])
    run_train_stage(params, tiny_project, progress=False)
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path.resolve()
    assert tracking_uri(TrackingConfig(), root) == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(TrackingConfig(), root) == "http://127.0.0.1:5000"
    assert tracking_uri(TrackingConfig(uri="sqlite:///store/m.db"), root) == f"sqlite:///{root / 'store/m.db'}"
    assert tracking_uri(TrackingConfig(uri="sqlite:////abs/m.db"), root) == "sqlite:////abs/m.db"
    # A queued `dvc exp run` works in a copy under .dvc/tmp/exps; its runs go to the real project's store.
    copy = root / ".dvc/tmp/exps/tmpabc123"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(TrackingConfig(), copy) == f"sqlite:///{root / 'mlflow.db'}"


def test_a_copied_project_does_not_write_into_the_original_folder(tmp_path, tiny_data):
    """mlflow.db keeps absolute artifact paths: a copy of a project that trained once would log every new run's
    artifacts (and its audits' reports) into the original's mlruns/. train refuses it in one line before training,
    naming the store, the folder it came from and both fixes; the original's files are untouched."""
    import shutil

    original = tmp_path / "original"
    copy_tiny_data(tiny_data, original)
    write_params(original, {"tracking": {"enabled": True, "uri": None}})
    run_cli("train", cwd=original, check=True)
    before = sorted(p.relative_to(original) for p in (original / "mlruns").rglob("*"))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)

    proc = run_cli("train", "-S", "train.train_seed=43", cwd=copy)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line == (f"flannel-repro train: error: {copy / 'mlflow.db'}: MLflow experiment 'flannel' keeps its "
                    f"artifacts in {original / 'mlruns'}, beside the store it was copied or moved from ({original}), "
                    "and new runs would write there; point tracking.uri at that store "
                    f"(sqlite:///{original}/mlflow.db), or move mlflow.db and mlruns/ of this project aside to start "
                    "a new store here (docs/tracking.md#a-copied-or-moved-project)")
    assert sorted(p.relative_to(original) for p in (original / "mlruns").rglob("*")) == before
    assert sha256_file(copy / load_params(copy / "params.yaml").paths.trajectory) == sha256_file(
        original / load_params(original / "params.yaml").paths.trajectory)  # the copy's trajectory is not replaced

    # A moved project: the folder its store names is gone, and would be made again.
    shutil.move(original, tmp_path / "moved")
    assert run_cli("train", "-S", "train.train_seed=43", cwd=copy).returncode == 2
    assert not original.exists()
    shutil.move(tmp_path / "moved", original)

    # The first fix: a new store in the copy, whose artifacts stay in the copy.
    shutil.move(copy / "mlflow.db", tmp_path / "old.db")
    shutil.move(copy / "mlruns", tmp_path / "old-mlruns")
    run_cli("train", "-S", "train.train_seed=43", cwd=copy, check=True)
    assert sorted(p.relative_to(original) for p in (original / "mlruns").rglob("*")) == before
    assert any((copy / "mlruns").rglob("params.yaml"))
