"""Indexing odd dataset folders, decoding every image mode to RGB, and the splits."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrieval.data import (
    DatasetError,
    check_retrieval_possible,
    class_disjoint_split,
    index_folder,
    load_rgb,
    load_split_table,
    stratified_split,
)

EXIF_ORIENTATION = 0x0112


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_rotated_jpeg(path: Path, width: int, height: int) -> None:
    """Stored width x height, EXIF orientation 6 (rotate 90° clockwise to display)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    noise(width, height).save(path, "JPEG", exif=exif)


def listing(root: Path) -> list[tuple]:
    """Every entry below root (symlinks not followed) with its size and modification time."""
    entries = []
    for current, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            info = os.lstat(Path(current) / name)
            entries.append((os.path.relpath(Path(current) / name, root), info.st_size,
                            info.st_mtime_ns))
    return sorted(entries)


@pytest.fixture
def messy_root(tmp_path: Path) -> Path:
    """A dataset with every oddity the indexer must survive."""
    root = tmp_path / "dataset"
    cats, dogs, unicode = root / "cats", root / "dogs", root / "café crème"
    for folder in (cats / "sub", dogs, unicode, root / ".hidden_class"):
        folder.mkdir(parents=True)
    noise(64, 48).save(cats / "good.jpg")
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "notes.jpg").write_text("not a picture\n")
    noise(128, 96, seed=1).save(cats / "whole.jpg.bak", "JPEG")
    whole = (cats / "whole.jpg.bak").read_bytes()
    (cats / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (cats / "whole.jpg.bak").unlink()
    noise(40, 30, seed=2).save(cats / "tmp", "JPEG")  # no extension: Caltech-101's `tmp`
    Image.new("L", (32, 24), 77).save(cats / "gray.png")
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(cats / "cmyk.jpg")  # red in CMYK
    palette = Image.new("P", (32, 24), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    palette.paste(1, (0, 0, 16, 24))  # left half red, right half index 0
    palette.save(cats / "palette.png", transparency=0)  # index 0 is transparent
    rgba = Image.new("RGBA", (32, 24), (0, 0, 255, 0))  # transparent blue
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 24))  # left half opaque blue
    rgba.save(cats / "rgba.png")
    deep = np.zeros((24, 32), dtype=np.uint16)
    deep[:, 8:16], deep[:, 16:] = 1000, 2000
    Image.fromarray(deep).save(cats / "deep16.png")  # mode I;16
    Image.new("RGB", (1, 1), (9, 9, 9)).save(cats / "dot.png")
    save_rotated_jpeg(cats / "rotated.jpg", 60, 40)
    (cats / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    noise(30, 30, seed=3).save(cats / "sub" / "nested.jpg")
    outside = tmp_path / "elsewhere.jpg"
    noise(30, 30, seed=4).save(outside)
    (cats / "linked.jpg").symlink_to(outside)
    (cats / "sub" / "up").symlink_to("../..", target_is_directory=True)  # loop via the root
    (cats / "sub" / "here").symlink_to(".", target_is_directory=True)  # loop to itself
    noise(20, 20, seed=5).save(dogs / "a.jpg")
    noise(20, 20, seed=6).save(dogs / "b.png")
    noise(20, 20, seed=7).save(unicode / "photo ü 1.jpg")
    noise(20, 20, seed=8).save(root / ".hidden_class" / "x.jpg")
    (root / "LICENSE.txt").write_text("files at the root belong to no class\n")
    return root


KEPT = {
    "cats/good.jpg", "cats/tmp", "cats/gray.png", "cats/cmyk.jpg", "cats/palette.png",
    "cats/rgba.png", "cats/deep16.png", "cats/rotated.jpg", "cats/sub/nested.jpg",
    "cats/linked.jpg", "dogs/a.jpg", "dogs/b.png", "café crème/photo ü 1.jpg",
}


def test_index_keeps_decodable_images_whatever_their_name(messy_root):
    result = index_folder(messy_root)
    index = result.index
    assert list(index.columns) == ["path", "label", "mask_path"]
    assert set(index["path"]) == KEPT
    assert index["path"].is_unique  # the symlink loops did not index anything twice
    # The label is the top-level folder: the nested file and the loops stay in "cats", and the
    # loop through the root did not pull dogs' images into cats.
    assert dict(zip(index["path"], index["label"], strict=True)) == {
        p: p.split("/")[0] for p in KEPT}
    assert (index["mask_path"] == "").all()
    assert (result.missing_masks, result.mismatched_masks) == (0, 0)


def test_index_lists_excluded_files_with_reasons(messy_root):
    excluded = index_folder(messy_root).excluded
    reasons = dict(zip(excluded["path"], excluded["reason"], strict=True))
    assert set(reasons) == {"cats/empty.jpg", "cats/notes.jpg", "cats/truncated.jpg",
                            "cats/dot.png"}  # hidden files are skipped, not listed
    assert reasons["cats/empty.jpg"] == "empty file"
    assert reasons["cats/notes.jpg"] == "not an image"
    assert reasons["cats/truncated.jpg"].startswith("cannot decode")
    assert "truncated" in reasons["cats/truncated.jpg"]
    assert reasons["cats/dot.png"] == "too small (1x1 px)"


def test_index_is_deterministic_and_read_only(messy_root):
    before = listing(messy_root)
    first = index_folder(messy_root)
    second = index_folder(messy_root)
    assert listing(messy_root) == before
    pd.testing.assert_frame_equal(first.index, second.index)
    pd.testing.assert_frame_equal(first.excluded, second.excluded)


def test_load_rgb_gives_rgb_uint8_for_every_kept_file(messy_root):
    for path in KEPT:
        image = load_rgb(messy_root / path)
        array = np.asarray(image)
        assert image.mode == "RGB", path
        assert array.dtype == np.uint8 and array.shape == (image.height, image.width, 3), path


def test_load_rgb_converts_each_mode(messy_root):
    cats = messy_root / "cats"
    assert np.asarray(load_rgb(cats / "gray.png"))[0, 0].tolist() == [77, 77, 77]
    # Transparent pixels are composited on white; opaque ones keep their colour.
    palette = np.asarray(load_rgb(cats / "palette.png"))
    assert palette[0, 0].tolist() == [255, 0, 0] and palette[0, 31].tolist() == [255, 255, 255]
    rgba = np.asarray(load_rgb(cats / "rgba.png"))
    assert rgba[0, 0].tolist() == [0, 0, 255] and rgba[0, 31].tolist() == [255, 255, 255]
    # 16-bit 0 / 1000 / 2000 scaled by 255 / peak (2000): 0, 127.5 -> 128 (rounded), 255.
    deep = np.asarray(load_rgb(cats / "deep16.png"))
    assert [deep[0, 0, 0], deep[0, 8, 0], deep[0, 16, 0]] == [0, 128, 255]
    # CMYK (0, 255, 255, 0) is red; JPEG is lossy, so only roughly.
    cmyk = np.asarray(load_rgb(cats / "cmyk.jpg")).reshape(-1, 3).mean(0)
    assert np.abs(cmyk - [255, 0, 0]).max() < 16


def test_load_rgb_applies_exif_orientation(messy_root):
    path = messy_root / "cats" / "rotated.jpg"
    with Image.open(path) as stored:
        assert stored.size == (60, 40)
    assert load_rgb(path).size == (40, 60)  # orientation 6: rotated a quarter turn
    # draft 16: libjpeg scale min(60 // 16, 40 // 16) = 2 -> decoded 30 x 20, displayed 20 x 30.
    assert load_rgb(path, draft_size=16).size == (20, 30)


def masked_dataset(tmp_path: Path) -> tuple[Path, Path]:
    root, masks = tmp_path / "images", tmp_path / "masks"
    (root / "moths").mkdir(parents=True)
    (masks / "moths").mkdir(parents=True)
    # Distinct pixels: identical files in one class would be dropped as duplicates.
    for seed, name in enumerate(("a.jpg", "b.jpg", "c.jpg", "d[1].jpg")):
        noise(40, 30, seed).save(root / "moths" / name)
    save_rotated_jpeg(root / "moths" / "e.jpg", 40, 30)  # displayed 30 x 40
    Image.new("L", (40, 30), 255).save(masks / "moths" / "a.png")
    # b.jpg: no mask
    Image.new("L", (20, 15), 255).save(masks / "moths" / "c.png")  # wrong size
    Image.new("L", (40, 30), 255).save(masks / "moths" / "d[1].png")  # a glob pattern as stem
    Image.new("L", (7, 7), 255).save(masks / "moths" / "d1.png")  # what "d[1].*" would match
    Image.new("L", (30, 40), 255).save(masks / "moths" / "e.png")  # the displayed size
    return root, masks


def test_index_pairs_images_with_masks(tmp_path):
    root, masks = masked_dataset(tmp_path)
    result = index_folder(root, masks)
    mask_of = dict(zip(result.index["path"], result.index["mask_path"], strict=True))
    assert mask_of == {"moths/a.jpg": "moths/a.png", "moths/b.jpg": "", "moths/c.jpg": "",
                       "moths/d[1].jpg": "moths/d[1].png", "moths/e.jpg": "moths/e.png"}
    assert (result.missing_masks, result.mismatched_masks) == (1, 1)  # b; c


def test_index_errors_name_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        index_folder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty.*no class sub-folders"):
        index_folder(empty)
    flat = tmp_path / "flat"
    flat.mkdir()
    noise(20, 20).save(flat / "a.jpg")
    with pytest.raises(DatasetError, match="flat.*no class sub-folders"):
        index_folder(flat)
    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no_images.*no decodable images"):
        index_folder(no_images)
    with pytest.raises(DatasetError, match="no_masks_here"):
        index_folder(flat.parent / "no_images", tmp_path / "no_masks_here")


def test_index_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetError) as error:
        index_folder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value) and "\n" not in str(error.value)


