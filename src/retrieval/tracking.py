"""MLflow, in one place: every stage run, grouped per pipeline execution.

Store: ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3
would otherwise put a database in whatever directory a stage runs in, and `dvc exp run --queue`
runs stages in a temporary copy). MLflow keeps absolute artifact URIs in the database: a copied
or moved clone repoints them at its own ``mlruns/`` when it opens the store (``_relocate``), so it
never writes into, or reads from, the first clone. ``MLFLOW_TRACKING_URI`` overrides it for a team
server.

Grouping: each stage is a nested run under one parent per (DVC experiment or workspace, git
commit, params). The parent carries only the headline metrics (``retrieval.headline``: the same
numbers as the DVC metrics files) prefixed by the stage name (``evaluate.unfrozen.map``) and all
params, so the MLflow UI compares experiments side by side; each stage's own run keeps all of
its details.

Faults (README, "Tracking faults"): a server named by ``MLFLOW_TRACKING_URI`` is probed first
(``tracking.timeout_s``); when it does not answer, ``tracking.unreachable`` decides: ``fail`` in
one line, or ``local`` (one warning, then the project's store). The local store vanishing or
turning unwritable mid-stage fails the stage in one line naming it: its runs cannot be recovered
into a new store, and the next run creates one.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from retrieval import paths
from retrieval.outputs import StorageError, UserError, preflight
from retrieval.workspace import project_root

EXPERIMENT_NAME = "retrieval"
# The registered model: one version per pipeline execution that evaluates a fine-tuned network.
REGISTERED_MODEL = "retrieval-embedding"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag says what it holds.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
T = TypeVar("T")

logging.getLogger("alembic").setLevel(logging.WARNING)
# MLflow logs each database error with its traceback before raising it: the raised error is
# what a stage reports (one line for a vanished or read-only store), so the log is noise.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
# The system metrics monitor says "started", "skip GPU", "stopping", "terminated" at INFO for
# every stage: four lines of noise a stage in a piped log.
logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)


# The server URI this process fell back from (tracking.unreachable: local), else None.
_fallen_back_from: str | None = None


def _server_uri() -> str | None:
    """MLFLOW_TRACKING_URI, unless this stage found it unreachable and fell back."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri != _fallen_back_from else None


def local_store() -> Path:
    return project_root() / "mlruns"


def tracking_uri() -> str:
    uri = _server_uri()
    if uri:
        return uri
    store = local_store()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_location() -> str | None:
    if _server_uri():
        return None  # the server decides
    return (local_store() / "artifacts").as_uri()


# Where MLflow 3's SQL store keeps absolute artifact URIs (experiments, runs, logged models,
# registered versions). MLflow has no API to change them; tests/test_tracking.py pins the schema.
_URI_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                ("model_versions", "source"))


def _store_prefix(location: str) -> str | None:
    """The ``.../mlruns/`` folder a local artifact location lies in, spelt as stored (a
    ``file://`` URI or a plain path); None for a remote one (s3://, mlflow-artifacts:, ...)."""
    if not location.startswith(("file:", "/")) or "/mlruns/" not in location:
        return None
    return location[:location.rindex("/mlruns/") + len("/mlruns/")]


def _relocate(db: Path) -> None:
    """Repoint the store ``db`` (``<project>/mlruns/mlflow.db``) at its own folder when it was
    copied or moved from another clone: every stored URI under the old ``mlruns/`` moves to this
    one (the files came along with the copy), and the experiment's new runs go to
    ``mlruns/artifacts``. One read when nothing moved; a new store has nothing to move."""
    store = db.parent
    expected = (store / "artifacts").as_uri()
    with closing(sqlite3.connect(db, timeout=30)) as connection, connection:
        try:
            experiments = connection.execute(
                "SELECT name, artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # MLflow has not created its tables yet
            return
        moves = {}
        for _, location in experiments:
            old = _store_prefix(location or "")
            if old is not None:
                new = (store.as_uri() if old.startswith("file:") else str(store)) + "/"
                if new != old:
                    moves[old] = new
        for old, new in moves.items():
            for table, column in _URI_COLUMNS:
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ?", (new, len(old) + 1, len(old), old))
            # The parent run's link to the report (link_on_parent) names the file's URI.
            connection.execute("UPDATE tags SET value = replace(value, ?, ?) "
                               "WHERE instr(value, ?) > 0", (old, new, old))
        for name, location in experiments:
            # An experiment MLflow created with its default location (<clone>/mlruns/<id>).
            if name == EXPERIMENT_NAME and _store_prefix(location or "") and \
                    location != expected:
                connection.execute("UPDATE experiments SET artifact_location = ? WHERE name = ?",
                                   (expected, name))


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for a server or another store)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


