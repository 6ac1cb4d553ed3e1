"""Fixtures of the reliability suite (issue #8): small repositories and one-line error checks.

`trained_repo` is a tiny copy of the project cut down to the data and training stages, with
train_frozen already reproduced and committed: the interruption tests re-run train_unfrozen in
it, the concurrency test queues experiments on top of its commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo, run

TRAINING_STAGES = ("prepare", "split", "train_frozen", "train_unfrozen")


def keep_stages(repo: Path, names: tuple[str, ...]) -> None:
    """Cut the copied dvc.yaml down to these stages (the rest of the DAG is not under test)."""
    dvc_yaml = repo / "dvc.yaml"
    spec = yaml.safe_load(dvc_yaml.read_text())
    spec["stages"] = {name: spec["stages"][name] for name in names}
    dvc_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))


def commit(repo: Path, message: str) -> None:
    run(f"git add -A && git -c user.name=t -c user.email=t@t commit -qm '{message}'", cwd=repo)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr, `error (...): ...`, naming the fragments."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error ("), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Path:
    """prepare -> split -> train_frozen reproduced and committed; train_unfrozen runs 3 epochs."""
    repo = make_repo(tmp_path_factory.mktemp("trained"), mlflow_db_template,
                     {"train_unfrozen": {"epochs": 3}})
    keep_stages(repo, TRAINING_STAGES)
    run(["dvc", "repro", "train_frozen"], cwd=repo)
    commit(repo, "data and train_frozen")
    return repo
