"""The package's layering, as a contract: which folder may import which, no import circle (type-only imports
included), mlflow only behind the tracking store, and the text stages free of torch.

Imports are read from the source (every `import` and `from ... import`, at module level, inside functions and under
`TYPE_CHECKING` alike), so a rule breaks the moment a line that breaks it is written, whether or not a test runs
that line. Each failure names the rule, the importing module and what it imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "flannel_repro"

# Each folder and the folders it may import. The CLI (flannel_repro/cli.py) may import every folder; nothing imports
# the CLI.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "trajectory": {"core"},
    "recording": {"core", "data", "trajectory"},
    "tracking": {"core", "trajectory"},
    "tracing": {"core", "data", "trajectory"},
    "training": {"core", "data", "trajectory", "recording", "tracking", "tracing"},
    "audit": {"core", "data", "trajectory", "recording", "tracking", "training", "tracing"},
    "analysis": {"core", "data", "trajectory"},
    "sweep": {"core", "data", "trajectory", "tracking", "training"},
}
RAY_FOLDER = "sweep"  # ray, an optional extra, is imported only by the sweep
MLFLOW_MODULES = {"flannel_repro.tracking.mlflow_store", "flannel_repro.tracking.spool"}
TEXT_STAGES = ("flannel_repro.data.corpus", "flannel_repro.data.tokenizer_corpus", "flannel_repro.data.tokenizer")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, me: str | None = None) -> set[str]:
    """Every module `path` (module `me`) names in an import statement, resolved to a module of the package where it
    is one (`from flannel_repro.trajectory import content` names flannel_repro.trajectory.content)."""
    known = modules()
    out = set()
    me = me or module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return out


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "flannel_repro" else None


def test_every_module_lives_in_a_folder_of_the_contract():
    top = ("__init__.py", "cli.py", "__main__.py")
    loose = [m for m, p in modules().items() if p.parent == PACKAGE and p.name not in top]
    unknown = sorted({folder(m) for m in modules() if folder(m) is not None} - set(ALLOWED))
    assert not loose, f"rule 'every module lives in a folder of ALLOWED (tests/test_layout.py)': {loose}"
    assert not unknown, f"rule 'a new folder is added to ALLOWED with the folders it may import': {unknown}"


def layer_violations(mod: str, targets: set[str]) -> list[str]:
    src, out = folder(mod), []
    for target in sorted(targets):
        dst = folder(target) if target.startswith("flannel_repro.") else None
        if target == "flannel_repro.cli" and mod != "flannel_repro.__main__":
            out.append(f"rule 'nothing imports the CLI': {mod} imports {target}")
        if src is None or dst is None or dst == src:
            continue
        if dst not in ALLOWED[src]:
            out.append(f"rule '{src} imports only {sorted(ALLOWED[src]) or 'no other folder'}': {mod} imports {target}")
    return out


def test_each_folder_imports_only_the_folders_below_it():
    broken = [line for mod, path in modules().items() for line in layer_violations(mod, imports(path))]
    assert not broken, "\n".join(broken)


def test_no_import_circle_type_only_imports_included():
    graph = defaultdict(set)
    known = modules()
    for mod, path in known.items():
        graph[mod] = {t for t in imports(path) if t in known and t != "flannel_repro"}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert not circles, "rule 'no import circle': " + "; ".join(circles)


def test_only_the_tracking_store_and_spool_import_mlflow():
    users = sorted(m for m, p in modules().items() if any(t.split(".")[0] == "mlflow" for t in imports(p)))
    assert set(users) <= MLFLOW_MODULES, f"rule 'only {sorted(MLFLOW_MODULES)} import mlflow': {users}"
    assert users, "the tracking store no longer imports mlflow: update MLFLOW_MODULES"


def test_only_the_sweep_imports_ray():
    users = sorted(m for m, p in modules().items() if any(t.split(".")[0] == "ray" for t in imports(p)))
    assert users, "the sweep no longer imports ray: update RAY_FOLDER"
    assert all(folder(m) == RAY_FOLDER for m in users), f"rule 'only flannel_repro/{RAY_FOLDER} imports ray': {users}"


def test_subpackage_init_files_are_empty():
    # Re-exports would import a folder's every module with any one of them (and torch with the data stages).
    full = [str(p.relative_to(REPO)) for p in PACKAGE.glob("*/__init__.py") if p.read_text().strip()]
    assert not full, f"rule 'a folder's __init__.py stays empty': {full}"


def test_the_text_stages_and_the_cli_load_no_torch():
    code = ("import sys; import flannel_repro.cli, flannel_repro.core.config, flannel_repro.core.paths_guard; "
            + "; ".join(f"import {m}" for m in TEXT_STAGES)
            + "; print(sorted(m for m in ('torch', 'numpy', 'mlflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"rule 'the corpus and tokenizer stages load no torch, numpy or mlflow': {out}"


def test_a_broken_rule_is_named(tmp_path):
    """The checks can fail: a data module that imports the trajectory file, even under TYPE_CHECKING inside a
    function, breaks the data rule, and the message names it."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    if TYPE_CHECKING:\n        from flannel_repro.trajectory import file\n")
    lines = layer_violations("flannel_repro.data.bad", imports(bad, "flannel_repro.data.bad"))
    assert lines == ["rule 'data imports only ['core']': flannel_repro.data.bad imports flannel_repro.trajectory.file"]
