"""The DVC pipeline, driven by real `dvc` commands on a temporary copy of the repository with tiny params.

One module-scoped project is reproduced once; tests that change it work on their own copy of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_params
from safetensors import safe_open

from flannel_repro.cli import main
from flannel_repro.core.config import CorpusConfig, load_params
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.data.corpus import generate_text
from flannel_repro.data.tokenizer import train_bpe

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
TRACKED = ["flannel_repro", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "pyproject.toml", ".gitignore"]
STAGES = {"corpus@synthetic", "tokenizer_corpus@synthetic", "tokenizer@bpe", "masks", "train", "exposure",
          "verify@rerun"}
QUEUE_TIMEOUT_S = 600


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # Stage commands must find `flannel-repro` on PATH; DVC must not try the network.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([DVC, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def set_params(project: Path, **changes: dict) -> None:
    doc = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in changes.items():
        doc[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def experiments(project: Path) -> list[dict]:
    """The experiment rows of `dvc exp show --json` (not the workspace or baseline) as {name, params, metrics}."""
    rows = []
    for entry in json.loads(dvc("exp", "show", "--json", cwd=project).stdout):
        for row in (rev for exp in entry.get("experiments") or [] for rev in exp["revs"]):
            data = row["data"]
            rows.append({
                "name": row["name"],
                "params": data["params"]["params.yaml"]["data"],
                "metrics": data["metrics"]["metrics/train.json"]["data"],
            })
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The repository's pipeline with tiny params, reproduced and committed."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    for name in TRACKED:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    write_params(root)
    git("init", "-q", cwd=root)
    git("config", "user.name", "Flannel Test", cwd=root)
    git("config", "user.email", "test@flannel.invalid", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "tiny pipeline", cwd=root)
    assert ran(dvc("repro", cwd=root)) == ["corpus@synthetic", "tokenizer_corpus@synthetic", "tokenizer@bpe", "masks",
                                          "train", "exposure", "verify@rerun"]
    git("add", "-A", cwd=root)
    git("commit", "-qm", "reproduce", cwd=root)
    return root


@pytest.fixture
def project(base, tmp_path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(base, dst, symlinks=True)
    return dst


def test_repro_locks_every_stage_and_links_outputs_from_the_cache(base):
    stages = lock(base)
    assert set(stages) == STAGES
    # Each stage records exactly the params it reads.
    assert set(stages["corpus@synthetic"]["params"]["params.yaml"]) == {"corpus", "paths.corpus"}
    assert set(stages["tokenizer_corpus@synthetic"]["params"]["params.yaml"]) == {
        "tokenizer_corpus", "paths.tokenizer_corpus"}
    assert set(stages["tokenizer@bpe"]["params"]["params.yaml"]) == {
        "tokenizer", "model.vocab_size", "paths.tokenizer_corpus", "paths.tokenizer"}
    assert set(stages["masks"]["params"]["params.yaml"]) == {
        "model.vocab_size", "paths.corpus", "paths.tokenizer", "paths.masks"}
    assert set(stages["train"]["params"]["params.yaml"]) == {"model", "train", "record", "paths", "tracking",
                                                             "audit.report", "audit.metrics"}

    params = load_params(base / "params.yaml")
    paths = params.paths
    outs = {o["path"]: o["md5"] for stage in stages.values() for o in stage.get("outs", [])}
    assert set(outs) == {paths.corpus, paths.tokenizer_corpus, paths.tokenizer, paths.masks, paths.trajectory,
                         paths.trace, paths.exposure, paths.metrics, paths.loss_curve, params.audit.report,
                         params.audit.metrics}
    for path, digest in outs.items():
        assert md5(base / path) == digest
    # The workspace trajectory is the cached file itself (a link), not a second copy of it.
    digest = outs[paths.trajectory]
    assert os.path.samefile(base / paths.trajectory, base / ".dvc/cache/files/md5" / digest[:2] / digest[2:])

    # Metrics, the loss curve and the verdict are committed by git, not cached, and DVC reads them.
    assert sorted(git("ls-files", "metrics", "reports", cwd=base).split()) == sorted([
        paths.metrics, paths.loss_curve, params.audit.metrics, params.audit.report])
    metrics = json.loads((base / paths.metrics).read_text())
    assert metrics["trajectory_sha256"] == sha256_file(base / paths.trajectory)
    shown = json.loads(dvc("metrics", "show", "--json", cwd=base).stdout)
    assert shown[""]["data"][paths.metrics]["data"] == metrics
    # The audit ran as part of the pipeline: `dvc metrics show` lists its verdict beside the training metrics, in a
    # few values; the full report is a file beside them, not a metric.
    assert set(shown[""]["data"]) == {paths.metrics, params.audit.metrics}
    verdict = shown[""]["data"][params.audit.metrics]["data"]
    assert verdict == {"verdict": "identical", "steps_checked": 7, "audited_content": metrics["content"],
                       "rerun_steps_per_s": verdict["rerun_steps_per_s"]}  # no divergent or corrupt step: none shown
    assert metrics["content"] == metrics["content_digest"][:12]
    report = json.loads((base / params.audit.report).read_text())
    assert (report["verdict"], report["exit_code"]) == ("identical", 0)
    assert report["content_digest"] == report["rerun_content_digest"] == metrics["content_digest"]
    # `dvc plots show` draws the loss first, then the learning rate, from the train stage's per-step CSV.
    plots = json.loads(dvc("plots", "show", "--json", cwd=base).stdout)["data"]
    assert list(plots)[:2] == ["loss", "learning rate"]
    points = plots["loss"][0]["content"]["data"]["values"]
    assert [int(p["step"]) for p in points] == list(range(1, 7))
    assert float(points[-1]["loss"]) == metrics["final_loss"]
    rates = [float(p["learning_rate"]) for p in plots["learning rate"][0]["content"]["data"]["values"]]
    assert len(rates) == 6 and rates == sorted(rates, reverse=True) and rates[0] > rates[-1] > 0  # linear decay
    # .dvc/config turns off the version check (and analytics): DVC never wrote its updater file.
    assert not (base / ".dvc/tmp/updater").exists()


def test_status_is_clean_right_after_the_first_repro(base):
    """What a new user runs after the quickstart's `dvc repro`: every pipeline of the project is up to date."""
    proc = dvc("status", cwd=base)
    assert proc.stdout.strip() == "Data and pipelines are up to date.", proc.stdout


