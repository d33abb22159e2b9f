"""Each stage of every dvc.yaml lists, as deps, exactly the package code its command imports: the folders it
imports modules from (flannel_repro/training, ...), the data stages' modules one by one (flannel_repro/data/masks.py:
a change to one data stage reruns only what follows it), and the package's top-level files.

The stages and their resolved commands come from DVC itself (foreach stages included); each command then runs for
real, in stage order, on a tiny project with tracking on (the fullest code path), in a fresh interpreter that
reports the package modules it loaded. A module the command runs but the stage omits would leave a stale result
that DVC calls up to date; one it lists but never runs reruns the stage for nothing."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_params

pytestmark = pytest.mark.slow

# Runs `flannel-repro ARGS` as the console script does (flannel_repro.cli:main) and writes the package's modules
# it loaded, as paths relative to the repository, to the file named by the first argument.
HARNESS = """
import json, os, sys
from flannel_repro.cli import main
code = main(sys.argv[2:])
import flannel_repro
base = os.path.dirname(os.path.dirname(os.path.abspath(flannel_repro.__file__)))
mods = sorted(os.path.relpath(m.__file__, base) for n, m in list(sys.modules.items())
              if (n == "flannel_repro" or n.startswith("flannel_repro.")) and getattr(m, "__file__", None))
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": mods}, f)
"""


def dvc_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("dvc.yaml") if ".dvc" not in p.parts)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The repository's pipeline files with tiny params and tracking on, in a fresh git + DVC folder."""
    root = tmp_path_factory.mktemp("deps") / "project"
    top = {".git", ".venv", "tests", "bench", "data", "tensors", "metrics", "reports", "mlruns", ".flannel",
           ".pytest_cache", "dvc.lock"}  # the project's own folders, not the package's flannel_repro/data

    def skip(folder: str, names: list[str]) -> set[str]:
        at_top = Path(folder) == REPO
        return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or n.startswith("mlflow.db")
                or (at_top and n in top)}

    shutil.copytree(REPO, root, ignore=skip)
    write_params(root, {"tracking": {"enabled": True, "uri": "sqlite:///mlflow.db"}})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def stages(root: Path) -> list[tuple[str, str, str, list[str]]]:
    """(dvc.yaml, stage, command, deps) for every stage, in pipeline order, as DVC resolves them."""
    from dvc.repo import Repo

    out = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue
            wdir = Path(stage.wdir).resolve()
            deps = [str((wdir / d.def_path).resolve().relative_to(root.resolve())) for d in stage.deps]
            dvcfile = str(Path(stage.path).resolve().relative_to(root.resolve()))
            out.append((dvcfile, stage.name, stage.cmd, deps))
    order = {s: i for i, s in enumerate(("corpus", "tokenizer_corpus", "tokenizer", "masks", "train", "verify"))}
    return sorted(out, key=lambda s: order.get(s[1].split(":")[-1].split("@")[0], len(order)))


def imported_modules(cmd: str, cwd: Path, out: Path) -> list[str]:
    args = shlex.split(cmd)
    assert args[0] == "flannel-repro", cmd
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(out), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["code"] == 0, f"{cmd} exited {doc['code']}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return doc["modules"]


def test_every_dvc_yaml_is_covered(project):
    # The default pipeline holds every stage, the audit included (no second dvc.yaml that `dvc status` would
    # report as never run).
    assert dvc_files(project) == [Path("dvc.yaml")]
    names = [s[1] for s in stages(project)]
    assert names == ["corpus@synthetic", "tokenizer_corpus@synthetic", "tokenizer@bpe", "masks", "train",
                     "verify@rerun"]


def code_deps(modules: list[str]) -> list[str]:
    """The deps that cover `modules` (paths relative to the repository) as the stages list them."""
    out = set()
    for m in modules:
        parts = Path(m).parts
        if m == "flannel_repro/data/__init__.py":  # empty (tests/test_layout.py): nothing to rerun a stage for
            continue
        out.add(m if len(parts) == 2 or parts[1] == "data" else "/".join(parts[:2]))
    return sorted(out)


def test_code_deps_cover_folders_and_data_modules():
    assert code_deps(["flannel_repro/cli.py", "flannel_repro/core/config.py", "flannel_repro/core/errors.py",
                      "flannel_repro/data/corpus.py"]) == ["flannel_repro/cli.py", "flannel_repro/core",
                                                           "flannel_repro/data/corpus.py"]


def test_each_stage_lists_exactly_the_modules_its_command_imports(project, tmp_path):
    mismatches = []
    for dvcfile, name, cmd, deps in stages(project):
        listed = sorted(d for d in deps if d.startswith("flannel_repro/"))
        ran = code_deps(imported_modules(cmd, project, tmp_path / "modules.json"))
        if listed != ran:
            missing, extra = sorted(set(ran) - set(listed)), sorted(set(listed) - set(ran))
            mismatches.append(f"{dvcfile}:{name}: add {missing}, remove {extra}")
    assert not mismatches, "\n".join(mismatches)


def test_the_stage_params_name_sections_of_params_yaml(project):
    """A params key a stage lists exists in params.yaml (a typo would make DVC track nothing)."""
    doc = yaml.safe_load((project / "params.yaml").read_text())
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for key in (stage.get("do") or stage).get("params", []):
            section, _, name = key.partition(".")
            assert section in doc and (not name or name in doc[section]), key
