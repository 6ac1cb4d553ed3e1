"""Fixtures of the reliability suite (issue #8): small repositories and one-line error checks.

`trained_repo` is a tiny copy of the project cut down to the data and training stages, with
train_frozen already reproduced and committed: the interruption tests re-run train_unfrozen in
it, the concurrency test queues experiments on top of its commit.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo, run

TRAINING_STAGES = ("prepare", "split", "verify_normalization", "train_frozen", "train_unfrozen")


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


def run_script(script: str | Path, args: list[str] | None = None, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a stage script or `python -m retrieval` in this process, as `python script args`
    would (same code path, outputs.run_main included), without the ~4 s of a fresh interpreter.

    Returns what a subprocess would: the exit code and the captured stdout and stderr.
    `script` is a path (relative to `cwd`) or "retrieval" for the CLI; `env` entries are set for
    the call only (a value of None removes the variable).
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    saved_env, saved_cwd, saved_argv = dict(os.environ), Path.cwd(), sys.argv
    # run_main installs SIGINT/SIGTERM handlers (lifeline): pytest gets its own back after.
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.pop("DVC_ROOT", None)
    for name, value in (env or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = [str(script), *(args or [])]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                if str(script) == "retrieval":
                    runpy.run_module("retrieval", run_name="__main__", alter_sys=False)
                else:
                    runpy.run_path(str(script), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (exit_.code is not None)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([str(script), *(args or [])], code, stdout.getvalue(),
                                       stderr.getvalue())


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Path:
    """prepare -> split -> verify_normalization (train_frozen's gate) -> train_frozen reproduced
    and committed; train_unfrozen runs 3 epochs."""
    repo = make_repo(tmp_path_factory.mktemp("trained"), mlflow_db_template,
                     {"train_unfrozen": {"epochs": 3}})
    keep_stages(repo, TRAINING_STAGES)
    run(["dvc", "repro", "train_frozen"], cwd=repo)
    commit(repo, "data and train_frozen")
    return repo