def test_second_repro_is_up_to_date(project):
    before = (project / "dvc.lock").read_bytes()
    proc = dvc("repro", cwd=project)
    assert "Data and pipelines are up to date." in proc.stdout
    assert ran(proc) == []
    assert (project / "dvc.lock").read_bytes() == before


def test_train_param_change_reruns_train_and_its_audit_only(project):
    old = json.loads((project / "metrics/train.json").read_text())
    set_params(project, train={"learning_rate": 0.002})
    proc = dvc("repro", cwd=project)
    assert ran(proc) == ["train", "exposure", "verify@rerun"]
    for stage in ("corpus@synthetic", "tokenizer_corpus@synthetic", "tokenizer@bpe", "masks"):
        assert f"Stage '{stage}' didn't change, skipping" in proc.stdout
    assert lock(project)["train"]["params"]["params.yaml"]["train"]["learning_rate"] == 0.002
    new = json.loads((project / "metrics/train.json").read_text())
    assert new["trajectory_sha256"] != old["trajectory_sha256"]


def test_model_corpus_change_keeps_the_tokenizer(project):
    tokenizer = load_params(project / "params.yaml").paths.tokenizer
    before = md5(project / tokenizer)
    set_params(project, corpus={"n_words": 3500})
    proc = dvc("repro", cwd=project)
    assert ran(proc) == ["corpus@synthetic", "masks", "train", "exposure", "verify@rerun"]
    assert "Stage 'tokenizer@bpe' didn't change, skipping" in proc.stdout
    assert md5(project / tokenizer) == before


