"""Shared fixtures: a temporary copy of the repository configured for a tiny, fast pipeline run.

End-to-end tests run the real `dvc repro` (real DVC, real MLflow store, real training) in a
throw-away git repository made from this checkout's files, on a tiny generated sample with the
default pretrained EfficientNet-Lite0 at 48 px, so the whole pipeline takes about a minute on 2
CPU cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# As the stages' outputs.run_main does: figures go to files, never to a window.
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Overrides that make every stage fast while exercising the same code paths.
TINY_PARAMS = {
    "data": {"image_size": 48, "synthetic": {"classes": 4, "images_per_class": 14, "size": 48}},
    "verify_normalization": {"sample_size": 32},
    # The default backbone and its offline ImageNet weights: the e2e runs exercise the pretrained
    # path; only the head is smaller.
    "model": {"hidden_dim": 32, "embedding_dim": 16},
    "train": {"pairs_per_epoch": 64, "val_pairs": 40, "batch_size": 16},
    "train_frozen": {"epochs": 2},
    "train_unfrozen": {"epochs": 2},
    "evaluate": {"test_pairs": 40, "bootstrap": 50, "examples": 2},
    "embed_viz": {"perplexity": 5.0},
    "gradcam_segment": {"max_images": 12, "overlays": 2},
    # Logging a model costs ~5 s a stage; the one pipeline that checks them (pipeline_repo)
    # turns it back on.
    "tracking": {"log_models": False},
}


def merge(base: dict, overrides: dict, where: str = "") -> dict:
    """``base`` with ``overrides`` applied, nested mappings key by key. A key ``base`` does not
    have is an error: a misspelt override would otherwise be dropped and the test would run
    on the defaults without saying so."""
    merged = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise KeyError(f"override '{where}{key}' is not a key of params.yaml "
                           f"(keys there: {', '.join(map(str, base))})")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merged[key] = merge(base[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def run(cmd: list[str] | str, cwd: Path, check: bool = True, timeout: int = 900,
        env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_TRACKING_URI": "", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI")
    full_env.pop("DVC_ROOT", None)
    # `dvc exp run` commits inside the temporary repo: give git an identity on bare machines.
    for variable in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        full_env.setdefault(variable, "retrieval tests")
    for variable in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        full_env.setdefault(variable, "tests@localhost")
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=full_env, shell=isinstance(cmd, str))
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


OUTPUT_DIRS = ("data/", "models/", "metrics/", "plots/", "report/", "mlruns/", "bench/results/")


def _tracked_files() -> list[str]:
    """Committed files plus new, not-ignored source files; never pipeline outputs."""
    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", *args], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        return out.splitlines()

    new = [f for f in git("--others", "--exclude-standard") if not f.startswith(OUTPUT_DIRS)]
    return [f for f in sorted(set(git("--cached")) | set(new)) if (REPO / f).is_file()]


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow database (creating one costs ~15 s of schema migrations)."""
    folder = tmp_path_factory.mktemp("mlflow_template")
    code = ("import mlflow, sys; mlflow.set_tracking_uri('sqlite:///' + sys.argv[1]);"
            "mlflow.MlflowClient().search_experiments()")
    run([sys.executable, "-c", code, str(folder / "mlflow.db")], cwd=folder)
    return folder / "mlflow.db"


def make_repo(destination: Path, mlflow_db: Path, overrides: dict | None = None) -> Path:
    """Copy the checkout's files into `destination`, commit them, apply the tiny params."""
    for name in _tracked_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params = yaml.safe_load((destination / "params.yaml").read_text())
    params = merge(params, TINY_PARAMS)
    if overrides:
        params = merge(params, overrides)
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("dvc.lock",):
        (destination / stale).unlink(missing_ok=True)
    shutil.rmtree(destination / "metrics", ignore_errors=True)
    (destination / "mlruns").mkdir(exist_ok=True)
    shutil.copy(mlflow_db, destination / "mlruns" / "mlflow.db")
    run("git init -q -b main && git add -A && git -c user.name=t -c user.email=t@t "
        "commit -qm init", cwd=destination)
    return destination


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Path:
    """A temporary repository where the full tiny pipeline has run once with `dvc repro`."""
    repo = make_repo(tmp_path_factory.mktemp("pipeline"), mlflow_db_template,
                     {"tracking": {"log_models": True}})
    result = run(["dvc", "repro"], cwd=repo)
    (repo / ".first_repro.log").write_text(result.stdout + result.stderr)
    return repo


def call_cli(argv: list, capsys) -> tuple[int, str, str]:
    """Run the `retrieval` command in-process like the console script: (exit code, out, err)."""
    from retrieval import cli

    code = 0
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err