# -- splits -------------------------------------------------------------------------------------


def make_index(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label}/{i:03d}.jpg", label, "") for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["path", "label", "mask_path"])


def split_counts(table: pd.DataFrame) -> dict[tuple[str, str], int]:
    return table.groupby(["label", "split"]).size().to_dict()


def test_stratified_split_holds_proportions_in_every_class():
    index = make_index({"big": 100, "mid": 20, "three": 3})
    table, small = stratified_split(index, (0.7, 0.1, 0.2), seed=0)
    assert small == []
    # big: val round(100 * 0.1) = 10, test round(100 * 0.2) = 20, train the other 70.
    # mid: val round(2.0) = 2, test round(4.0) = 4, train 14.
    # three: val max(1, round(0.3)) = 1, test max(1, round(0.6)) = 1, train 1.
    assert split_counts(table) == {
        ("big", "train"): 70, ("big", "val"): 10, ("big", "test"): 20,
        ("mid", "train"): 14, ("mid", "val"): 2, ("mid", "test"): 4,
        ("three", "train"): 1, ("three", "val"): 1, ("three", "test"): 1,
    }
    assert list(table.columns) == ["path", "label", "split", "mask_path"]
    assert table["path"].is_unique and set(table["path"]) == set(index["path"])


def test_stratified_split_is_seeded():
    index = make_index({"a": 30, "b": 25})
    first, _ = stratified_split(index, (0.7, 0.15, 0.15), seed=3)
    again, _ = stratified_split(index.sample(frac=1, random_state=1), (0.7, 0.15, 0.15), seed=3)
    other, _ = stratified_split(index, (0.7, 0.15, 0.15), seed=4)
    pd.testing.assert_frame_equal(first, again)  # row order of the index does not matter
    assert not first.equals(other)
    assert split_counts(first) == split_counts(other)


