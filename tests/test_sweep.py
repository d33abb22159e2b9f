"""`flannel-repro sweep` with real processes: a Ray cluster of two nodes started here (`ray start --head` and a
second `ray start --address`, each in its own process group, killed at the end), a real `mlflow server` on
127.0.0.1, a bare git repository and a DVC remote in temporary folders, the tiny configuration.

What a user relies on: each point's content digest is the one `flannel-repro train` gives for the same values run
alone; every point is a DVC experiment of the project (`dvc exp show`, `dvc exp apply`) and exactly one FINISHED
MLflow run; a point already done is not rerun; a worker killed with kill -9 is retried and resumes from its
checkpoint to the same digest, its killed attempt's run ended KILLED; a driver stopped with Ctrl-C is finished by
the same command run again; a bad value fails its points only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port, mlflow_server, write_params

from flannel_repro.core.config import load_params
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.sweep.driver import NO_VERIFY, point_name

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
TRACKED = ["flannel_repro", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "pyproject.toml", ".gitignore"]
# Long enough to be killed between checkpoints (every 4 steps) on a loaded machine, short enough for a test.
LONG = {"steps": 48, "checkpoint_every": 4}
ENV = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray turns 127.0.0.1 into the host's own address, so the test's nodes listen there: a token of each cluster's own
# (ray_cluster) keeps every process but this machine's out.


def sh(*argv: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 900):
    proc = subprocess.run(list(argv), cwd=cwd, env={**os.environ, **ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def flannel(*args: str, cwd: Path, env: dict | None = None, check: bool = False):
    return sh(sys.executable, "-m", "flannel_repro", *args, cwd=cwd, env=env, check=check)


def git(*args: str, cwd: Path) -> str:
    return sh("git", *args, cwd=cwd).stdout


@contextlib.contextmanager
def ray_cluster(folder: Path, second_env: dict | None = None) -> Iterator[str]:
    """A head and a second node, 1 CPU each, as two `ray start --block` process groups; yields the address.
    `second_env`: environment of the second node only (its workers inherit it). Each cluster takes a token of its
    own (Ray's token authentication), given to every process that joins it; a cluster started while another runs
    gives the other's token back when it ends."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths must stay under 108 bytes: a short folder of its own, not pytest's deep one.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 1024**2), "--block", "--disable-usage-stats"]
    procs = []
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    before = {k: ENV.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    try:
        for i, argv in enumerate([["--head", "--port", str(port), "--include-dashboard", "false",
                                   "--temp-dir", str(temp)], ["--address", address]]):
            log = open(folder / f"ray-{i}.log", "wb")  # noqa: SIM115 (kept open for the process's life)
            extra = (second_env or {}) if i == 1 else {}
            procs.append(subprocess.Popen([str(VENV_BIN / "ray"), "start", *argv, *common], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, **ENV, **extra}))
            _wait_for_nodes(address, i + 1, folder)
        yield address
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in before.items():
            if value is None:
                ENV.pop(key, None)
            else:
                ENV[key] = value


def _wait_for_nodes(address: str, n: int, folder: Path) -> None:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ENV})
        if proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    logs = "\n".join(p.read_text()[-1500:] for p in folder.glob("ray-*.log"))
    raise AssertionError(f"the Ray cluster did not reach {n} nodes in 180 s:\n{logs}")


def make_project(root: Path, train: dict | None = None) -> Path:
    """The repository's pipeline with the tiny params (tracking on, audit off), its data stages reproduced and
    committed; a bare clone as its git remote `origin` and a DVC remote `store`, both beside it."""
    for name in TRACKED:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    write_params(root, {"tracking": {"enabled": True, "uri": None}, "audit": {"verify": []},
                        "train": {**(train or {})}})
    git("init", "-q", cwd=root)
    git("config", "user.name", "Flannel Test", cwd=root)
    git("config", "user.email", "test@flannel.invalid", cwd=root)
    sh(str(VENV_BIN / "dvc"), "repro", "masks", cwd=root)
    sh(str(VENV_BIN / "dvc"), "remote", "add", "-d", "store", str(root.parent / "dvc-remote"), cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "tiny pipeline, data stages reproduced", cwd=root)
    git("clone", "-q", "--bare", str(root), str(root.parent / "origin.git"), cwd=root.parent)
    git("remote", "add", "origin", str(root.parent / "origin.git"), cwd=root)
    return root


