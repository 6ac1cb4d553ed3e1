"""tracking: names that go into MLflow search filters, against a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval import tracking
from retrieval.outputs import UserError


@pytest.mark.parametrize("name", ["plain", "it's", 'say "hi"', "back\\slash", "100%_x"])
def test_an_experiment_name_with_quotes_finds_its_own_runs(name, tmp_path, monkeypatch):
    # An apostrophe went unescaped into the filter and crashed every stage.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", name)
    for stage in ("prepare", "split"):
        with tracking.stage_run(stage, {"seed": 1}) as run:
            run.log_metrics({"value": 1.0})
    monkeypatch.setenv("DVC_EXP_NAME", "other")  # another execution in the same store
    with tracking.stage_run("prepare", {"seed": 1}):
        pass
    monkeypatch.setenv("DVC_EXP_NAME", name)
    ids = tracking.pipeline_run_ids({"seed": 1})
    assert set(ids) == {"pipeline", "prepare", "split"}
    assert set(tracking.experiment_durations(name)) == {"prepare", "split"}


def test_a_name_with_both_quotes_is_refused_in_one_line():
    assert tracking.quoted("it's") == '"it\'s"' and tracking.quoted("a") == "'a'"
    with pytest.raises(UserError, match="holds both ' and \""):
        tracking.quoted("it's \"x\"")
    with pytest.raises(UserError, match="ends with a backslash"):
        tracking.quoted("trailing\\")


def test_a_stage_run_does_not_leave_its_store_as_the_users_tracking_uri(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which tracking_uri() reads as a team
    # server's address: a second project in the same process logged into the first one's store.
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    stores = []
    for project in ("first", "second"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        with tracking.stage_run("prepare", {"seed": 1}):
            pass
        assert "MLFLOW_TRACKING_URI" not in os.environ
        stores.append(tracking.tracking_uri())
    assert stores == [f"sqlite:///{tmp_path / p / 'mlruns' / 'mlflow.db'}"
                      for p in ("first", "second")]
    assert (tmp_path / "second" / "mlruns" / "mlflow.db").stat().st_size > 0


def _files(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*") if f.is_file()}


def _tiny_net():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).eval()
    example = torch.rand(2, 3, 2, 2).numpy()
    return net, example


@pytest.mark.parametrize("made_by", ["stage_run", "mlflow_default"])
def test_a_copied_or_moved_clone_writes_and_reads_only_its_own_mlruns(
        made_by, tmp_path, monkeypatch, mlflow_db_template):
    # The experiment's artifact location was an absolute path into the first clone: a copy
    # went on writing its artifacts there, and a moved clone lost them.
    import shutil

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    first, copy = tmp_path / "first", tmp_path / "copy"
    (first / "mlruns").mkdir(parents=True)
    shutil.copy(mlflow_db_template, first / "mlruns" / "mlflow.db")
    monkeypatch.chdir(first)
    if made_by == "mlflow_default":  # an experiment MLflow placed itself: <first>/mlruns/<id>
        mlflow.set_tracking_uri(tracking.tracking_uri())
        mlflow.create_experiment(tracking.EXPERIMENT_NAME)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (first / "note.txt").write_text("first")
    net, example = _tiny_net()
    with tracking.stage_run("train", {"seed": 1}) as run:
        run.log_artifact(first / "note.txt")
        model_uri = run.log_model(net, example, {"checkpoint": "x"})
        run.register_model(model_uri, {})
        run.link_on_parent("Report", "note.txt")
        old_run = run.run_id

    shutil.copytree(first, copy)
    before = _files(first / "mlruns")
    monkeypatch.chdir(copy)
    (copy / "note.txt").write_text("copy")
    with tracking.stage_run("evaluate", {"seed": 1}) as run:
        run.log_artifact(copy / "note.txt")
        new_run = run.run_id
    assert _files(first / "mlruns") == before  # nothing written into the first clone

    client = mlflow.MlflowClient(tracking.tracking_uri())
    store = (copy / "mlruns").as_uri()
    assert client.get_run(new_run).info.artifact_uri.startswith(store + "/artifacts/")
    assert client.get_experiment_by_name(tracking.EXPERIMENT_NAME).artifact_location == \
        store + "/artifacts"
    # Moved rather than copied: the first clone is gone, its runs and models read from the copy.
    shutil.rmtree(first)
    for run_id, text in ((new_run, "copy"), (old_run, "first")):
        assert client.get_run(run_id).info.artifact_uri.startswith(store + "/")
        local = client.download_artifacts(run_id, "note.txt", str(tmp_path / run_id))
        assert Path(local).read_text() == text
    parent = client.get_run(client.get_run(new_run).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["report"].startswith(store + "/")
    loaded = mlflow.pytorch.load_model(f"models:/{tracking.REGISTERED_MODEL}/1")
    assert loaded(__import__("torch").from_numpy(example)).shape == (2, 4)
    # The experiment opens in MLflow's model-training view, not the GenAI one.
    tags = client.get_experiment_by_name(tracking.EXPERIMENT_NAME).tags
    assert tags[tracking.EXPERIMENT_KIND[0]] == tracking.EXPERIMENT_KIND[1]


def test_a_stage_run_logs_system_metrics(tmp_path, monkeypatch, mlflow_db_template):
    import shutil
    import time

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's is 10 s
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db_template, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("train", {"seed": 1}) as run:
        time.sleep(1.6)
    metrics = mlflow.MlflowClient(tracking.tracking_uri()).get_run(run.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= \
        set(metrics)


def _prepared(folder):
    """data/prepared with an index, a card and dvc.lock's entry for it, as `dvc repro` leaves."""
    import json

    import yaml

    prepared = folder / "data" / "prepared"
    (prepared / "sample").mkdir(parents=True)
    (prepared / "sample" / "a.png").write_bytes(b"x" * 10)
    (prepared / "index.csv").write_text("path,label,mask_path\na.png,a,\nb.png,b,\n")
    (prepared / "dataset.json").write_text(json.dumps({"root": "data/prepared/sample",
                                                       "source": "synthetic"}))
    files = [f for f in prepared.rglob("*") if f.is_file()]
    lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "python stages/prepare.py", "outs": [
        {"path": "data/prepared", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir",
         "size": sum(f.stat().st_size for f in files), "nfiles": len(files)}]}}}
    (folder / "dvc.lock").write_text(yaml.safe_dump(lock))
    return prepared