class TrackingUnreachable(UserError):
    """MLFLOW_TRACKING_URI names a server that did not answer (tracking.unreachable: fail)."""


def probe_server(uri: str, timeout_s: float) -> str | None:
    """Why the MLflow server at ``uri`` is unreachable (None: it answered, whatever the HTTP
    status). One request, no retries: MLflow's own client retries for minutes."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # something answered: MLflow reports what it does not like
    except urllib.error.URLError as error:
        return str(getattr(error, "reason", error))
    except (OSError, http.client.HTTPException) as error:  # a timeout, a reset, garbage
        return str(error) or type(error).__name__


def _use_store(mlflow: Any, uri: str) -> None:
    """Point MLflow at ``uri`` without making it the user's choice: mlflow.set_tracking_uri
    also exports MLFLOW_TRACKING_URI, which ``tracking_uri`` reads as a team server's address,
    so a later call in this process (another project, a test) would log into this store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    db = _sqlite_file(uri)
    if db is not None and _server_uri() is None and db.is_file():
        _retry(lambda: _relocate(db))


def choose_store(all_params: dict[str, Any]) -> None:
    """Probe a tracking server, if one is configured, and apply ``tracking.unreachable``."""
    global _fallen_back_from
    _fallen_back_from = None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.lower().startswith(("http://", "https://")):
        return
    timeout_s = float(all_params.get("tracking.timeout_s", 5.0))
    reason = probe_server(uri, timeout_s)
    if reason is None:
        return
    said = (f"the MLflow server {uri} (MLFLOW_TRACKING_URI) did not answer within "
            f"{timeout_s:g} s ({reason})")
    if all_params.get("tracking.unreachable", "fail") != "local":
        raise TrackingUnreachable(
            f"{said}: start it or fix MLFLOW_TRACKING_URI, or set tracking.unreachable: local "
            "in params.yaml to log to this project's mlruns/ instead")
    _fallen_back_from = uri
    print(f"warning: {said}: logging to the local store {local_store()} instead "
          "(tracking.unreachable: local)", file=sys.stderr)


