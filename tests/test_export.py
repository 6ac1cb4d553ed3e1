"""The exported TorchScript and ONNX files compute the checkpoint's embeddings, at any batch size,
and preprocessing.json states the preprocessing the pipeline applies."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch

from retrieval import config, export, models, outputs, transforms
from tests.conftest import REPO
from tests.reliability.conftest import assert_one_line_error, run_script

IMAGE_SIZE = 48
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny untrained checkpoint (pretrained trunk, head 32 -> 16) exported to both formats."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = models.EmbeddingNet(config.ModelConfig(hidden_dim=32, embedding_dim=16))
    checkpoint_path = folder / "best.pt"
    models.save_checkpoint(checkpoint_path, net.eval(),
                           {"image_size": IMAGE_SIZE, "threshold": 0.75, "stage": "test"})
    net, checkpoint = models.load_model(checkpoint_path)
    files = export.export_model(net, checkpoint, checkpoint_path, IMAGE_SIZE, folder / "out",
                                opset=18)
    return net, checkpoint, checkpoint_path, files


def pixels(batch: int, seed: int) -> torch.Tensor:
    """Normalised model inputs from random uint8 images (the full range of valid inputs)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator,
                           dtype=torch.uint8)
    return transforms.normalize(images, transforms.NORMALIZATIONS["tf_lite"])


@pytest.mark.parametrize("batch", [1, 5])
def test_both_exports_match_pytorch_at_any_batch_size(exported, batch):
    net, _, _, files = exported
    images = pixels(batch, seed=batch)
    with torch.inference_mode():
        reference = net(images).numpy()
    found = {"onnx": export.embed_onnx(export.onnx_session(files["onnx"]), images),
             "torchscript": export.embed_torch(export.load_torchscript(
                 files["torchscript"], export.recorded_sha256(files["torchscript"].parent)),
                 images)}
    for name, embeddings in found.items():
        assert embeddings.shape == (batch, 16), name
        difference = np.abs(embeddings - reference).max()
        assert difference <= TOLERANCE[name], (name, difference)
    np.testing.assert_allclose(np.linalg.norm(found["onnx"], axis=1), 1.0, atol=1e-5)


def test_preprocessing_json_states_what_the_pipeline_applies(exported):
    net, checkpoint, checkpoint_path, files = exported
    card = json.loads(files["preprocessing"].read_text())
    assert card["image_size"] == checkpoint["image_size"] == IMAGE_SIZE
    assert card["resize_size"] == transforms.cache_size(IMAGE_SIZE) == 55
    assert card["mean"] == list(net.normalization.mean)  # exactly: not rounded
    assert card["std"] == list(net.normalization.std)
    assert card["normalization"] == "tf_lite"
    assert (card["layout"], card["channel_order"], card["dtype"]) == ("NCHW", "RGB", "float32")
    assert card["output_dim"] == 16 and card["normalised"] is True
    assert card["threshold"] == 0.75
    assert card["checkpoint_sha256"] == outputs.file_digest(checkpoint_path)
    assert card["files"] == {"onnx": files["onnx"].name,
                             "torchscript": files["torchscript"].name}
    # The stated range is what the pipeline's normalisation makes of black and white pixels.
    extremes = transforms.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
                                    .expand(2, 3, 1, 1), net.normalization)
    np.testing.assert_allclose(card["value_range"]["min"], extremes[0].flatten(), atol=1e-6)
    np.testing.assert_allclose(card["value_range"]["max"], extremes[1].flatten(), atol=1e-6)


def test_max_differences_measures_each_file_and_tolerances_refuse_in_one_line(exported):
    net, _, _, files = exported
    differences = export.max_differences(net, files, pixels(3, seed=7),
                                         export.recorded_sha256(files["onnx"].parent))
    assert set(differences) == {"onnx", "torchscript"}
    assert all(0 <= differences[name] <= TOLERANCE[name] for name in differences)
    export.check_tolerances(differences, TOLERANCE)
    with pytest.raises(export.ExportMismatch) as error:
        export.check_tolerances({"onnx": 3e-6, "torchscript": 2e-5}, TOLERANCE,
                                {"torchscript": "export.torchscript_tolerance"})
    message = str(error.value)
    assert "torchscript export differs from PyTorch by 2e-05" in message
    assert "export.torchscript_tolerance" in message and "\n" not in message
    with pytest.raises(export.ExportMismatch, match="onnx export"):
        export.check_tolerances({"onnx": float("nan")}, TOLERANCE)


def test_only_the_torchscript_bytes_that_were_exported_are_loaded(exported, tmp_path):
    """A TorchScript archive runs code when loaded: a file whose bytes are not the ones
    recorded at export is refused before torch.jit.load sees it."""
    _, _, _, files = exported
    recorded = export.recorded_sha256(files["torchscript"].parent)
    assert recorded == outputs.file_digest(files["torchscript"])
    swapped = tmp_path / export.TORCHSCRIPT_FILE
    swapped.write_bytes(files["torchscript"].read_bytes() + b"\0")
    with pytest.raises(outputs.UserError, match=f"refusing to load {swapped}"):
        export.load_torchscript(swapped, recorded)
    with pytest.raises(outputs.UserError, match="does not record"):
        export.recorded_sha256(tmp_path)


def test_the_stage_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    result = run_script(REPO / "stages" / "export.py", cwd=tmp_path)
    assert_one_line_error(result, "models/train_unfrozen/best.pt", "does not exist")
    assert not (tmp_path / "models").exists()


@pytest.mark.e2e
def test_the_pipeline_exports_the_fine_tuned_model_and_logs_it(pipeline_repo):
    folder = pipeline_repo / "models" / "export"
    card = json.loads((folder / export.PREPROCESSING_FILE).read_text())
    checkpoint = pipeline_repo / "models" / "train_unfrozen" / "best.pt"
    assert card["checkpoint_sha256"] == outputs.file_digest(checkpoint)
    metrics = json.loads((pipeline_repo / "metrics" / "details" / "export.json").read_text())
    assert metrics["verify_images"] >= 1
    for name, file in export.FORMATS.items():
        assert metrics[f"{name}_max_abs_diff"] <= TOLERANCE[name]
        assert metrics[f"{name}_bytes"] == (folder / file).stat().st_size > 1_000_000
    # The stage's MLflow run holds the same files as artifacts.
    db = sqlite3.connect(pipeline_repo / "mlruns" / "mlflow.db")
    (uri,) = db.execute("select r.artifact_uri from runs r join tags t on r.run_uuid = "
                        "t.run_uuid where t.key = 'stage' and t.value = 'export'").fetchone()
    logged = pipeline_repo / "mlruns" / uri.split("/mlruns/", 1)[1] / "export"
    assert sorted(p.name for p in logged.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert (logged / export.ONNX_FILE).read_bytes() == (folder / export.ONNX_FILE).read_bytes()
