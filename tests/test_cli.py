"""The `retrieval` command on a tiny model built here: compare, search, segment, and one-line
errors with exit code 2 for bad input."""

import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval import cli, models, search
from retrieval import gallery as gallery_files
from retrieval.config import ModelConfig
from tests.conftest import call_cli
from tests.test_segmentation import CLASSES, make_folder, prototypes_file, save_net

IMAGE_SIZE = 32
SHAPES = {"red_square": ((220, 30, 30), "rectangle"), "blue_disc": ((30, 60, 220), "ellipse"),
          "green_square": ((30, 200, 60), "rectangle")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny checkpoint, a few Pillow images and a gallery index of them."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = models.EmbeddingNet(ModelConfig(weights="none",
                                          backbone="cifar_resnet", cifar_n=1, hidden_dim=16,
                                          embedding_dim=8)).eval()
    models.save_checkpoint(root / "model.pt", net, {"threshold": 0.5, "classes": list(SHAPES),
                                                    "image_size": IMAGE_SIZE, "stage": "test"})
    files = {}
    for name, (colour, shape) in SHAPES.items():
        for i in range(2):
            image = Image.new("RGB", (48 + 8 * i, 40), (240, 240, 240))
            getattr(ImageDraw.Draw(image), shape)((8, 6, 36 + 4 * i, 32), fill=colour)
            files[f"{name}_{i}"] = root / f"{name}_{i}.png"
            image.save(files[f"{name}_{i}"])
    gallery = pd.DataFrame({"path": [f.name for f in files.values()],
                            "label": [k.rsplit("_", 1)[0] for k in files],
                            "file": [str(f) for f in files.values()]})
    loaded, checkpoint = cli.load_model(root / "model.pt", torch.device("cpu"))
    vectors = cli.embed(loaded, [cli.load_image(f) for f in files.values()], IMAGE_SIZE,
                        torch.device("cpu"))
    search.save_index(search.build_index(vectors), root / "gallery.faiss")
    gallery.to_csv(root / "gallery.csv", index=False)
    (root / "gallery.json").write_text(pd.Series(gallery_files.card(
        root / "model.pt", 8, len(gallery))).to_json())
    (root / "notes.png").write_text("not an image at all")
    (root / "broken.pt").write_bytes(b"\x00\x01 definitely not a checkpoint")
    return types.SimpleNamespace(root=root, model=root / "model.pt", files=files,
                                 index=root / "gallery.faiss", vectors=vectors)


call = call_cli


def test_compare_prints_distance_similarity_and_decision(workspace, capsys, tmp_path):
    a, b = workspace.files["red_square_0"], workspace.files["blue_disc_0"]
    figure = tmp_path / "pair.png"
    code, out, _ = call(["compare", a, b, "--model", workspace.model, "--output", figure],
                        capsys)
    assert code == 0
    distance = float(out.split("distance:")[1].split()[0])
    similarity = float(out.split("similarity:")[1].split()[0])
    expected = np.linalg.norm(workspace.vectors[0] - workspace.vectors[2])
    assert distance == pytest.approx(expected, abs=1e-3)
    assert similarity == pytest.approx(1 - distance**2 / 2, abs=1e-3)
    verdict = "same class" if distance <= 0.5 else "different classes"
    assert f"decision:   {verdict}" in out and "threshold 0.5000" in out
    assert Image.open(figure).size[0] > 300


def test_compare_an_image_with_itself_is_the_same_class(workspace, capsys, tmp_path):
    a = workspace.files["green_square_1"]
    code, out, _ = call(["compare", a, a, "--model", workspace.model, "--output",
                         tmp_path / "self.png"], capsys)
    assert code == 0 and "distance:   0.0000" in out and "decision:   same class" in out


def test_search_lists_the_nearest_gallery_images(workspace, capsys, tmp_path):
    query = workspace.files["blue_disc_1"]
    figure = tmp_path / "found.png"
    code, out, err = call(["search", query, "--k", 3, "--model", workspace.model, "--index",
                           workspace.index, "--output", figure], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "distance" in line]
    assert len(lines) == 3 and "blue_disc_1.png" in lines[0]  # itself, at distance 0
    assert float(lines[0].split("distance")[1].split()[0]) == pytest.approx(0, abs=1e-3)
    assert figure.is_file() and "warning" not in err


def test_search_clips_k_to_the_gallery(workspace, capsys, tmp_path):
    code, out, _ = call(["search", workspace.files["red_square_0"], "--k", 50, "--model",
                         workspace.model, "--index", workspace.index, "--output",
                         tmp_path / "all.png"], capsys)
    assert code == 0 and f"top {len(workspace.files)} of {len(workspace.files)}" in out