class _StoreWatch:
    """The local SQLite store as the stage opened it: a file deleted or replaced mid-stage
    goes unnoticed by SQLite (its open connection writes to the unlinked file)."""

    def __init__(self, uri: str):
        self.file = _sqlite_file(uri)
        self.identity = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            status = self.file.stat() if self.file else None
        except FileNotFoundError:
            return None
        return (status.st_dev, status.st_ino) if status else None

    def failure(self, stage: str, error: BaseException | None = None) -> StorageError | None:
        """A one-line error when the store vanished or refused a write, else None."""
        if self.file is None:
            return None
        if self.identity is not None and self._identity() != self.identity:
            return StorageError(
                f"{self.file}: the MLflow store vanished (deleted or replaced) while stage "
                f"{stage} ran, and its runs with it; its outputs are written: re-run the stage "
                "to log it to a new store")
        signs = ("readonly database", "unable to open database", "disk i/o error",
                 "database or disk is full")
        # SQLAlchemy's message opens with its own notes: quote the line SQLite wrote.
        lines = [line for line in str(error or "").splitlines()
                 if any(sign in line.lower() for sign in signs)]
        if lines:
            first = lines[0].strip()[:160]
            return StorageError(
                f"{self.file}: the MLflow store refused a write during stage {stage} ({first}); "
                f"make {self.file.parent} writable (or free space there) and re-run")
        return None

    def check(self, stage: str) -> None:
        failure = self.failure(stage)
        if failure is not None:
            raise failure


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
    """What a stage may do with its MLflow run; every call retries transient lock errors and
    fails in one line if the local store vanished or refused the write."""

    def __init__(self, mlflow_module: Any, run_id: str, parent_id: str, stage: str,
                 watch: _StoreWatch | None = None, experiment_id: str = ""):
        self._mlflow = mlflow_module
        self._client = mlflow_module.MlflowClient()
        self.run_id = run_id
        self.parent_id = parent_id
        self.stage = stage
        self.experiment_id = experiment_id
        self._watch = watch

    def _call(self, call: Callable[[], T]) -> T:
        try:
            result = _retry(call)
        except Exception as error:
            failure = self._watch.failure(self.stage, error) if self._watch else None
            if failure is None:
                raise
            raise failure from error
        if self._watch:
            self._watch.check(self.stage)
        return result

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numbers to this stage's run (non-numbers are skipped): all its details."""
        clean = _metric_values(metrics)
        self._call(lambda: self._mlflow.log_metrics(clean, step=step))

    def log_headline(self, metrics: dict[str, Any]) -> None:
        """The stage's headline numbers (``retrieval.headline.flat``) to the parent run, prefixed
        by the stage (``evaluate.unfrozen.map``): the parent compares experiments, so it carries
        these and nothing else; the details stay on this stage's run."""
        prefixed = {f"{self.stage}.{k}": v for k, v in _metric_values(metrics).items()}
        self._call(lambda: self._log_batch(self.parent_id, prefixed, None))

    def _log_batch(self, run_id: str, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0)
                                                for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_dir():
            self._call(lambda: self._mlflow.log_artifacts(str(path), folder))
        elif Path(path).exists():
            self._call(lambda: self._mlflow.log_artifact(str(path), folder))

    def log_dataset(self) -> None:
        """The prepared dataset as an input of this run and of its parent: named after its
        source, its DVC hash (dvc.lock, prepare's output ``data/prepared``) as the digest,
        DVC's size and file count as tags. Nothing when that entry is missing or stale."""
        entry = dvc_dataset()
        if entry is None:
            return
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        card = _read_json(paths.DATASET_JSON)
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(
                pd.read_csv(paths.INDEX_CSV, keep_default_na=False),
                source=card.get("root") or str(paths.PREPARED),
                name=card.get("source") or "prepared", digest=entry["md5"])
        tags = {"dvc.path": str(paths.PREPARED), "dvc.md5": entry["md5"],
                "dvc.size": str(entry["size"]), "dvc.nfiles": str(entry["nfiles"]),
                "mlflow.data.context": self.stage}
        self._call(lambda: self._client.log_inputs(self.run_id, datasets=[DatasetInput(
            dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])]))
        # MLflow keeps one link per (dataset, run): each stage re-logging it adds nothing.
        self._call(lambda: self._client.log_inputs(self.parent_id, datasets=[DatasetInput(
            dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()
                                          if k != "mlflow.data.context"])]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call(lambda: self._mlflow.set_tags({k: str(v) for k, v in tags.items()}))

    def log_model(self, net: Any, example: Any, tags: dict[str, Any]) -> str:
        """``net`` (fp32, on the CPU, in eval mode) as this run's MLflow PyTorch model "model";
        returns its ``models:/`` URI.

        Saved in torch.export's pt2 format: it loads with torch alone, neither this package nor
        unpickling needed. The signature is images (-1, 3, s, s) -> embedding (-1, D), inferred
        from ``example``: at least two real preprocessed images, because an example batch of one
        would fix the batch axis of the exported graph to 1.
        """
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.inference_mode():
            embedding = net(torch.from_numpy(example)).float().numpy()
        signature = infer_signature(example, embedding)
        info = self._call(lambda: mlflow.pytorch.log_model(
            net, name="model", signature=signature, input_example=example,
            pip_requirements=_model_requirements(), serialization_format="pt2",
            tags={k: str(v) for k, v in tags.items()}))
        return info.model_uri

    def logged_model(self, tags: dict[str, str]) -> str | None:
        """The ``models:/`` URI of the newest model of this experiment whose tags include
        ``tags`` (e.g. the checkpoint's hash), or None."""
        where = " and ".join(f"tags.`{k}` = {quoted(v)}" for k, v in tags.items())
        found = self._call(lambda: self._mlflow.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=where, max_results=1,
            order_by=[{"field_name": "creation_time", "ascending": False}],
            output_format="list"))
        return f"models:/{found[0].model_id}" if found else None

    def register_model(self, model_uri: str, tags: dict[str, Any]) -> str:
        """A new version of ``REGISTERED_MODEL`` from ``model_uri``, tagged; its version."""
        version = self._call(lambda: self._mlflow.register_model(
            model_uri, REGISTERED_MODEL, tags={k: str(v) for k, v in tags.items()}))
        self._call(lambda: self._client.set_tag(self.run_id, "registered_model",
                                                f"{REGISTERED_MODEL}/{version.version}"))
        return str(version.version)

    def link_on_parent(self, title: str, artifact_path: str) -> None:
        """Point the pipeline's parent run at one of this run's artifacts (the report): a tag
        with its URI and the parent's description, which the MLflow UI shows as markdown."""
        uri = self._call(lambda: self._mlflow.get_artifact_uri(artifact_path))
        page = (f"#/experiments/{self.experiment_id}/runs/{self.run_id}/artifacts/"
                f"{artifact_path}")
        note = f"{title}: [{artifact_path}]({page}) (run `{self.stage}`; file `{uri}`)"
        self._call(lambda: self._client.set_tag(self.parent_id, "report", uri))
        self._call(lambda: self._client.set_tag(self.parent_id, "mlflow.note.content", note))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def dvc_dataset(lock: Path = Path("dvc.lock")) -> dict[str, Any] | None:
    """``data/prepared`` as DVC recorded it when prepare last ran under DVC: md5 (without
    ``.dir``), size and nfiles from prepare's ``outs`` in ``lock``. None when the entry is
    missing or the folder's file count or total size differ from it (prepare ran outside DVC
    since, or the data changed): a stale hash would misname the data."""
    import yaml

    try:
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
        outs = stages["prepare"]["outs"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError, yaml.YAMLError):
        return None
    entry = next((out for out in outs if isinstance(out, dict)
                  and Path(str(out.get("path"))) == paths.PREPARED), None)
    if not entry or not all(k in entry for k in ("md5", "size", "nfiles")):
        return None
    files = [f for f in paths.PREPARED.rglob("*") if f.is_file()]
    if len(files) != entry["nfiles"] or sum(f.stat().st_size for f in files) != entry["size"]:
        return None
    return {"md5": str(entry["md5"]).removesuffix(".dir"), "size": int(entry["size"]),
            "nfiles": int(entry["nfiles"])}