def test_the_dataset_is_logged_with_its_dvc_hash_and_size(tmp_path, monkeypatch,
                                                           mlflow_db_template):
    import shutil

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db_template, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    prepared = _prepared(tmp_path)
    for stage in ("prepare", "split", "train"):
        with tracking.stage_run(stage, {"seed": 1}) as run:
            pass
        if stage == "prepare":  # its output: DVC hashes it only after the stage
            assert run._client.get_run(run.run_id).inputs.dataset_inputs == []
    client = mlflow.MlflowClient(tracking.tracking_uri())
    for run_id in (run.run_id, run.parent_id):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert len(inputs) == 1  # the parent keeps one link however many stages log it
        dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
        assert (dataset.name, dataset.digest) == ("synthetic", "0123456789abcdef0123456789abcdef")
        assert '"num_rows": 2' in dataset.profile
        assert tags["dvc.nfiles"] == "3" and int(tags["dvc.size"]) > 10
    assert tags.get("mlflow.data.context") is None  # the parent: no one stage
    stage_tags = client.get_run(run.run_id).inputs.dataset_inputs[0].tags
    assert {t.key: t.value for t in stage_tags}["mlflow.data.context"] == "train"
    # prepare re-ran outside DVC: dvc.lock's hash no longer names the data, so none is logged.
    (prepared / "index.csv").write_text("path,label,mask_path\na.png,a,\n")
    assert tracking.dvc_dataset() is None


def test_the_parent_run_carries_only_the_headline_and_the_stage_runs_keep_the_details(
        tmp_path, monkeypatch, mlflow_db_template):
    """Issue 18: the parent held every stage's metrics (241, embedding_dim and tp/fp among them).
    Now it holds the headline (the numbers of the DVC metrics files), each stage run the rest."""
    import shutil

    import mlflow

    from retrieval import config, evaluation, headline
    from tests.report_data import METRICS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db_template, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    segment = dict(METRICS["gradcam_segment"])  # a method whose name MLflow refuses as is
    segment["unfrozen"] = {**segment["unfrozen"], "gradcam++": {"mean_iou": 0.25, "target": "x"}}
    details = {stage: METRICS[stage] for stage in ("prepare", "split", "train_frozen",
                                                   "train_unfrozen", "evaluate", "embed_viz")}
    details["gradcam_segment"] = segment
    runs = {}
    for stage, values in details.items():
        with tracking.stage_run(stage, {"seed": 1}) as run:
            flat = (evaluation.flat_metrics(values) if stage == "evaluate"
                    else config.flatten(values))
            run.log_metrics(flat)
            run.log_headline(headline.flat(stage, values))
        runs[stage] = run.run_id
    client = mlflow.MlflowClient(tracking.tracking_uri())
    parent = client.get_run(run.parent_id).data.metrics
    models = ("baseline", "frozen", "unfrozen")
    assert set(parent) == {
        *(f"evaluate.{m}.{k}" for m in models for k in ("precision_at_1", "map", "accuracy",
                                                       "roc_auc")),
        *(f"gradcam_segment.{m}.iou.gradcam" for m in models),
        "gradcam_segment.unfrozen.iou.gradcampp",
        *(f"{s}.{k}" for s in ("train_frozen", "train_unfrozen")
          for k in ("val_accuracy", "best_epoch"))}
    assert parent["evaluate.unfrozen.map"] == 0.58
    assert parent["gradcam_segment.frozen.iou.gradcam"] == 0.422
    assert parent["train_frozen.val_accuracy"] == 0.71
    # The details stay on each stage's own run.
    evaluate = client.get_run(runs["evaluate"]).data.metrics
    assert evaluate["unfrozen.tp"] == 700 and evaluate["unfrozen.embedding_dim"] == 16
    assert evaluate["unfrozen.map"] == 0.58
    assert client.get_run(runs["prepare"]).data.metrics["images"] == 120
    assert client.get_run(runs["gradcam_segment"]).data.metrics[
        "unfrozen.gradcampp.mean_iou"] == 0.25
    assert client.get_run(runs["train_unfrozen"]).data.metrics["best_val_loss"] == 0.1011
