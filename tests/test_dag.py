"""dvc.yaml tells the truth: a stage re-runs when any code it runs changes.

Each stage's ``deps`` must list its script and every module of ``src/retrieval`` that the script
imports, directly or through other modules (its import closure, found by parsing the imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "retrieval"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """'retrieval.plots.training' -> src/retrieval/plots/training.py (None: not ours)."""
    if name != "retrieval" and not name.startswith("retrieval."):
        return None
    parts = name.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts)
    if candidate.with_suffix(".py").is_file():
        return candidate.with_suffix(".py")
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return None


def imported_files(path: Path) -> set[Path]:
    """The package files that ``path`` imports (anywhere in it: lazy imports count too)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = module_file(name)
            if file is not None:
                found.add(file)
    return found


def import_closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for file in imported_files(todo.pop()):
            if file not in seen:
                seen.add(file)
                todo.append(file)
    # An __init__.py that only lists modules runs no code a stage's results depend on.
    return {f for f in seen if f.name != "__init__.py" or f.read_text().count("import") > 0}


def deps_of(stage: dict) -> set[Path]:
    return {(REPO / (d if isinstance(d, str) else next(iter(d)))).resolve()
            for d in stage.get("deps", [])}


def test_closure_finds_lazy_and_nested_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("from retrieval import config\n"
                      "def f():\n    from retrieval.plots import training\n")
    closure = import_closure(script)
    assert PACKAGE / "config.py" in closure and PACKAGE / "plots" / "training.py" in closure
    assert PACKAGE / "outputs.py" in closure  # config imports outputs


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_import_closure_of_its_script(name):
    stage = STAGES[name]
    script = REPO / stage["cmd"].split()[1]
    assert script.is_file(), f"{name}: cmd does not start with `python <script>`"
    deps = deps_of(stage)
    assert script.resolve() in deps, f"{name}: its script {script.name} is not a dep"
    missing = sorted(str(f.relative_to(REPO)) for f in import_closure(script)
                     if f.resolve() not in deps)
    assert not missing, f"stage {name} runs code it does not depend on: {missing}"
