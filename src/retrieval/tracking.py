"""MLflow, in one place: every stage run, grouped per pipeline execution.

Store: ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3
would otherwise put a database in whatever directory a stage runs in, and `dvc exp run --queue`
runs stages in a temporary copy). ``MLFLOW_TRACKING_URI`` overrides it for a team server.

Grouping: each stage is a nested run under one parent per (DVC experiment or workspace, git
commit, params). The parent carries every stage's headline metrics prefixed by the stage name
(``evaluate.unfrozen.map``) and all params, so the MLflow UI compares experiments side by side.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from retrieval.workspace import project_root

EXPERIMENT_NAME = "retrieval"
T = TypeVar("T")

logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = project_root() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_location() -> str | None:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the server decides
    return (project_root() / "mlruns" / "artifacts").as_uri()


def _retry(call: Callable[[], T], attempts: int = 8) -> T:
    """SQLite allows one writer: concurrent experiments can see 'database is locked'."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # MLflow wraps SQLAlchemy errors in its own types
            transient = "locked" in str(error) or "busy" in str(error).lower()
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt + random.random() * 0.2)
    raise AssertionError("unreachable")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=Path.cwd())
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_group(params: dict[str, Any]) -> tuple[str, str]:
    """(group key, display name) of the pipeline execution this stage belongs to."""
    experiment = os.environ.get("DVC_EXP_NAME") or "workspace"
    commit = git_commit()
    fingerprint = hashlib.sha1(repr(sorted(params.items())).encode()).hexdigest()[:10]
    return f"{experiment}:{commit[:12]}:{fingerprint}", f"{experiment} @ {commit[:8]}"


class StageRun:
    """What a stage may do with its MLflow run; every call retries transient lock errors."""

    def __init__(self, mlflow_module: Any, run_id: str, parent_id: str, stage: str):
        self._mlflow = mlflow_module
        self._client = mlflow_module.MlflowClient()
        self.run_id = run_id
        self.parent_id = parent_id
        self.stage = stage

    def log_metrics(self, metrics: dict[str, float], step: int | None = None,
                    to_parent: bool = False) -> None:
        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        _retry(lambda: self._mlflow.log_metrics(clean, step=step))
        if to_parent:
            prefixed = {f"{self.stage}.{k}": v for k, v in clean.items()}
            _retry(lambda: self._log_batch(self.parent_id, prefixed, step))

    def _log_batch(self, run_id: str, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0)
                                                for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_dir():
            _retry(lambda: self._mlflow.log_artifacts(str(path), folder))
        elif Path(path).exists():
            _retry(lambda: self._mlflow.log_artifact(str(path), folder))

    def set_tags(self, tags: dict[str, Any]) -> None:
        _retry(lambda: self._mlflow.set_tags({k: str(v) for k, v in tags.items()}))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@contextmanager
def stage_run(stage: str, params: dict[str, Any], all_params: dict[str, Any] | None = None
              ) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, nested under its pipeline execution's parent run.

    ``params`` are the keys this stage reads (logged on the stage run); ``all_params`` (default:
    the same) identify the pipeline execution and are logged on the parent.
    """
    import mlflow

    all_params = all_params if all_params is not None else params
    mlflow.set_tracking_uri(tracking_uri())
    experiment = _retry(lambda: _ensure_experiment(mlflow))
    group, display = run_group(all_params)
    tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
            "pipeline.group": group}
    parent_id = _retry(lambda: _find_or_create_parent(mlflow, experiment, group, display, tags,
                                                      all_params))
    with _retry(lambda: mlflow.start_run(run_id=parent_id)):
        child = _retry(lambda: mlflow.start_run(run_name=stage, nested=True,
                                                experiment_id=experiment,
                                                tags={**tags, "stage": stage}))
        try:
            _retry(lambda: mlflow.log_params({k: _param(v) for k, v in params.items()}))
            yield StageRun(mlflow, child.info.run_id, parent_id, stage)
        except BaseException:
            _retry(lambda: mlflow.end_run(status="FAILED"))
            raise
        else:
            _retry(lambda: mlflow.end_run())


def _param(value: Any) -> str:
    return str(value)[:6000]


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter. MLflow has no escape inside a
    literal, but takes either quote: an experiment name with an apostrophe (``it's``) goes in
    double quotes. A name with both kinds cannot be written: a one-line UserError names it."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    from retrieval.outputs import UserError

    raise UserError(f"the DVC experiment name {value!r} holds both ' and \": MLflow cannot "
                    "search for it; rename the experiment (dvc exp run -n NAME)")


def _ensure_experiment(mlflow: Any) -> str:
    found = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=_artifact_location())
    except Exception:
        # Another experiment process created it first.
        return mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id


def _find_or_create_parent(mlflow: Any, experiment: str, group: str, display: str,
                           tags: dict[str, str], params: dict[str, Any]) -> str:
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment], max_results=1, filter_string=(
        f"tags.`pipeline.group` = {quoted(group)} and tags.`pipeline.parent` = 'true'"))
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=display,
                            tags={**tags, "pipeline.parent": "true"})
    from mlflow.entities import Param

    items = [Param(k, _param(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def pipeline_runs(max_results: int = 200) -> list[dict[str, Any]]:
    """Every pipeline execution (parent run), newest first, as plain dicts: run_id, name,
    dvc_experiment, git_commit, params and metrics (for the report's experiment comparison)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        return []
    runs = _retry(lambda: mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], filter_string="tags.`pipeline.parent` = 'true'",
        order_by=["attributes.start_time DESC"], max_results=max_results))
    return [{"run_id": run.info.run_id, "name": run.info.run_name,
             "dvc_experiment": run.data.tags.get("dvc_experiment") or "workspace",
             "git_commit": run.data.tags.get("git_commit", ""),
             "params": dict(run.data.params), "metrics": dict(run.data.metrics)}
            for run in runs]


def pipeline_run_ids(params: dict[str, Any]) -> dict[str, str]:
    """stage -> latest run id of the current pipeline execution (for the report), searching
    every experiment: stage runs started without an experiment id (nested `mlflow.start_run`)
    land in MLflow's 'Default' experiment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in _retry(client.search_experiments)]
    if not experiments:
        return {}
    group, _ = run_group(params)
    runs = _retry(lambda: client.search_runs(
        experiments, filter_string=f"tags.`pipeline.group` = {quoted(group)}",
        order_by=["attributes.start_time ASC"]))
    return {run.data.tags.get("stage", "pipeline"): run.info.run_id for run in runs}


def run_durations(run_ids: dict[str, str]) -> dict[str, float]:
    """stage -> seconds from start to end of its MLflow run, for the finished runs among
    ``run_ids`` (stage -> run id, as `pipeline_run_ids` gives them; the parent is skipped)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    durations = {}
    for stage, run_id in run_ids.items():
        if stage == "pipeline":
            continue
        info = _retry(lambda run_id=run_id: client.get_run(run_id)).info
        if info.end_time is not None and info.start_time is not None:
            durations[stage] = (info.end_time - info.start_time) / 1000.0
    return durations


def experiment_durations(dvc_experiment: str) -> dict[str, float]:
    """stage -> seconds of the latest finished stage run of a DVC experiment (by name)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in _retry(client.search_experiments)]
    runs = _retry(lambda: client.search_runs(
        experiments, filter_string=f"tags.dvc_experiment = {quoted(dvc_experiment)} and "
        "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]))
    return run_durations({run.data.tags["stage"]: run.info.run_id for run in runs
                          if "stage" in run.data.tags})