def _model_requirements() -> list[str]:
    """What loading a logged model needs: torch, pinned as requirements.txt pins it."""
    import torch

    pinned = project_root() / "requirements.txt"
    if pinned.is_file():
        for line in pinned.read_text().splitlines():
            if line.split("#")[0].strip().startswith("torch=="):
                return [line.split("#")[0].strip()]
    return [f"torch=={torch.__version__.split('+')[0]}"]


def _metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``metrics`` as floats, under names MLflow accepts ("+" is not one of its
    characters: gradcam++ -> gradcampp)."""
    return {k.replace("+", "p"): float(v) for k, v in metrics.items() if _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@contextmanager
def stage_run(stage: str, params: dict[str, Any], all_params: dict[str, Any] | None = None
              ) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, nested under its pipeline execution's parent run.

    ``params`` are the keys this stage reads (logged on the stage run); ``all_params`` (default:
    the same) identify the pipeline execution and are logged on the parent.
    """
    all_params = all_params if all_params is not None else params
    choose_store(all_params)
    local = _sqlite_file(tracking_uri())
    # Before any work: a read-only output folder or store is refused while nothing has changed.
    preflight(stage, extra=[local] if local else [])
    import mlflow

    uri = tracking_uri()
    _use_store(mlflow, uri)
    watch = _StoreWatch(uri)
    opened = StageRun(mlflow, "", "", stage, watch)  # its _call guards the opening too
    experiment = opened._call(lambda: _ensure_experiment(mlflow))
    watch = _StoreWatch(uri)  # the store exists now, created by MLflow if it was new
    opened._watch = watch
    group, display = run_group(all_params)
    tags = {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
            "pipeline.group": group}
    parent_id = opened._call(lambda: _find_or_create_parent(mlflow, experiment, group, display,
                                                            tags, all_params))
    opened._call(lambda: mlflow.start_run(run_id=parent_id))
    # System metrics (CPU, memory, disk, network; GPU with pynvml) every 10 s, from a thread
    # that end_run stops: a stage shorter than that logs none.
    child = opened._call(lambda: mlflow.start_run(run_name=stage, nested=True,
                                                  experiment_id=experiment,
                                                  tags={**tags, "stage": stage},
                                                  log_system_metrics=True))
    run = StageRun(mlflow, child.info.run_id, parent_id, stage, watch, experiment)
    try:
        run._call(lambda: mlflow.log_params({k: _param(v) for k, v in params.items()}))
        if stage != "prepare":  # prepare writes the dataset: DVC hashes it after the stage
            run.log_dataset()
        yield run
    except BaseException as error:
        failure = error if isinstance(error, StorageError) else watch.failure(stage, error)
        if failure is None:
            _end_runs(mlflow, "FAILED")
            raise
        with suppress(Exception):  # a broken store: the one-line error matters, not the end
            _end_runs(mlflow, "FAILED")
        if failure is error:
            raise
        raise failure from error
    else:
        run._call(lambda: _end_runs(mlflow, "FINISHED"))


