"""Running the real DVC pipeline in a throw-away copy of this repository (rows 7 and 8).

The copy is made like the end-to-end tests make theirs (tests/conftest.py: committed and new
source files, never pipeline outputs, a fresh git repository, a pre-migrated MLflow database), so
the benchmark measures exactly what `dvc repro` does for a user, decoded-image cache included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import common
import yaml

sys.path.insert(0, str(common.REPO))
from tests.conftest import TINY_PARAMS, _tracked_files, merge  # noqa: E402

BIN = Path(sys.executable).parent


def environment() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "RETRIEVAL_CACHE_DIR"):
        env.pop(name, None)
    return env


def mlflow_template(workdir: Path) -> Path:
    """An empty, migrated MLflow database (migrating one costs ~15 s), made once."""
    path = workdir / "mlflow_template" / "mlflow.db"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import mlflow, sys; mlflow.set_tracking_uri('sqlite:///' + sys.argv[1]);"
                "mlflow.MlflowClient().search_experiments()")
        temp = path.with_suffix(".tmp")
        subprocess.run([sys.executable, "-c", code, str(temp)], check=True, env=environment(),
                       capture_output=True)
        os.replace(temp, path)
    return path


def make_repo(destination: Path, workdir: Path, overrides: dict, tiny: bool) -> Path:
    """Copy the checkout's source files to ``destination``, set params, commit."""
    for name in _tracked_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((common.REPO / name).read_bytes())
    params = yaml.safe_load((destination / "params.yaml").read_text())
    params = merge(merge(params, TINY_PARAMS) if tiny else params, overrides)
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (destination / "dvc.lock").unlink(missing_ok=True)
    (destination / "mlruns").mkdir(exist_ok=True)
    (destination / "mlruns" / "mlflow.db").write_bytes(mlflow_template(workdir).read_bytes())
    run(["git", "init", "-q", "-b", "main"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
         "bench"], destination)
    return destination


def stages(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def run(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run to completion: (wall seconds, peak RSS in GiB of the command or any descendant)."""
    log = cwd.parent / f"{cwd.name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=environment(), stdout=out,
                                   stderr=subprocess.STDOUT)
        # wait4's rusage: ru_maxrss is the largest RSS of the child and of every descendant
        # it waited for (dvc -> shell -> the stage's python), in KiB.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n"
                           f"{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024 / common.GIB
