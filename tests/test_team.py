"""The team setup, for real: one MLflow tracking server and one DVC remote (README, "Working as a
team"). The tiny pipeline runs once against `mlflow server` on 127.0.0.1; its outputs go through
a local DVC remote to a fresh `git clone`, where `dvc pull` and `dvc repro` re-run nothing.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, make_repo, run

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path, mlflow_db_template: Path):
    """`mlflow server` on loopback with its own SQLite store and artifact folder: (URI, folder)."""
    import shutil

    folder = tmp_path / "server"
    folder.mkdir()
    shutil.copy(mlflow_db_template, folder / "mlflow.db")  # skips ~15 s of migrations
    port = free_port()
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("mlflow server did not start:\n"
                                         + (folder / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield uri, folder / "artifacts"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_a_team_shares_runs_on_a_server_and_data_through_a_remote(
        mlflow_server, tmp_path, mlflow_db_template, monkeypatch):
    uri, server_artifacts = mlflow_server
    repo = make_repo(tmp_path / "repo", mlflow_db_template, {"tracking": {"log_models": True}})
    # conftest's run() drops MLFLOW_TRACKING_URI from the environment: `env` sets it for the
    # stages alone; system metrics every second so that short stages record some.
    team = ["env", f"MLFLOW_TRACKING_URI={uri}", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1"]
    run([*team, "dvc", "repro"], cwd=repo)

    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("retrieval")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's choice
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    children = {r.data.tags["stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == stages
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert any(k.startswith("evaluate.") for k in parent.data.metrics)
    assert children["evaluate"].data.metrics and children["train_unfrozen"].data.metrics
    assert any(k.startswith("system/") for r in children.values() for k in r.data.metrics)
    dataset = children["train_unfrozen"].inputs.dataset_inputs[0].dataset
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    assert dataset.digest == next(o for o in lock if o["path"] == "data/prepared")["md5"][:-4]

    # Artifacts went through the server into its folder, none into the project's mlruns/.
    report = client.download_artifacts(children["report"].info.run_id, "report/report.html",
                                       str(tmp_path / "download"))
    assert Path(report).stat().st_size > 0
    assert any(server_artifacts.rglob("report.html"))
    assert not (repo / "mlruns" / "artifacts").exists()
    assert parent.data.tags["report"].startswith("mlflow-artifacts:")
    versions = client.search_model_versions("name = 'retrieval-embedding'")
    assert versions
    # A teammate loads the registered model from the server (`models:/` resolves through the
    # tracking URI, which the test process otherwise leaves at MLflow's local default).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pytorch.load_model(f"models:/retrieval-embedding/{versions[0].version}")
    assert model is not None

    # The data: a DVC remote (a local folder), pushed, then pulled into a fresh clone.
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm 'pipeline run'",
        cwd=repo)
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], cwd=repo)
    run("dvc push -q && git add .dvc/config && "
        "git -c user.name=t -c user.email=t@t commit -qm remote", cwd=repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], cwd=tmp_path)
    run(["dvc", "pull", "-q"], cwd=clone)
    repro = run(["dvc", "repro"], cwd=clone)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert "Data and pipelines are up to date." in repro.stdout