def test_stratified_split_of_a_class_ignores_other_classes():
    alone, _ = stratified_split(make_index({"a": 30}), (0.7, 0.15, 0.15), seed=3)
    together, _ = stratified_split(make_index({"a": 30, "b": 9}), (0.7, 0.15, 0.15), seed=3)
    together = together[together["label"] == "a"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, together)


def test_small_classes_go_to_train_or_are_dropped():
    index = make_index({"many": 10, "one": 1, "two": 2})
    kept, small = stratified_split(index, (0.7, 0.15, 0.15), seed=0, small_classes="train")
    assert small == ["one", "two"]
    assert split_counts(kept[kept["label"] != "many"]) == {("one", "train"): 1,
                                                          ("two", "train"): 2}
    dropped, small = stratified_split(index, (0.7, 0.15, 0.15), seed=0, small_classes="drop")
    assert small == ["one", "two"]
    assert set(dropped["label"]) == {"many"}
    with pytest.raises(DatasetError, match=">= 3"):
        stratified_split(make_index({"two": 2}), (0.7, 0.15, 0.15), seed=0,
                         small_classes="drop")


def test_class_disjoint_split_keeps_each_class_in_one_split():
    index = make_index({f"c{k}": 4 + k for k in range(10)})
    table = class_disjoint_split(index, (0.6, 0.2, 0.2), seed=0)
    assert len(table) == len(index) and table["path"].is_unique
    assert (table.groupby("label")["split"].nunique() == 1).all()
    # 10 classes: val round(10 * 0.2) = 2, test 2, train 6.
    classes = table.drop_duplicates("label")["split"].value_counts().to_dict()
    assert classes == {"train": 6, "val": 2, "test": 2}
    pd.testing.assert_frame_equal(table, class_disjoint_split(index, (0.6, 0.2, 0.2), seed=0))


def test_class_disjoint_split_needs_three_classes():
    with pytest.raises(DatasetError, match="found 2"):
        class_disjoint_split(make_index({"a": 5, "b": 5}), (0.7, 0.15, 0.15), seed=0)


def test_check_retrieval_possible():
    table, _ = stratified_split(make_index({"a": 10, "b": 10}), (0.7, 0.15, 0.15), seed=0)
    check_retrieval_possible(table)  # two classes with 7 training images each
    single, _ = stratified_split(make_index({"a": 10}), (0.7, 0.15, 0.15), seed=0)
    with pytest.raises(DatasetError, match="1 class"):
        check_retrieval_possible(single)
    singletons = make_index({"a": 1, "b": 1}).assign(split="train")
    with pytest.raises(DatasetError, match="2 images"):
        check_retrieval_possible(singletons)


def test_load_split_table_resolves_files_and_keeps_strings(tmp_path):
    table = pd.DataFrame({"path": ["NA/001.jpg", "null/x y.jpg"], "label": ["NA", "null"],
                          "split": ["train", "test"], "mask_path": ["NA/001.png", ""]})
    table.to_csv(tmp_path / "split.csv", index=False)
    (tmp_path / "dataset.json").write_text(json.dumps({"root": "/data/img", "masks": "/data/m"}))
    loaded = load_split_table(tmp_path / "split.csv", tmp_path / "dataset.json")
    assert loaded["label"].tolist() == ["NA", "null"]  # not NaN
    assert loaded["file"].tolist() == ["/data/img/NA/001.jpg", "/data/img/null/x y.jpg"]
    assert loaded["mask_file"].tolist() == ["/data/m/NA/001.png", ""]
