"""dvc.yaml tells the truth: a stage re-runs when any code it runs changes.

Each stage's ``deps`` must list its script and every module of ``src/retrieval`` that the script
imports, directly or through other modules (its import closure, found by parsing the imports).
"""

from __future__ import annotations

import ast
import re
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


# --- one place per fact: params lists and paths ------------------------------------------------

@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_logs_the_params_dvc_yaml_declares_for_it(name):
    from retrieval import config

    script = (REPO / STAGES[name]["cmd"].split()[1]).read_text()
    assert f'STAGE = "{name}"' in script and "config.stage_params(STAGE)" in script
    keys = config.stage_params(name, REPO / "dvc.yaml")
    logged = config.select(config.Params(), keys)  # every declared key exists
    assert keys and all(any(k == key or k.startswith(f"{key}.") for k in logged) for key in keys)


def test_stage_params_reads_keys_and_whole_files(tmp_path):
    from retrieval import config

    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  a:\n    params: [seed, data.image_size]\n"
                        "  b:\n    params:\n      - params.yaml:\n")
    assert config.stage_params("a", dvc_yaml) == ("seed", "data.image_size")
    assert "train_unfrozen" in config.stage_params("b", dvc_yaml)
    with pytest.raises(config.ParamsError, match="no stage 'c'"):
        config.stage_params("c", dvc_yaml)
    with pytest.raises(config.ParamsError, match="run stages from the repository root"):
        config.stage_params("a", tmp_path / "elsewhere" / "dvc.yaml")
    with pytest.raises(config.ParamsError, match="unknown params key 'data.nope'"):
        config.select(config.Params(), ["data.nope"])


OUTPUT_FOLDERS = re.compile(r"^(data|models|plots|metrics)/")


def path_literals(path: Path) -> list[str]:
    """String constants that spell out a pipeline path (docstrings aside)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and OUTPUT_FOLDERS.match(node.value)]


def test_pipeline_paths_are_spelled_out_only_in_the_paths_module():
    files = [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "stages").glob("*.py"))]
    found = {str(f.relative_to(REPO)): path_literals(f) for f in files
             if f != PACKAGE / "paths.py"}
    assert {f: p for f, p in found.items() if p} == {}
    assert path_literals(PACKAGE / "paths.py")  # the check sees them where they are


# --- the normalisation check gates training ------------------------------------------------------

def _path(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def stage_edges() -> set[tuple[str, str]]:
    """(producer, consumer) for every dep of a stage that is, or lies inside, another stage's
    output: the edges `dvc dag` draws, from dvc.yaml alone."""
    outputs = {name: [_path(o) for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
               for name, stage in STAGES.items()}
    return {(producer, consumer)
            for consumer, stage in STAGES.items() for dep in map(_path, stage.get("deps", []))
            for producer, outs in outputs.items()
            if any(dep == out or dep.startswith(out.rstrip("/") + "/") for out in outs)}


def downstream(start: str, edges: set[tuple[str, str]]) -> set[str]:
    found, todo = set(), [start]
    while todo:
        node = todo.pop()
        for producer, consumer in edges:
            if producer == node and consumer not in found:
                found.add(consumer)
                todo.append(consumer)
    return found


def test_every_stage_that_feeds_images_to_the_model_waits_for_the_normalisation_check():
    edges = stage_edges()
    assert ("verify_normalization", "train_frozen") in edges
    # Everything that trains, exports or runs the model is behind the gate, directly or through
    # train_frozen's checkpoint.
    assert {"train_frozen", "train_unfrozen", "export", "evaluate", "embed_viz",
            "gradcam_segment", "report"} <= downstream("verify_normalization", edges)
    gate = "metrics/details/verify_normalization.json"
    assert gate in map(_path, STAGES["verify_normalization"]["outs"])
    assert gate in map(_path, STAGES["train_frozen"]["deps"])


def test_dvc_dag_draws_the_gate_edge():
    from tests.conftest import run

    dot = run(["dvc", "dag", "--dot"], cwd=REPO).stdout
    assert '"verify_normalization" -> "train_frozen";' in dot
    assert '"verify_normalization" -> "report";' in dot  # the report still shows its numbers


@pytest.mark.e2e
def test_a_failing_normalisation_check_stops_training(tmp_path, mlflow_db_template):
    from tests.conftest import make_repo, run

    # A tolerance nothing meets: the check fails on the tiny sample's real tensors.
    repo = make_repo(tmp_path / "repo", mlflow_db_template,
                     {"verify_normalization": {"mean_tolerance": 1e-6}})
    result = run(["dvc", "repro", "train_frozen"], cwd=repo, check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "normalisation check failed" in log
    assert "Running stage 'train_frozen'" not in log
    assert not (repo / "models/train_frozen/best.pt").exists()
    assert not (repo / "metrics/details/verify_normalization.json").exists()