def _end_runs(mlflow: Any, status: str) -> None:
    """End the stage's run and its parent, the second even when the first fails (MLflow drops
    a run from its stack before writing its end: a process that goes on must not keep it)."""
    errors = []
    for _ in range(2):
        try:
            _retry(lambda: mlflow.end_run(status=status))
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]


def _param(value: Any) -> str:
    return str(value)[:6000]


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter. MLflow has no escape inside a
    literal, but takes either quote: an experiment name with an apostrophe (``it's``) goes in
    double quotes. A name with both kinds cannot be written, nor one ending in a backslash (the
    filter parser reads it as escaping the closing quote): a one-line UserError names it."""
    if value.endswith("\\"):
        raise UserError(f"the DVC experiment name {value!r} ends with a backslash: MLflow cannot "
                        "search for it; rename the experiment (dvc exp run -n NAME)")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"the DVC experiment name {value!r} holds both ' and \": MLflow cannot "
                    "search for it; rename the experiment (dvc exp run -n NAME)")


def _ensure_experiment(mlflow: Any) -> str:
    found = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if found is not None:
        if EXPERIMENT_KIND[0] not in found.tags:  # a store from before the tag (a kind chosen
            # in the UI stays)
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=_artifact_location(),
                                        tags=dict([EXPERIMENT_KIND]))
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

    _use_store(mlflow, tracking_uri())
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

    _use_store(mlflow, tracking_uri())
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

    _use_store(mlflow, tracking_uri())
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

    _use_store(mlflow, tracking_uri())
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in _retry(client.search_experiments)]
    runs = _retry(lambda: client.search_runs(
        experiments, filter_string=f"tags.dvc_experiment = {quoted(dvc_experiment)} and "
        "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]))
    return run_durations({run.data.tags["stage"]: run.info.run_id for run in runs
                          if "stage" in run.data.tags})