def single_digest(project: Path, tmp: Path, *overrides: str) -> str:
    """The content digest `flannel-repro train` gives for these values, run alone in a copy (no tracking)."""
    copy = tmp / f"alone-{hashlib.sha256(' '.join(overrides).encode()).hexdigest()[:8]}"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    flannel("train", "--quiet", "-S", "tracking.enabled=false", *[a for o in overrides for a in ("-S", o)],
            cwd=copy, check=True)
    return json.loads((copy / "metrics/train.json").read_text())["content_digest"]


def experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> {params, metrics}."""
    out = {}
    for entry in json.loads(sh(str(VENV_BIN / "dvc"), "exp", "show", "--json", cwd=project).stdout):
        for row in (rev for exp in entry.get("experiments") or [] for rev in exp["revs"]):
            data = row["data"]
            out[row["name"]] = {"params": data["params"]["params.yaml"]["data"],
                                "metrics": data["metrics"]["metrics/train.json"]["data"]}
    return out


def mlflow_runs(uri: str) -> list[tuple[str, str]]:
    """(dvc.exp_name tag, status) of every run in the store."""
    code = (f"import json, mlflow; c = mlflow.MlflowClient({uri!r}); ids = [e.experiment_id for e in "
            "c.search_experiments()]; print(json.dumps([[r.data.tags.get('dvc.exp_name', ''), r.info.status] "
            "for r in c.search_runs(ids, max_results=1000)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **ENV}).stdout
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


def name_of(project: Path, *overrides: str) -> str:
    return point_name(git("rev-parse", "HEAD", cwd=project).strip(), (*overrides, NO_VERIFY))


def cache_is_whole(folder: Path) -> list[str]:
    """Files of a DVC cache or remote (files/md5/xx/yyyy...) whose bytes do not hash to their name."""
    bad = []
    for path in (folder / "files" / "md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".dir"):
            if hashlib.md5(path.read_bytes()).hexdigest() != path.parent.name + path.name:
                bad.append(str(path))
        elif path.is_file() or ".tmp" in path.name:
            pass
    return bad


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("sweep_services")
    with mlflow_server(folder) as uri, ray_cluster(folder) as address:
        yield {"mlflow": uri, "ray": address}


def test_a_grid_on_two_nodes_is_the_single_runs_and_the_record_is_dvc_and_mlflow(services, tmp_path):
    project = make_project(tmp_path / "project")
    env = {"MLFLOW_TRACKING_URI": services["mlflow"]}
    grid = ["-S", "train.train_seed=range(42,45)", "-S", "train.steps=6,-1"]
    argv = ["sweep", *grid, "--address", services["ray"], "--git-remote", "origin", "--dvc-remote", "store",
            "--scratch", str(tmp_path / "scratch")]
    proc = flannel(*argv, cwd=project, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the three points with train.steps = -1 failed
    summary = json.loads((project / "reports/sweep.json").read_text())
    by_name = {p["name"]: p for p in summary["points"]}
    assert len(by_name) == 6
    good = {seed: name_of(project, f"train.train_seed={seed}", "train.steps=6") for seed in (42, 43, 44)}
    for seed, name in good.items():
        assert by_name[name]["status"] == "finished", by_name[name]
        assert by_name[name]["content_digest"] == single_digest(project, tmp_path, f"train.train_seed={seed}")
        assert 0 < by_name[name]["dead_share"] < 1 and by_name[name]["final_loss"] > 0
    bad = [p for p in summary["points"] if "train.steps=-1" in p["overrides"]]
    assert len(bad) == 3 and all(p["status"] == "failed" and "train.steps" in p["message"] for p in bad)
    assert set(summary["nodes"]) and len(summary["nodes"]) == 2  # both nodes were fingerprinted

    # DVC: the three experiments, with their params and metrics, in the project's own `dvc exp show`.
    shown = experiments(project)
    for seed, name in good.items():
        assert shown[name]["params"]["train"]["train_seed"] == seed
        assert shown[name]["metrics"]["content_digest"] == by_name[name]["content_digest"]
    # `dvc exp apply` brings the trajectory (pulled from the DVC remote into the cache) into the workspace.
    sh(str(VENV_BIN / "dvc"), "exp", "apply", good[43], cwd=project)
    trajectory = project / load_params(project / "params.yaml").paths.trajectory
    assert sha256_file(trajectory) == by_name[good[43]]["trajectory_sha256"]
    assert cache_is_whole(project.parent / "dvc-remote") == [] and cache_is_whole(project / ".dvc/cache") == []
    # MLflow: one FINISHED run per point, in the one store.
    runs = mlflow_runs(services["mlflow"])
    for name in good.values():
        assert [s for n, s in runs if n == name] == ["FINISHED"]

    # The same command again: nothing is rerun.
    git("checkout", "-q", "--", ".", cwd=project)
    again = flannel(*argv, cwd=project, env=env)
    assert "0 to run" in again.stdout.splitlines()[0] or "0 to run" in again.stdout, again.stdout + again.stderr
    summary = json.loads((project / "reports/sweep.json").read_text())
    assert {p["name"]: p["status"] for p in summary["points"] if p["name"] in good.values()} == {
        n: "done before" for n in good.values()}
    assert len(mlflow_runs(services["mlflow"])) == len(runs)

    # --audit 2: two of the points verified, each on the other node; one fingerprint, so bit-identical.
    git("checkout", "-q", "--", ".", cwd=project)
    audited = flannel(*argv, "--audit", "2", cwd=project, env=env)
    summary = json.loads((project / "reports/sweep.json").read_text())
    audits = summary["audits"]
    assert len(audits) == 2 and {a["name"] for a in audits} <= set(good.values()), audited.stdout + audited.stderr
    for a in audits:
        assert a["verified_on"] != a["trained_on"] and a["verdict"] == "bit-identical", a
    [(pair, counts)] = summary["audit_pairs"].items()
    assert counts == {"audited": 2, "bit_identical": 2, "diverged": 0, "no_verdict": 0}
    assert f"audit: fingerprints {pair} (the same fingerprint): 2 of 2 bit-identical" in audited.stdout


def _train_of(ws: Path) -> list[int]:
    """Pids of the `flannel_repro train` processes running in workspace `ws`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"flannel_repro" in cmd and b"train" in cmd and Path(os.readlink(proc / "cwd")) == ws:
                pids.append(int(proc.name))
    return pids


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait(predicate, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_killed_mid_run_is_retried_and_resumes_to_the_same_digest(services, tmp_path):
    project = make_project(tmp_path / "project", LONG)
    env = {"MLFLOW_TRACKING_URI": services["mlflow"]}
    scratch = tmp_path / "scratch"
    name = name_of(project, "train.train_seed=50")
    ws = scratch / name
    argv = [sys.executable, "-m", "flannel_repro", "sweep", "-S", "train.train_seed=50", "--address",
            services["ray"], "--git-remote", "origin", "--dvc-remote", "store", "--scratch", str(scratch)]
    driver = subprocess.Popen(argv, cwd=project, env={**os.environ, **ENV, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    # The first checkpoint is written: kill -9 the Ray worker running the point (its train dies with it).
    _wait(lambda: list((ws / ".flannel/checkpoints").rglob("resume.json")) if ws.is_dir() else [], "a checkpoint")
    trains = _wait(lambda: _train_of(ws), "the train process")
    worker = _parent(trains[0])
    os.kill(worker, signal.SIGKILL)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out
    point = json.loads((project / "reports/sweep.json").read_text())["points"][0]
    assert point["status"] == "finished" and point["resumed"] is True, point
    assert point["content_digest"] == single_digest(project, tmp_path, "train.train_seed=50")
    assert experiments(project)[name]["metrics"]["content_digest"] == point["content_digest"]
    # The killed attempt's run was closed KILLED by the retry; the retry's is the one FINISHED run.
    statuses = sorted(s for n, s in mlflow_runs(services["mlflow"]) if n == name)
    assert statuses == ["FINISHED", "KILLED"], statuses
    assert cache_is_whole(project.parent / "dvc-remote") == []


def test_ctrl_c_stops_the_sweep_and_the_same_command_finishes_it(services, tmp_path):
    project = make_project(tmp_path / "project", LONG)
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": services["mlflow"]}
    scratch = tmp_path / "scratch"
    argv = [sys.executable, "-m", "flannel_repro", "sweep", "-S", "train.train_seed=60,61", "--jobs", "1",
            "--scratch", str(scratch)]  # embedded Ray, this project's cache and folder
    driver = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    _wait(lambda: list(scratch.rglob("resume.json")) if scratch.is_dir() else [], "a checkpoint")
    os.killpg(driver.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out
    assert "run the same command again" in out, out

    again = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    points = json.loads((project / "reports/sweep.json").read_text())["points"]
    assert [p["status"] for p in points] == ["finished", "finished"], points
    for seed, p in zip((60, 61), points, strict=True):
        assert p["content_digest"] == single_digest(project, tmp_path, f"train.train_seed={seed}")
    names = {name_of(project, f"train.train_seed={s}") for s in (60, 61)}
    assert names <= set(experiments(project))
    runs = [(n, s) for n, s in mlflow_runs(services["mlflow"]) if n in names]
    assert sorted(n for n, s in runs if s == "FINISHED") == sorted(names)  # one FINISHED run per point
    assert not [r for r in runs if r[1] == "RUNNING"], runs  # the stopped attempt's run is ended, not left open
    assert cache_is_whole(project / ".dvc/cache") == []


def test_an_audit_across_nodes_that_differ_names_the_pair_that_does_not_reproduce(tmp_path):
    """A second node that runs torch's generic kernels (ATEN_CPU_CAPABILITY=default, which changes a run's bits from
    step 1 on this machine): the sweep says the nodes differ before it starts, and each audited point, verified on
    the other node, diverges, under the pair of fingerprints that parts them."""
    project = make_project(tmp_path / "project")
    with ray_cluster(tmp_path, second_env={"ATEN_CPU_CAPABILITY": "default"}) as address:
        proc = flannel("sweep", "-S", "train.train_seed=70,71", "-S", "train.steps=3", "--address", address,
                       "--git-remote", "origin", "--dvc-remote", "store", "--scratch", str(tmp_path / "scratch"),
                       "--audit", "2", cwd=project, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # a diverged audit is a measurement: every point was recorded
    assert "the nodes differ in fingerprint" in out, out
    summary = json.loads((project / "reports/sweep.json").read_text())
    assert len(set(summary["nodes"].values())) == 2, summary["nodes"]
    audits = summary["audits"]
    assert len(audits) == 2, out
    for a in audits:
        assert a["verified_on"] != a["trained_on"], a
        assert a["trained_fingerprint"] != a["verified_fingerprint"], a
        assert a["verdict"] == "diverged" and a["detail"].startswith("DIVERGED at run 0, step 1"), a
    assert all(c["diverged"] == c["audited"] and c["bit_identical"] == 0 for c in summary["audit_pairs"].values())
    assert "(different fingerprints): 0 of" in out, out


def test_a_bad_grid_is_one_line_before_any_work(tmp_path, tiny_project):
    git("init", "-q", cwd=tiny_project)
    proc = flannel("sweep", "-S", "train.train_seed", cwd=tiny_project)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flannel-repro sweep: error: -S 'train.train_seed': write it as section.key=values, e.g. -S "
        "'train.train_seed=range(42,46)'"]


def test_changes_not_committed_are_refused_before_any_work(tiny_project):
    """Every point starts from the commit: a params.yaml edited since would silently not be swept."""
    git("init", "-q", cwd=tiny_project)
    git("add", "params.yaml", cwd=tiny_project)
    git("-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "params", cwd=tiny_project)
    (tiny_project / "params.yaml").write_text((tiny_project / "params.yaml").read_text() + "\n# edited\n")
    proc = flannel("sweep", "-S", "train.train_seed=42,43", cwd=tiny_project)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flannel-repro sweep: error: params.yaml: changed since the last commit; commit them first (every point "
        "of the sweep starts from the commit)"]
