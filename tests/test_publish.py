"""The trained model in MLflow: logged by the training stages, registered by evaluate, loaded back.

The registry round trip reads the store of the session's tiny `dvc repro` (``pipeline_repo``) in a
subprocess, as a user would: the registered model's embeddings must equal the checkpoint's.
The lookup and fallback of ``publish.register_checkpoint`` run in-process on a copy of the
migrated empty store.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from retrieval import config, models, publish, tracking
from retrieval.cache import ImageCache
from tests.conftest import run

ROUND_TRIP = r"""
import json, sys
import mlflow, numpy as np, torch
from retrieval import cache, data, embed, models, paths, tracking

mlflow.set_tracking_uri(tracking.tracking_uri())
name = tracking.REGISTERED_MODEL
client = mlflow.MlflowClient()
latest = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
net, stored = models.load_model(paths.checkpoint("train_unfrozen"))
table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
images = cache.images_for(table["file"].tolist(), stored["image_size"], progress=False)
x = embed.model_inputs(images, np.arange(6), stored["image_size"], net.normalization)
with torch.inference_mode():
    expected = net(x).numpy()
loaded = mlflow.pytorch.load_model(f"models:/{name}/{latest.version}")
with torch.inference_mode():
    by_pytorch = loaded(x).numpy()
by_pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/latest").predict(x.numpy())
info = mlflow.models.get_model_info(f"models:/{name}/latest")
experiments = [e.experiment_id for e in client.search_experiments()]
frozen = mlflow.search_logged_models(experiments, filter_string="tags.stage = 'train_frozen'",
                                     output_format="list")
runs = {r.data.tags.get("stage", "pipeline"): r for r in client.search_runs(experiments)}
print(json.dumps({
    "pytorch": float(np.abs(by_pytorch - expected).max()),
    "pyfunc": float(np.abs(np.asarray(by_pyfunc) - expected).max()),
    "norms": np.linalg.norm(expected, axis=1).tolist(),
    "tags": latest.tags, "versions": len(client.search_model_versions(f"name='{name}'")),
    "inputs": info.signature.inputs.to_dict(), "outputs": info.signature.outputs.to_dict(),
    "frozen_models": len(frozen),
    "evaluate_artifacts": [a.path for a in client.list_artifacts(runs["evaluate"].info.run_id,
                                                                  "index")],
    "parent_tags": runs["pipeline"].data.tags,
}))
"""


@pytest.mark.e2e
def test_the_registered_model_embeds_like_the_checkpoint(pipeline_repo):
    result = run([sys.executable, "-c", ROUND_TRIP], cwd=pipeline_repo)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["pytorch"] < 1e-5 and found["pyfunc"] < 1e-5
    assert np.allclose(found["norms"], 1.0, atol=1e-5)  # L2-normalised embeddings out
    assert found["inputs"][0]["tensor-spec"]["shape"][0] == -1  # any batch size
    assert found["outputs"][0]["tensor-spec"]["shape"] == [-1, 16]
    head = run(["git", "rev-parse", "HEAD"], cwd=pipeline_repo).stdout.strip()
    scores = json.loads((pipeline_repo / "metrics" / "details" / "evaluate.json").read_text())
    tags = found["tags"]
    assert tags["git_commit"] == head
    assert float(tags["test_map"]) == pytest.approx(scores["unfrozen"]["map"], abs=1e-6)
    assert "dvc_experiment" in tags and len(tags["checkpoint_sha256"]) == 64
    # The version carries evaluate's decision threshold, as saved beside the checkpoint.
    saved = json.loads((pipeline_repo / "models/train_unfrozen/threshold.json").read_text())
    assert float(tags["decision_threshold"]) == saved["threshold"]
    assert found["frozen_models"] >= 1  # train_frozen logs its own model too
    assert {"index/gallery.faiss", "index/gallery.csv", "index/gallery.json"} <= set(
        found["evaluate_artifacts"])
    assert found["parent_tags"]["report"].endswith("report/report.html")
    assert "report/report.html" in found["parent_tags"]["mlflow.note.content"]


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_db_template):
    """An empty project folder with a migrated MLflow store, as the current directory."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db_template, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path


def _tiny_checkpoint(path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = config.ModelConfig(hidden_dim=32, embedding_dim=16)
    net = models.EmbeddingNet(cfg).eval()
    models.save_checkpoint(path, net, {"image_size": 48, "threshold": 0.7})
    return net


def test_evaluate_registers_the_logged_model_or_logs_one_when_the_store_has_none(project):
    import mlflow

    checkpoint = project / "best.pt"
    _tiny_checkpoint(checkpoint, seed=0)
    rng = np.random.default_rng(0)
    images = ImageCache(rng.integers(0, 256, (4, 3, 56, 56), dtype=np.uint8))
    rows = np.arange(4)
    with tracking.stage_run("evaluate", {"seed": 1}) as run:
        # The checkpoint came from elsewhere (a DVC remote): nothing logged it in this store.
        assert run.logged_model(publish.checkpoint_tags(checkpoint)) is None
        first = publish.register_checkpoint(run, checkpoint, "train_unfrozen", 0.25, images, rows)
        second = publish.register_checkpoint(run, checkpoint, "train_unfrozen", 0.5, images,
                                             rows, threshold=0.8125)
    assert (first, second) == ("1", "2")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        experiments = [e.experiment_id for e in mlflow.search_experiments()]
        logged = mlflow.search_logged_models(experiments, output_format="list")
        versions = mlflow.MlflowClient().search_model_versions(
            f"name='{tracking.REGISTERED_MODEL}'")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(logged) == 1  # the second registration found the first's model
    assert {v.source for v in versions} == {f"models:/{logged[0].model_id}"}
    assert sorted(v.tags["test_map"] for v in versions) == ["0.250000", "0.500000"]
    # evaluate's decision threshold on the version it registers (none given: no tag)
    assert sorted(v.tags.get("decision_threshold", "") for v in versions) == ["", "0.8125"]
    assert logged[0].tags["image_size"] == "48" and logged[0].tags["threshold"] == "0.7"