def test_tokenizer_corpus_change_reruns_tokenizer_masks_and_train(project):
    paths = load_params(project / "params.yaml").paths
    before = {k: md5(project / getattr(paths, k)) for k in ("corpus", "tokenizer", "masks")}
    set_params(project, tokenizer_corpus={"seed": 8})
    proc = dvc("repro", cwd=project)
    assert ran(proc) == ["tokenizer_corpus@synthetic", "tokenizer@bpe", "masks", "train", "exposure", "verify@rerun"]
    assert lock(project)["tokenizer_corpus@synthetic"]["params"]["params.yaml"]["tokenizer_corpus"]["seed"] == 8
    after = {k: md5(project / getattr(paths, k)) for k in ("corpus", "tokenizer", "masks")}
    assert after["corpus"] == before["corpus"]
    assert after["tokenizer"] != before["tokenizer"] and after["masks"] != before["masks"]


def test_exp_run_with_a_param_shows_its_metrics(project):
    baseline = json.loads((project / "metrics/train.json").read_text())
    dvc("exp", "run", "-S", "train.train_seed=43", cwd=project)
    exps = experiments(project)
    assert len(exps) == 1
    assert exps[0]["params"]["train"]["train_seed"] == 43
    assert exps[0]["metrics"]["trajectory_sha256"] != baseline["trajectory_sha256"]
    assert exps[0]["metrics"] == json.loads((project / "metrics/train.json").read_text())