@pytest.mark.parametrize("case, message", [
    ("missing_image", "does not exist"),
    ("not_an_image", "is not an image"),
    ("missing_model", "does not exist"),
    ("broken_model", "refusing to load"),
    ("bad_k", "--k must be >= 1"),
    ("missing_index", "no gallery index"),
])
def test_bad_input_is_one_line_and_exit_code_2(workspace, capsys, tmp_path, case, message):
    good = workspace.files["red_square_0"]
    model, index, image, k = workspace.model, workspace.index, good, 3
    if case == "missing_image":
        image = tmp_path / "nope.jpg"
    elif case == "not_an_image":
        image = workspace.root / "notes.png"
    elif case == "missing_model":
        model = tmp_path / "nope.pt"
    elif case == "broken_model":
        model = workspace.root / "broken.pt"
    elif case == "bad_k":
        k = 0
    else:
        index = tmp_path / "nope.faiss"
    argv = ["search", image, "--k", k, "--model", model, "--index", index, "--output",
            tmp_path / "x.png"]
    if case in ("missing_image", "not_an_image", "missing_model", "broken_model"):
        argv = ["compare", good, image, "--model", model, "--output", tmp_path / "x.png"]
    code, out, err = call(argv, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error")
    assert not (tmp_path / "x.png").exists()


def test_search_refuses_an_index_of_another_dimension(workspace, capsys, tmp_path):
    search.save_index(search.build_index(np.eye(4, dtype=np.float32)), tmp_path / "g.faiss")
    pd.DataFrame({"path": list("abcd"), "label": list("abcd"), "file": list("abcd")}).to_csv(
        tmp_path / "g.csv", index=False)
    code, _, err = call(["search", workspace.files["red_square_0"], "--model", workspace.model,
                         "--index", tmp_path / "g.faiss"], capsys)
    assert code == 2 and "4-d vectors" in err and "8-d" in err


def test_search_warns_when_the_index_was_built_with_another_model(workspace, capsys,
                                                                  tmp_path):
    other = tmp_path / "other.pt"
    torch.manual_seed(1)  # same architecture, other weights
    net = models.EmbeddingNet(ModelConfig(weights="none",
                                          backbone="cifar_resnet", cifar_n=1, hidden_dim=16,
                                          embedding_dim=8))
    models.save_checkpoint(other, net, {"threshold": 0.5, "image_size": IMAGE_SIZE})
    code, _, err = call(["search", workspace.files["red_square_0"], "--model", other,
                         "--index", workspace.index, "--output", tmp_path / "w.png"], capsys)
    assert code == 0 and "warning" in err and "another model" in err


# --- retrieval segment (on the images of test_segmentation) ------------------------------------


@pytest.fixture
def folder(tmp_path):
    """Images with masks, an embedding model and its explainer file (class prototypes)."""
    torch.manual_seed(0)
    make_folder(tmp_path / "images", tmp_path / "masks", per_class=2)
    net = save_net(tmp_path / "model.pt")
    return tmp_path, prototypes_file(tmp_path, tmp_path / "model.pt", net)


def test_segment_writes_masks_and_an_iou_table(folder, capsys):
    tmp_path, prototypes = folder
    (tmp_path / "images" / "alpha" / "notes.txt").write_text("not an image")
    code, out, err = call(["segment", tmp_path / "images", "--out", tmp_path / "out",
                           "--masks", tmp_path / "masks", "--model", tmp_path / "model.pt",
                           "--prototypes", prototypes, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "skipped 1 file(s) that are not images: alpha/notes.txt" in err
    # The stored choices: the best method on val, its binarisation and refinement.
    assert "wrote 6 masks" in out and "(gradcam, top_percent:30, refined by grabcut:10/30)" in out
    # The sub-folders are the model's classes: its accuracy, from the nearest prototype.
    assert "classification accuracy" in out and "over 6 images in class folders" in out
    masks = sorted((tmp_path / "out").rglob("*.png"))
    assert len(masks) == 6
    with Image.open(masks[0]) as mask:
        assert mask.size == (52, 40) and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    table = pd.read_csv(tmp_path / "out" / "iou_table.csv")
    assert (table["mask_status"] == "ok").all() and table["iou"].between(0, 1).all()
    assert set(table["file"]) == {f"{c}/{i}.png" for c in CLASSES for i in range(2)}


def test_segment_without_masks_and_with_a_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    make_folder(tmp_path / "images", per_class=1)
    save_net(tmp_path / "ce.pt", num_classes=3)
    code, out, err = call(["segment", tmp_path / "images", "--out", tmp_path / "out",
                           "--model", tmp_path / "ce.pt", "--method", "guided_backprop",
                           "--binarize", "fixed:0.5"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3
    assert not (tmp_path / "out" / "iou_table.csv").exists()
    assert "guided_backprop, fixed:0.5, refined by none" in out
    predicted = pd.Series([line for line in out.splitlines() if "accuracy" in line])
    assert len(predicted) == 1 and "over 3 images in class folders" in predicted[0]
    # The same images outside class folders: no accuracy.
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in (tmp_path / "images").rglob("*.png"):
        (flat / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    code, out, err = call(["segment", flat, "--out", tmp_path / "out2", "--model",
                           tmp_path / "ce.pt", "--refine", "grabcut:10/30+components"], capsys)
    assert code == 0, err
    assert "refined by grabcut:10/30+components" in out and "accuracy" not in out
    # A classifier checkpoint without class names still segments; it predicts no class.
    from tests.test_segmentation import tiny_net
    models.save_checkpoint(tmp_path / "nameless.pt", tiny_net(3), {"image_size": 32})
    code, out, err = call(["segment", tmp_path / "images", "--out", tmp_path / "out3",
                           "--model", tmp_path / "nameless.pt"], capsys)
    assert code == 0, err
    assert "wrote 3 masks" in out and "accuracy" not in out


def fails_with_one_line(argv, capsys, match):
    code, _, err = call(["segment", *argv], capsys)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_segment_errors(folder, capsys):
    tmp_path, prototypes = folder
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    common = ["--model", str(tmp_path / "model.pt"), "--prototypes", str(prototypes)]
    fails_with_one_line([str(tmp_path / "nowhere"), "--out", out, *common], capsys,
                        "does not exist")
    fails_with_one_line([images, "--out", out, "--masks", str(tmp_path / "nomasks"), *common],
                        capsys, "masks folder")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    (junk / "b.txt").write_text("text")
    fails_with_one_line([str(junk), "--out", out, *common], capsys, "contains no images")
    fails_with_one_line([images, "--out", str(tmp_path / "images" / "masks"), *common], capsys,
                        "lies inside")
    # Model files of another kind: a torchvision state_dict, a text file.
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "state.pt")
    fails_with_one_line([images, "--out", out, "--model", str(tmp_path / "state.pt")], capsys,
                        "not a checkpoint written by this project")
    (tmp_path / "text.pt").write_text("hello")
    fails_with_one_line([images, "--out", out, "--model", str(tmp_path / "text.pt")], capsys,
                        "refusing to load")
    # An embedding model needs prototypes, and those of its own checkpoint.
    fails_with_one_line([images, "--out", out, "--model", str(tmp_path / "model.pt")], capsys,
                        "needs class prototypes")
    save_net(tmp_path / "other.pt")
    fails_with_one_line([images, "--out", out, "--model", str(tmp_path / "other.pt"),
                         "--prototypes", str(prototypes)], capsys, "another model file")
    fails_with_one_line([images, "--out", out, *common, "--binarize", "top_percent:200"],
                        capsys, "percentage")
    fails_with_one_line([images, "--out", out, *common, "--refine", "grabcut:90/20"],
                        capsys, "--refine")


def test_segment_and_the_stage_read_one_binarisation_grammar(folder, capsys):
    """What params.yaml accepts, --binarize accepts, and the other way round."""
    from retrieval import cam
    from retrieval.config import ParamsError

    tmp_path, prototypes = folder
    argv = [tmp_path / "images", "--out", tmp_path / "out", "--model", tmp_path / "model.pt",
            "--prototypes", prototypes, "--device", "cpu", "--binarize"]
    for text in ("fixed:.25", "top_percent:12.5", "otsu:", "fixed:1.5", "top_percent:1e1"):
        try:
            cam.check_params(["gradcam"], [text])  # the stage's check
            accepted = True
        except ParamsError:
            accepted = False
        code, _, _ = call(["segment", *argv, text], capsys)
        assert (code == 0) == accepted, text


def test_segment_method_choices_are_the_saliency_registry():
    from retrieval import cam

    actions = {a.dest: a for a in cli.segment_parser()._actions}
    assert tuple(actions["method"].choices) == tuple(cam.SALIENCY_METHODS)


def test_the_command_list_starts_without_torch():
    # Only `retrieval segment` builds its parser from cam's registry (which imports torch).
    code = ("import sys; from retrieval import cli; cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_python_dash_m_retrieval_shows_the_commands():
    result = subprocess.run([sys.executable, "-m", "retrieval", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("compare", "search", "segment"):
        assert command in result.stdout
