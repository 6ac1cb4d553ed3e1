"""One decision threshold per checkpoint: evaluate's, saved beside it with its SHA-256, else the
checkpoint's own (retrieval.threshold), as `retrieval compare`, `retrieval index` and the export
use it. The agreement of compare, the search page and the report is in test_serve.py."""

import json
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

from retrieval import compared, export, models, outputs, paths
from retrieval import threshold as thresholds
from retrieval.config import ModelConfig
from retrieval.outputs import UserError
from tests.conftest import call_cli

IMAGE_SIZE = 32
EVALUATE_THRESHOLD = 1.234567891234  # stored at full precision
CHECKPOINT_THRESHOLD = 0.5


def test_evaluate_saves_the_threshold_of_each_trained_checkpoint_beside_it():
    assert thresholds.saved_models() == {"frozen": "train_frozen", "unfrozen": "train_unfrozen"}
    assert paths.threshold("train_unfrozen") == (
        paths.checkpoint("train_unfrozen").parent / "threshold.json")
    assert thresholds.beside(paths.checkpoint("train_frozen")) == paths.threshold("train_frozen")
    twice = (*compared.COMPARED_MODELS,
             compared.ComparedModel("other", "train_unfrozen", "model", "other"))
    with pytest.raises(ValueError, match="one checkpoint"):
        thresholds.saved_models(twice)


