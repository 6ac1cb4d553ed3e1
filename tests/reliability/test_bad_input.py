"""Bad input (issue #8): messy image folders, impossible dataset shapes, bad params, bad paths.

Each must end with a one-line error naming the file or parameter and what to do, a non-zero exit
and no outputs written; or, for individual bad images, their exclusion with a count and a list in
metrics/details/prepare.json while the run goes on.

Already covered elsewhere, not repeated here: decoding and indexing every odd image kind
(truncated, empty, text as .jpg, no extension, grayscale, CMYK, palette, RGBA, 16-bit, 1x1, EXIF
rotation, unicode names, hidden files, nested folders, symlinks and loops) and mask pairing in
tests/test_data.py; params typos/types/ranges in-process in tests/test_config.py; missing and
wrong-architecture weights files and refused pickles in tests/test_models.py; missing images,
non-images, missing or broken models and missing indexes for compare/search in tests/test_cli.py.
This module adds what those do not: the same inputs through the real stage scripts (exit code,
stderr, nothing written), the decompression-bomb limit, empty and one-image classes, splits that
cannot supply validation/test pairs, and models of another architecture for the commands.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from retrieval import models, sampling
from retrieval.config import ModelConfig, ParamsError, params_from_dict
from retrieval.data import (
    DatasetError,
    check_retrieval_possible,
    class_disjoint_split,
    index_folder,
    stratified_split,
)
from retrieval.outputs import UserError
from tests.conftest import call_cli, make_repo, run
from tests.reliability.conftest import assert_one_line_error

EXIF_ORIENTATION = 0x0112
IGNORED = (".git", ".dvc", "mlruns", ".cache")  # state, not stage outputs


# --- building bad images ------------------------------------------------------------------------

def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels with roughly ImageNet's channel statistics (verify_normalization passes)."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal((124, 116, 104), 58, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A few-byte PNG whose header claims width x height (what a decompression bomb does)."""
    buffer = io.BytesIO()
    Image.new("1", (8, 8)).save(buffer, "PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # IHDR type + data
    path.write_bytes(bytes(raw))


def messy_dataset(base: Path) -> tuple[Path, Path]:
    """Every image oddity of the issue in one folder dataset, with a partial masks folder."""
    root, masks = base / "my photos", base / "masks"
    cats, dogs, birds = root / "cats", root / "chiens et café ü", root / "birds"
    for folder in (cats / "sub", dogs, birds, root / "single", root / "empty_class",
                   masks / "cats"):
        folder.mkdir(parents=True)
    for i in range(6):
        noise(40 + i, 36, seed=i).save(cats / f"good {i}.jpg")
    noise(64, 48, seed=10).save(base / "whole.jpg")
    whole = (base / "whole.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "notes.jpg").write_text("not a picture\n")
    noise(40, 30, seed=11).save(cats / "tmp", "JPEG")  # no extension: kept
    Image.new("L", (32, 24), 77).save(cats / "gray.png")
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(cats / "cmyk.jpg")
    palette = Image.new("P", (32, 24), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(cats / "palette.png")
    Image.new("RGBA", (32, 24), (0, 0, 255, 128)).save(cats / "rgba.png")
    Image.fromarray(np.full((24, 32), 3000, dtype=np.uint16)).save(cats / "deep16.png")
    Image.new("RGB", (1, 1)).save(cats / "dot.png")
    png_claiming_size(cats / "bomb.png", 20_000, 20_000)  # 400 MP: above 2x the limit
    png_claiming_size(cats / "huge.png", 10_000, 10_000)  # 100 MP: above the limit
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    noise(60, 40, seed=12).save(cats / "rotated.jpg", exif=exif)
    (cats / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    noise(30, 30, seed=13).save(cats / "sub" / "nested.jpg")
    noise(30, 30, seed=14).save(base / "outside.jpg")
    (cats / "linked.jpg").symlink_to(base / "outside.jpg")
    (cats / "sub" / "loop").symlink_to("../..", target_is_directory=True)
    for i in range(5):
        noise(36, 36, seed=20 + i).save(dogs / f"photo ü {i}.jpg")
    for i in range(4):
        noise(36, 36, seed=30 + i).save(birds / f"b{i}.png")
    noise(36, 36, seed=40).save(root / "single" / "only.jpg")
    (root / "empty_class" / ".DS_Store").write_bytes(b"\x00")
    (root / "empty_class" / "readme.txt").write_text("no images here\n")
    Image.new("L", (40, 36), 255).save(masks / "cats" / "good 0.png")  # matches
    Image.new("L", (7, 7), 255).save(masks / "cats" / "good 1.png")  # wrong size
    return root, masks


BAD_FILES = {  # file -> the start of the reason prepare lists it with
    "cats/truncated.jpg": "cannot decode", "cats/empty.jpg": "empty file",
    "cats/notes.jpg": "not an image", "cats/dot.png": "too small (1x1 px)",
    "cats/bomb.png": "too many pixels (decompression-bomb limit)",
    "cats/huge.png": "too many pixels (above Image.MAX_IMAGE_PIXELS)",
    "empty_class/readme.txt": "not an image",
    "empty_class/": "class folder without decodable images",
    # A mask, not an image: listed, and its image is kept without it.
    "cats/good 1.png": "mask of cats/good 1.jpg: 7x7 px, the image is 41x36 px",
}


# --- a tiny repository to run the stage scripts in ------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_db_template) -> Path:
    return make_repo(tmp_path_factory.mktemp("bad_input"), mlflow_db_template)


def deep_update(base: dict, changes: dict) -> dict:
    """Like tests.conftest.merge, but new keys (typos) are added too."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = (deep_update(base[key], value)
                       if isinstance(value, dict) and isinstance(base.get(key), dict) else value)
    return merged


def with_params(repo: Path, changes: dict) -> None:
    """Reset the repository's outputs and params.yaml, then apply `changes`."""
    run("git checkout -q -- params.yaml && rm -rf data/prepared data/split.csv metrics plots",
        cwd=repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(params, changes)))


def outputs_of(repo: Path) -> set[str]:
    return {p.relative_to(repo).as_posix() for p in repo.rglob("*")
            if p.is_file() and p.relative_to(repo).parts[0] not in IGNORED}


def stage(repo: Path, name: str):
    return run([sys.executable, f"stages/{name}.py"], cwd=repo, check=False)


# --- individual bad images: excluded, counted, listed; the run goes on ----------------------------

def test_decompression_bombs_are_excluded_by_header_without_decoding(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    png_claiming_size(root / "a" / "bomb.png", 20_000, 20_000)
    png_claiming_size(root / "a" / "huge.png", 10_000, 10_000)
    noise(20, 20, 0).save(root / "a" / "ok.jpg")
    noise(20, 20, 1).save(root / "b" / "ok.jpg")
    result = index_folder(root)
    assert set(result.index["path"]) == {"a/ok.jpg", "b/ok.jpg"}
    reasons = dict(zip(result.excluded["path"], result.excluded["reason"], strict=True))
    assert reasons == {"a/bomb.png": BAD_FILES["cats/bomb.png"],
                       "a/huge.png": BAD_FILES["cats/huge.png"]}


def test_a_class_folder_without_images_is_listed_not_silently_dropped(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b", "nothing"):
        (root / name).mkdir(parents=True)
    noise(20, 20, 0).save(root / "a" / "x.jpg")
    noise(20, 20, 1).save(root / "b" / "y.jpg")
    (root / "nothing" / "broken.jpg").write_bytes(b"")
    result = index_folder(root)
    assert set(result.index["label"]) == {"a", "b"}
    assert result.excluded.values.tolist() == [
        ["nothing/broken.jpg", "empty file"],
        ["nothing/", "class folder without decodable images"]]


@pytest.mark.e2e
def test_prepare_split_and_decoding_survive_a_messy_folder(repo, tmp_path):
    root, masks = messy_dataset(tmp_path)
    with_params(repo, {"data": {"source": "folder", "root": str(root), "masks": str(masks)}})
    for name in ("prepare", "split", "verify_normalization"):
        result = stage(repo, name)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    metrics = json.loads((repo / "metrics/details/prepare.json").read_text())
    assert metrics["excluded"] == len(metrics["excluded_files"]) == len(BAD_FILES)
    assert set(metrics["excluded_files"]) == set(BAD_FILES)
    excluded = pd.read_csv(repo / "data/prepared/excluded.csv", keep_default_na=False)
    for path, reason in zip(excluded["path"], excluded["reason"], strict=True):
        assert reason.startswith(BAD_FILES[path]), (path, reason)
    index = pd.read_csv(repo / "data/prepared/index.csv", keep_default_na=False)
    kept = set(index["path"])
    assert {"cats/tmp", "cats/gray.png", "cats/cmyk.jpg", "cats/palette.png", "cats/rgba.png",
            "cats/deep16.png", "cats/rotated.jpg", "cats/sub/nested.jpg", "cats/linked.jpg",
            "chiens et café ü/photo ü 0.jpg", "single/only.jpg"} <= kept
    assert not any(".DS_Store" in p or "loop" in p for p in kept)
    assert metrics["classes"] == 4 and metrics["images"] == len(kept) == 15 + 5 + 4 + 1
    assert (metrics["images_with_mask"], metrics["mismatched_masks"]) == (1, 1)
    assert metrics["missing_masks"] == metrics["images"] - 2
    split = json.loads((repo / "metrics/details/split.json").read_text())
    assert split["small_class_names"] == ["single"]  # 1 image: training data only
    table = pd.read_csv(repo / "data/split.csv", keep_default_na=False)
    assert table.loc[table["label"] == "single", "split"].tolist() == ["train"]
    norm = json.loads((repo / "metrics/details/verify_normalization.json").read_text())
    assert norm["images"] > 0  # every kept file decoded in the real cache path


# --- dataset shapes that cannot work: one line, exit 2, nothing written ---------------------------

def two_classes(root: Path, sizes=(5, 5)) -> Path:
    for k, (label, n) in enumerate(zip(("a", "b"), sizes, strict=False)):
        (root / label).mkdir(parents=True)
        for i in range(n):  # distinct pixels: one image under both labels would be excluded
            noise(20, 20, 100 * k + i).save(root / label / f"{i}.jpg")
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["missing_root", "empty_root", "missing_masks"])
def test_prepare_refuses_an_unusable_dataset_folder(repo, tmp_path, case):
    root, masks = tmp_path / "images", ""
    if case == "empty_root":
        root.mkdir()
    elif case == "missing_masks":
        two_classes(root)
        masks = str(tmp_path / "no_masks_here")
    with_params(repo, {"data": {"source": "folder", "root": str(root), "masks": masks}})
    before = outputs_of(repo)
    result = stage(repo, "prepare")
    named = masks or str(root)
    assert_one_line_error(result, named, "params.yaml" if case != "empty_root" else "class")
    assert outputs_of(repo) == before


@pytest.mark.e2e
def test_a_single_class_stops_at_the_split_with_a_clear_error(repo, tmp_path):
    root = two_classes(tmp_path / "images", sizes=(8,))  # only "a"
    with_params(repo, {"data": {"source": "folder", "root": str(root)}})
    assert stage(repo, "prepare").returncode == 0
    before = outputs_of(repo)
    assert_one_line_error(stage(repo, "split"), "1 class", "at least 2 classes")
    assert outputs_of(repo) == before  # no data/split.csv, no metrics/details/split.json


def test_splits_that_cannot_supply_validation_or_test_pairs_are_refused():
    """'More pairs than possible': the rule. Pairs are drawn with replacement (documented in
    sampling.sample_pairs), so any count can be drawn from a split that has at least one
    same-class and one different-class pair; a split with none of one kind cannot supply any.
    That is refused at the split stage, before training, naming the split and the fix."""
    four_each = pd.DataFrame([(f"{c}/{i}.jpg", c, "") for c in "abcd" for i in range(4)],
                             columns=["path", "label", "mask_path"])
    table, _ = stratified_split(four_each, (0.7, 0.15, 0.15), seed=0)  # 2 / 1 / 1 a class
    with pytest.raises(DatasetError, match=r"the val split has 4 classes of 1 image each.*"
                                           r"raise split\.val"):
        check_retrieval_possible(table)
    # Class-disjoint with 4 classes: 1 class in val, so no different-class val pairs.
    four = pd.DataFrame([(f"{c}/{i}.jpg", c, "") for c in "abcd" for i in range(6)],
                        columns=["path", "label", "mask_path"])
    with pytest.raises(DatasetError, match=r"the val split has 1 class\(es\)"):
        check_retrieval_possible(class_disjoint_split(four, (0.7, 0.15, 0.15), seed=0))


def test_batches_that_need_more_classes_than_exist_are_a_user_error():
    labels = np.repeat(np.arange(4), 10)  # 4 classes; 32 / 4 = 8 classes per batch wanted
    with pytest.raises(UserError, match=r"8 classes per batch, but only 4 .*train\.batch_size"):
        sampling.class_balanced_batches(labels, 32, 4, seed=0, epoch=1)


# --- params: validated before any work starts ----------------------------------------------------

@pytest.mark.parametrize(("raw", "message"), [  # cases tests/test_config.py does not have
    ({"train": {"marign": 1.0}}, "unknown key 'train.marign'"),
    ({"train": {"batch_size": "32"}}, "train.batch_size must be an integer, found '32'"),
    ({"train": {"batch_size": 0}}, "train.batch_size (0) must be in [2, 4096]"),
    ({"train": {"batch_size": -8}}, "train.batch_size (-8) must be in [2, 4096]"),
    ({"train": {"margin": 0}}, "train.margin (0.0) must be > 0"),
    ({"train": {"margin": -0.5}}, "train.margin (-0.5) must be > 0"),
    ({"model": {"pooling": "sum"}}, "model.pooling is 'sum', expected one of"),
    ({"train_frozen": {"epochs": 0}}, "train_frozen.epochs must be >= 1"),
    ({"model": {"backbone": "cifar_resnet", "weights": "imagenet"}},
     "model.weights ('imagenet') must be none for cifar_resnet"),
    ({"model": {"backbone": "resnet18", "weights": "weights/nowhere.pt"}},
     "model.weights ('weights/nowhere.pt') is neither imagenet, none nor an existing file"),
])
def test_more_bad_params_are_rejected_by_name(raw, message):
    with pytest.raises(ParamsError) as error:
        params_from_dict(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.e2e
@pytest.mark.parametrize(("changes", "named"), [
    ({"train": {"marign": 1.0}}, "unknown key 'train.marign'"),
    ({"train": {"batch_size": "32"}}, "train.batch_size must be an integer"),
    ({"lr": -0.001}, "lr (-0.001) must be in (0, 10): change lr in params.yaml"),
    ({"split": {"train": 0.8}}, "split.train/val/test sum to 1.1"),
    ({"model": {"backbone": "resnet18", "weights": "weights/nowhere.pt"}}, "model.weights"),
])
def test_a_bad_param_stops_the_first_stage_before_it_writes_anything(repo, changes, named):
    with_params(repo, changes)
    before = outputs_of(repo)
    assert_one_line_error(stage(repo, "prepare"), named)
    assert outputs_of(repo) == before


@pytest.mark.e2e
def test_dvc_repro_with_a_typo_runs_no_stage_to_completion(repo):
    with_params(repo, {"model": {"poolin": "gem"}})
    before = outputs_of(repo)
    result = run(["dvc", "repro"], cwd=repo, check=False)
    assert result.returncode != 0
    assert "unknown key 'model.poolin'" in result.stderr + result.stdout
    assert outputs_of(repo) == before  # no dvc.lock, no data/prepared, no metrics


def test_imagenet_weights_that_cannot_be_downloaded_are_a_clear_error(monkeypatch, tmp_path):
    """No network is used: the download itself is replaced by a failing one, and TORCH_HOME
    points at an empty folder so no cached copy can stand in."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as error:
        models.EmbeddingNet(ModelConfig(backbone="resnet18", weights="imagenet"))
    message = str(error.value)
    assert "ImageNet weights for resnet18 could not be loaded: URLError" in message
    assert "model.weights" in message and "\n" not in message


def test_a_weights_file_holding_no_state_dict_is_a_clear_error(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match=r"holds a Tensor, not a state_dict of resnet18 weights"):
        models.EmbeddingNet(ModelConfig(backbone="resnet18", weights=str(tmp_path / "tensor.pt")))


def test_a_relative_weights_path_starts_at_the_project_root(monkeypatch, tmp_path):
    """Like data.root, so `dvc exp run --queue` (stages run in a temporary copy) finds it."""
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    params_from_dict({"model": {"backbone": "resnet18", "weights": "r18.pt"}})
    models.EmbeddingNet(ModelConfig(backbone="resnet18", weights="r18.pt"))


# --- the commands: compare, search, segment ------------------------------------------------------

def has_command(name: str) -> bool:
    try:
        from retrieval import cli
    except ImportError:
        return False
    commands = [a for a in cli.build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)]
    return any(name in a.choices for a in commands)


def needs(name: str):
    return pytest.mark.skipif(not has_command(name),
                              reason=f"`retrieval {name}` does not exist in this version yet")


call = call_cli


TINY = ModelConfig(weights="none",
                   backbone="cifar_resnet", cifar_n=1, hidden_dim=8, embedding_dim=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two images, a model of this project, and model files of other architectures."""
    root = tmp_path_factory.mktemp("commands")
    noise(40, 40, 0).save(root / "a.png")
    noise(40, 40, 1).save(root / "b.jpg")
    torch.manual_seed(0)
    net = models.EmbeddingNet(TINY, num_classes=2)  # a classifier: segment needs no prototypes
    models.save_checkpoint(root / "model.pt", net, {"threshold": 0.5, "image_size": 32,
                                                    "classes": ["x", "y"]})
    import torchvision

    # A torchvision ResNet-18 state_dict: weights, but not a checkpoint of this project.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "resnet18.pt")
    # A project checkpoint claiming resnet18 but holding cifar_resnet weights.
    state = torch.load(root / "model.pt", weights_only=True)
    state["model_config"] = {**state["model_config"], "backbone": "resnet18"}
    torch.save(state, root / "mislabelled.pt")
    (root / "texts").mkdir()
    (root / "texts" / "notes.jpg").write_text("not an image")
    (root / "texts" / "empty.png").write_bytes(b"")
    (root / "images").mkdir()
    noise(40, 40, 2).save(root / "images" / "c.png")
    (root / "truncated.jpg").write_bytes((root / "b.jpg").read_bytes()[:200])
    return root


OTHER_MODELS = [("resnet18.pt", "not a checkpoint written by this project"),
                ("mislabelled.pt", "does not match its own model config")]


@needs("compare")
@pytest.mark.parametrize(("model", "message"), OTHER_MODELS)
def test_compare_with_a_model_of_another_architecture(files, capsys, tmp_path, model, message):
    code, _, err = call(["compare", files / "a.png", files / "b.jpg", "--model", files / model,
                         "--output", tmp_path / "c.png"], capsys)
    assert code == 2 and message in err and str(files / model) in err
    assert err.count("\n") == 1 and not (tmp_path / "c.png").exists()


@needs("compare")
@pytest.mark.parametrize(("image", "message"), [("images", "is not a file"),
                                                ("truncated.jpg", "cannot be decoded")])
def test_compare_with_a_folder_or_a_truncated_image(files, capsys, tmp_path, image, message):
    code, _, err = call(["compare", files / "a.png", files / image, "--model",
                         files / "model.pt", "--output", tmp_path / "c.png"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "c.png").exists()


@needs("search")
@pytest.mark.parametrize(("model", "message"), OTHER_MODELS)
def test_search_with_a_model_of_another_architecture(files, capsys, tmp_path, model, message):
    from retrieval import search

    search.save_index(search.build_index(np.eye(4, dtype=np.float32)), tmp_path / "g.faiss")
    pd.DataFrame({"path": list("abcd"), "label": list("abcd"), "file": list("abcd")}).to_csv(
        tmp_path / "g.csv", index=False)
    code, _, err = call(["search", files / "a.png", "--model", files / model, "--index",
                         tmp_path / "g.faiss", "--output", tmp_path / "s.png"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "s.png").exists()


@needs("segment")
@pytest.mark.parametrize(("case", "message"), [
    ("missing_folder", "does not exist"),
    ("a_file_not_a_folder", "is not a folder"),
    ("only_non_images", "contains no images Pillow can read"),
    ("other_architecture", "not a checkpoint written by this project"),
    ("mislabelled_model", "does not match its own model config"),
    ("missing_model", "does not exist"),
])
def test_segment_bad_input(files, capsys, tmp_path, case, message):
    images, model = files / "images", files / "model.pt"
    if case == "missing_folder":
        images = tmp_path / "nowhere"
    elif case == "a_file_not_a_folder":
        images = files / "a.png"
    elif case == "only_non_images":
        images = files / "texts"
    elif case == "other_architecture":
        model = files / "resnet18.pt"
    elif case == "mislabelled_model":
        model = files / "mislabelled.pt"
    elif case == "missing_model":
        model = tmp_path / "nope.pt"
    out = tmp_path / "masks"
    code, _, err = call(["segment", images, "--out", out, "--model", model, "--device", "cpu"],
                        capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.rglob("*.png"))


@needs("segment")
def test_segment_refuses_two_images_with_one_stem_before_writing(files, capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    noise(40, 40, 5).save(images / "a.jpg")
    noise(40, 40, 6).save(images / "a.png")  # both would write a.png
    out = tmp_path / "masks"
    code, _, err = call(["segment", images, "--out", out, "--model", files / "model.pt",
                         "--device", "cpu"], capsys)
    assert code == 2 and "same folder and stem" in err and err.count("\n") == 1
    assert not out.exists() or not any(out.rglob("*.png"))