def test_two_queued_experiments_run_on_two_workers(project):
    # Queued experiments run in copies under .dvc/tmp/exps/; their tracking runs must land in the same store as
    # the workspace run (mlflow.db at the project root).
    set_params(project, tracking={"enabled": True, "uri": None})
    assert ran(dvc("repro", cwd=project)) == ["train", "exposure", "verify@rerun"]
    for seed in (44, 45):
        dvc("exp", "run", "--queue", "-S", f"train.train_seed={seed}", cwd=project)
    dvc("queue", "start", "-j", "2", cwd=project)
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status = dvc("queue", "status", cwd=project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"queue did not finish in {QUEUE_TIMEOUT_S} s:\n{status}"
        time.sleep(2)
    failed = re.findall(r"^\S+\s+(\S+)\s.*\bFailed$", status, re.M)
    assert not failed, "\n".join(dvc("queue", "logs", name, cwd=project, check=False).stdout for name in failed)
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status

    by_seed = {r["params"]["train"]["train_seed"]: r["metrics"] for r in experiments(project)}
    assert set(by_seed) == {44, 45}
    assert by_seed[44]["trajectory_sha256"] != by_seed[45]["trajectory_sha256"]
    assert all(isinstance(by_seed[s]["final_loss"], float) for s in (44, 45))
    with contextlib.closing(sqlite3.connect(project / "mlflow.db")) as db:
        # the training runs' seeds (each audit run, nested under its run, carries the rerun's params too)
        seeds = db.execute("SELECT p.value FROM params p JOIN tags t ON t.run_uuid = p.run_uuid WHERE "
                           "p.key = 'train.train_seed' AND t.key = 'flannel.kind' AND t.value = 'train'").fetchall()
        audited = db.execute("SELECT COUNT(*) FROM tags WHERE key = 'mlflow.parentRunId'").fetchone()[0]
    assert sorted(int(v) for (v,) in seeds) == [42, 44, 45]
    assert audited == 3  # one audit under each of the three runs


def test_own_corpus_and_tokenizer_replace_the_generated_ones(project, capsys):
    text = generate_text(CorpusConfig(seed=7, n_words=3000, lexicon_size=400))
    (project / "data/my_corpus.txt").write_text(text)
    (project / "data/my_tokenizer.json").write_text(train_bpe(text, 300, 2).to_str())
    dvc("add", "data/my_corpus.txt", "data/my_tokenizer.json", cwd=project)
    git("add", "data/my_corpus.txt.dvc", "data/my_tokenizer.json.dvc", cwd=project)  # not ignored by git
    assert git("ls-files", "data", cwd=project).split() == ["data/my_corpus.txt.dvc", "data/my_tokenizer.json.dvc"]
    set_params(project, corpus={"build": []}, tokenizer_corpus={"build": []}, tokenizer={"build": []},
               paths={"corpus": "data/my_corpus.txt", "tokenizer": "data/my_tokenizer.json"})

    proc = dvc("repro", cwd=project)
    assert ran(proc) == ["masks", "train", "exposure", "verify@rerun"]
    listed = dvc("stage", "list", "--name-only", cwd=project).stdout.split()
    assert listed == ["masks", "train", "exposure", "verify@rerun"]
    stages = lock(project)
    added = {p: yaml.safe_load((project / f"{p}.dvc").read_text())["outs"][0]["md5"]
             for p in ("data/my_corpus.txt", "data/my_tokenizer.json")}
    for stage in ("masks", "train"):
        deps = {d["path"]: d["md5"] for d in stages[stage]["deps"]}
        assert {p: deps[p] for p in added} == added
    paths = load_params(project / "params.yaml").paths
    with safe_open(str(project / paths.masks), framework="pt") as f:
        assert f.metadata()["corpus_sha256"] == hashlib.sha256(text.encode()).hexdigest()

    # The pipeline follows the user's file: a new version of it makes masks and train stale.
    (project / "data/my_corpus.txt").unlink()  # a new file: the old one is a read-only link into the cache
    (project / "data/my_corpus.txt").write_text(text + "\nOne more paragraph of the user's own text.\n")
    dvc("add", "data/my_corpus.txt", cwd=project)
    status = json.loads(dvc("status", "--json", "dvc.yaml", cwd=project).stdout)
    assert set(status) == {"masks", "train", "exposure", "verify@rerun"}
    assert {"changed deps": {"data/my_corpus.txt": "modified"}} in status["masks"]

    # Generating a corpus over the user's own file is refused, naming the key to set.
    set_params(project, corpus={"build": ["synthetic"]})
    assert main(["corpus", "--params", str(project / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "data/my_corpus.txt: is your own file, tracked by data/my_corpus.txt.dvc" in err
    assert "set corpus.build: []" in err
    assert (project / "data/my_corpus.txt").read_text().endswith("user's own text.\n")


def test_own_corpus_can_train_the_tokenizer_too(project):
    """paths.tokenizer_corpus pointed at the user's own corpus: the tokenizer is trained on it; nothing is
    generated."""
    text = generate_text(CorpusConfig(seed=7, n_words=3000, lexicon_size=400))
    (project / "data/my_corpus.txt").write_text(text)
    dvc("add", "data/my_corpus.txt", cwd=project)
    set_params(project, corpus={"build": []}, tokenizer_corpus={"build": []},
               paths={"corpus": "data/my_corpus.txt", "tokenizer_corpus": "data/my_corpus.txt"})
    assert ran(dvc("repro", cwd=project)) == ["tokenizer@bpe", "masks", "train", "exposure", "verify@rerun"]
    paths = load_params(project / "params.yaml").paths
    assert (project / paths.tokenizer).read_text() == train_bpe(text, 300, 2).to_str(pretty=True)
    assert "data/my_corpus.txt" in {d["path"] for d in lock(project)["tokenizer@bpe"]["deps"]}


def test_push_pull_round_trip_is_bit_identical(project, tmp_path):
    paths = load_params(project / "params.yaml").paths
    digest = sha256_file(project / paths.trajectory)
    dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=project)
    dvc("push", cwd=project)
    shutil.rmtree(project / ".dvc/cache")
    for path in (paths.corpus, paths.tokenizer_corpus, paths.tokenizer, paths.masks, paths.trajectory):
        (project / path).unlink()
    dvc("pull", cwd=project)
    assert sha256_file(project / paths.trajectory) == digest
    assert "Data and pipelines are up to date." in dvc("status", "dvc.yaml", cwd=project).stdout


def test_a_packed_trajectory_is_an_output_that_pushes_and_pulls_as_it_is(project, tmp_path):
    """record.format packed: the pipeline writes the .flpack, DVC caches and moves the small file, and what comes
    back is the same bytes, which check proves intact; the metrics say how much smaller it is."""
    plain = load_params(project / "params.yaml").paths.trajectory
    plain_bytes = (project / plain).stat().st_size
    packed = str(Path(plain).with_suffix(".flpack"))
    set_params(project, record={"format": "packed"}, paths={"trajectory": packed})
    assert {"train", "exposure", "verify@rerun"} <= set(ran(dvc("repro", cwd=project)))
    digest, size = sha256_file(project / packed), (project / packed).stat().st_size
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["trajectory_bytes"] == size < plain_bytes
    assert metrics["trajectory_ratio"] == pytest.approx(plain_bytes / size, rel=1e-3)
    assert packed in {o["path"] for o in lock(project)["train"]["outs"]}
    dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=project)
    dvc("push", "train", cwd=project)
    remote = [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    assert digest in {sha256_file(p) for p in remote}  # the packed bytes themselves are what the remote holds
    assert plain_bytes not in {p.stat().st_size for p in remote}  # and not the safetensors form
    shutil.rmtree(project / ".dvc/cache")
    (project / packed).unlink()
    dvc("pull", "train", cwd=project)
    assert sha256_file(project / packed) == digest
    proc = subprocess.run([str(VENV_BIN / "flannel-repro"), "check", packed], cwd=project, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "verdict: intact" in proc.stdout, proc.stdout + proc.stderr
    assert "Data and pipelines are up to date." in dvc("status", "train", cwd=project).stdout


def test_exp_run_set_changes_only_that_value_in_params_yaml(tmp_path):
    """The repository's own params.yaml (its comments, lists and empty values) through DVC's round trip: after `dvc
    exp run -S`, `git diff params.yaml` shows the changed value and nothing else."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    # A one-line stage that reads every section, so that any -S key is a param of the pipeline.
    sections = list(yaml.safe_load((REPO / "params.yaml").read_text()))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"read": {
        "cmd": "python -c \"open('out.txt', 'w').write('read')\"", "params": sections,
        "outs": [{"out.txt": {"cache": False}}]}}}))
    git("init", "-q", cwd=root)
    dvc("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("-c", "user.name=Flannel Test", "-c", "user.email=test@flannel.invalid", "commit", "-qm", "params", cwd=root)
    original = (root / "params.yaml").read_text()
    changes = {  # -S value -> (the lines it replaces, the lines it writes, comments aside)
        "train.steps=7": (["  steps: 500"], ["  steps: 7"]),
        "audit.verify=[]": (["  verify:", "  - rerun"], ["  verify: []"]),
        "corpus.build=[]": (["  build:", "  - synthetic"], ["  build: []"]),
        "train.num_threads=2": (["  num_threads:"], ["  num_threads: 2"]),
        "tracking.uri=http://127.0.0.1:5000": (["  uri:"], ["  uri: http://127.0.0.1:5000"]),
    }
    for change, (removed, added) in changes.items():
        dvc("exp", "run", "-S", change, cwd=root)
        diff = git("diff", "-U0", "params.yaml", cwd=root).splitlines()
        minus = [x[1:] for x in diff if x.startswith("-") and not x.startswith("---")]
        plus = [x[1:] for x in diff if x.startswith("+") and not x.startswith("+++")]
        assert ([x.partition("  #")[0].rstrip() for x in minus], [x.partition(" #")[0].rstrip() for x in plus]) == (
            removed, added), (change, diff)
        assert [x.partition("#")[2] for x in plus] == [x.partition("#")[2] for x in minus[:len(plus)]]  # kept
        assert load_params(root / "params.yaml") == load_params(REPO / "params.yaml", [change])
        git("checkout", "-q", "params.yaml", cwd=root)
        assert (root / "params.yaml").read_text() == original


def test_tables_show_the_values_a_user_compares(base):
    """`dvc exp show`: the dependency columns are the stages' code folders and data files, not one per module; the
    documented --drop/--keep recipe (docs/pipeline.md) leaves the experiment, its seed and steps, final loss, dead
    share, steps/s, verdict and content digests."""
    data = json.loads(dvc("exp", "show", "--json", cwd=base).stdout)[0]["data"]
    assert len(data["deps"]) <= 19, sorted(data["deps"])
    assert {p for p in data["deps"] if p.startswith("flannel_repro/")} == {
        "flannel_repro/__init__.py", "flannel_repro/cli.py", "flannel_repro/core", "flannel_repro/data/corpus.py",
        "flannel_repro/data/tokenizer_corpus.py", "flannel_repro/data/tokenizer.py", "flannel_repro/data/masks.py",
        "flannel_repro/recording", "flannel_repro/tracking", "flannel_repro/training", "flannel_repro/trajectory",
        "flannel_repro/audit", "flannel_repro/tracing", "flannel_repro/analysis"}
    # DVC matches each --keep pattern from the column name's start
    recipe = ["--drop", ".*", "--keep", r"Experiment|train\.train_seed|train\.steps|final_loss|dead_share|steps_per_s"
              r"|verdict|first_divergent_step|(audited_)?content$"]
    header = dvc("exp", "show", "--csv", *recipe, cwd=base).stdout.splitlines()[0].split(",")
    assert sorted(header) == sorted(["Experiment", "audited_content", "content", "dead_share", "final_loss",
                                     "steps_per_s", "verdict", "train.train_seed", "train.steps"])


def test_a_run_left_unaudited_shows_no_verdict(project):
    """`dvc exp run -S 'audit.verify=[]'` with a new seed: the previous audit's files and its dvc.lock entry go with
    the trajectory they were about, so no table shows "identical" beside a run nobody audited; putting the audit
    back audits the new run alone."""
    params = load_params(project / "params.yaml")
    before = json.loads((project / params.paths.metrics).read_text())
    proc = dvc("exp", "run", "-S", "audit.verify=[]", "-S", "train.train_seed=47", cwd=project)
    assert ran(proc) == ["train", "exposure"]
    after = json.loads((project / params.paths.metrics).read_text())
    assert after["content_digest"] != before["content_digest"]
    assert not (project / params.audit.report).exists() and not (project / params.audit.metrics).exists()
    assert not [name for name in lock(project) if name.startswith("verify")]
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)[""]["data"]
    assert set(shown) == {params.paths.metrics}
    [row] = [r for r in experiments(project) if r["params"]["train"]["train_seed"] == 47]
    assert "verdict" not in json.dumps(row["metrics"])
    assert dvc("status", cwd=project).stdout.strip() == "Data and pipelines are up to date."

    proc = dvc("exp", "run", "-S", "audit.verify=[rerun]", cwd=project)
    assert ran(proc) == ["verify@rerun"]  # the training is not redone
    verdict = json.loads((project / params.audit.metrics).read_text())
    assert (verdict["verdict"], verdict["audited_content"]) == ("identical", after["content"])
    audited = {d["path"]: d["md5"] for d in lock(project)["verify@rerun"]["deps"]}[params.paths.trajectory]
    assert audited == {o["path"]: o["md5"] for o in lock(project)["train"]["outs"]}[params.paths.trajectory]


def test_a_plain_train_removes_the_old_verdict_but_leaves_dvc_lock_to_dvc(project, monkeypatch):
    """`flannel-repro train` outside DVC replaces the trajectory, so the verdict about the old one goes, but dvc.lock
    is DVC's file: it is left byte for byte, and `dvc status` says both stages changed."""
    params = load_params(project / "params.yaml")
    before = (project / "dvc.lock").read_bytes()
    monkeypatch.chdir(project)
    for name in ("DVC_STAGE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "-S", "train.train_seed=48"]) == 0
    assert not (project / params.audit.report).exists() and not (project / params.audit.metrics).exists()
    assert (project / "dvc.lock").read_bytes() == before
    status = dvc("status", cwd=project).stdout
    assert "train:" in status and "verify@rerun:" in status


def test_audit_can_be_left_out_of_the_pipeline(project):
    """audit.verify: [] (a seed sweep) drops the verify stage: no extra training run, and a clean status."""
    set_params(project, audit={"verify": []}, train={"train_seed": 46})
    proc = dvc("repro", cwd=project)
    assert ran(proc) == ["train", "exposure"]
    assert "verify" not in dvc("stage", "list", "--name-only", cwd=project).stdout
    assert dvc("status", cwd=project).stdout.strip() == "Data and pipelines are up to date."