def test_resolve_takes_evaluates_threshold_only_for_the_bytes_it_was_chosen_for(tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights of the scored model")
    own = {"threshold": CHECKPOINT_THRESHOLD}

    found = thresholds.resolve(checkpoint, own)
    assert (found.value, found.origin) == (CHECKPOINT_THRESHOLD, thresholds.CHECKPOINT)
    assert "checkpoint's own" in found.source and "does not exist" in found.source

    thresholds.save(thresholds.card(EVALUATE_THRESHOLD, checkpoint, "unfrozen", 2000,
                                    "accuracy"), thresholds.beside(checkpoint))
    found = thresholds.resolve(checkpoint, own)
    assert (found.value, found.origin) == (EVALUATE_THRESHOLD, thresholds.EVALUATE)
    assert "2000 val pairs" in found.source and str(tmp_path / "threshold.json") in found.source
    assert found.same(EVALUATE_THRESHOLD) and not found.same(EVALUATE_THRESHOLD + 1e-9)
    assert thresholds.of_evaluate(checkpoint) == found

    checkpoint.write_bytes(b"weights retrained since")
    found = thresholds.resolve(checkpoint, own)
    assert (found.value, found.origin) == (CHECKPOINT_THRESHOLD, thresholds.CHECKPOINT)
    assert "another checkpoint" in found.source
    assert thresholds.of_evaluate(checkpoint).value is None

    nothing = thresholds.resolve(checkpoint, {})
    assert (nothing.value, nothing.origin) == (None, thresholds.NONE)
    assert nothing.same(0.1) is None
    with pytest.raises(UserError, match="no decision threshold"):
        thresholds.required(nothing, checkpoint)
    assert thresholds.of_evaluate(tmp_path / "gone.pt").source.endswith("does not exist")


def test_a_damaged_threshold_file_is_one_line(tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    thresholds.beside(checkpoint).write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(outputs.DamagedOutputError,
                       match="threshold.json cannot be read .*no 'model' key"):
        thresholds.resolve(checkpoint, {"threshold": 0.5})


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny checkpoint with evaluate's threshold beside it, a byte-identical copy elsewhere
    without one, and two images."""
    root = tmp_path_factory.mktemp("threshold")
    torch.manual_seed(0)
    net = models.EmbeddingNet(ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1,
                                          hidden_dim=16, embedding_dim=8)).eval()
    model = root / "scored" / "best.pt"
    model.parent.mkdir()
    models.save_checkpoint(model, net, {"threshold": CHECKPOINT_THRESHOLD, "stage": "test",
                                        "image_size": IMAGE_SIZE})
    thresholds.save(thresholds.card(EVALUATE_THRESHOLD, model, "unfrozen", 2000, "accuracy"),
                    thresholds.beside(model))
    copy = root / "copied" / "best.pt"
    copy.parent.mkdir()
    shutil.copyfile(model, copy)
    images = root / "images"
    shapes = (((220, 30, 30), "rectangle"), ((30, 60, 220), "ellipse"))
    for i, (colour, shape) in enumerate(shapes):
        image = Image.new("RGB", (48, 40), (240, 240, 240))
        getattr(ImageDraw.Draw(image), shape)((8, 6, 36, 32), fill=colour)
        (images / f"c{i}").mkdir(parents=True)
        image.save(images / f"c{i}" / f"{i}.png")
    return root, model, copy, sorted(images.rglob("*.png"))


def test_compare_says_which_threshold_and_falls_back_for_another_checkpoint(scored, capsys):
    root, model, copy, (a, b) = scored
    code, out, _ = call_cli(["compare", a, b, "--model", model, "--output",
                             root / "pair.png"], capsys)
    assert code == 0
    assert f"threshold {EVALUATE_THRESHOLD:.4f})" in out
    assert "threshold:  evaluate's, chosen on 2000 val pairs (accuracy)" in out
    # The same weights elsewhere, without evaluate's file beside them: the checkpoint's own.
    code, out, _ = call_cli(["compare", a, b, "--model", copy, "--output", root / "pair.png"],
                            capsys)
    assert code == 0
    assert f"threshold {CHECKPOINT_THRESHOLD:.4f})" in out
    assert "threshold:  the checkpoint's own" in out and "not evaluate's" in out


def test_index_card_and_export_record_the_same_threshold(scored, capsys):
    root, model, copy, _ = scored
    code, _, err = call_cli(["index", root / "images", "--out", root / "g.faiss", "--model",
                             model], capsys)
    assert code == 0, err
    assert json.loads((root / "g.json").read_text())["threshold"] == pytest.approx(
        EVALUATE_THRESHOLD, abs=1e-6)  # the card is metrics JSON: 6 decimals
    net, checkpoint = models.load_model(model)
    card = export.preprocessing_card(net, checkpoint, model, IMAGE_SIZE, opset=18)
    assert card["threshold"] == EVALUATE_THRESHOLD
    assert card["threshold_source"].startswith("evaluate's")
    card = export.preprocessing_card(net, checkpoint, copy, IMAGE_SIZE, opset=18)
    assert card["threshold"] == CHECKPOINT_THRESHOLD
    assert card["threshold_source"].startswith("the checkpoint's own")


def test_the_report_states_the_threshold_or_why_compare_would_not_find_it(tmp_path):
    from retrieval import report
    from retrieval.report import tables

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    thresholds.save(thresholds.card(0.8, checkpoint, "unfrozen", 2000, "accuracy"),
                    thresholds.beside(checkpoint))

    def blocks(reported: float) -> list:
        inputs = report.Inputs(metrics={"evaluate": {"unfrozen": {"threshold": reported}}},
                               threshold=thresholds.of_evaluate(checkpoint))
        return tables.decision_threshold(inputs)

    (text,) = blocks(0.8)
    assert isinstance(text, report.Text) and "distance <= 0.8000 is" in text.text
    assert "`retrieval compare`" in text.text and "evaluate's, chosen on 2000" in text.text
    _, stale = blocks(0.9)  # evaluate.json of another evaluate run
    assert isinstance(stale, report.Missing) and "0.9000, not 0.8000" in stale.text
    checkpoint.write_bytes(b"weights retrained since")
    (missing,) = blocks(0.8)
    assert isinstance(missing, report.Missing) and "another checkpoint" in missing.text
    assert tables.decision_threshold(report.Inputs()) == []  # not looked up
