"""Data that decodes into something wrong (issue 16): every image mode, bombs, masks, duplicates.

The rules are data.py's module docstring (and README "Dataset rules"): each case builds a small
folder in tmp_path and checks what a user gets, either the decoded pixels, the one reason a file
is refused with, or the row of excluded.csv and the count of metrics/details/prepare.json.
Most cases call data.load_rgb / load_mask / index_folder directly; the last ones run the real
prepare stage in-process and also check that the dataset folder is unchanged and no temporary
file is left.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrieval import data
from retrieval.data import UnusableImage, index_folder, load_mask, load_rgb
from tests.conftest import make_repo
from tests.reliability.conftest import assert_one_line_error, run_script

# --- builders -------------------------------------------------------------------------------------


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def halves(mode: str, left, right, size: tuple[int, int] = (8, 4)) -> Image.Image:
    """An image of `mode`: the left half one pixel value, the right half another."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def from_array(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values)


def png_with_header_size(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height but whose data is 8 x 8: only a header
    check can give the size reason, decoding would fail on the data."""
    buffer = io.BytesIO()
    Image.new("1", (8, 8)).save(buffer, "PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def tree_digest(folder: Path) -> str:
    """Names, link targets and bytes of everything below `folder` (symlinks not followed)."""
    digest = hashlib.sha256()
    for current, dirs, files in sorted(os.walk(folder)):
        for name in sorted(dirs + files):
            path = Path(current) / name
            digest.update(str(path.relative_to(folder)).encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def two_classes(root: Path, n: int = 3) -> Path:
    for k, label in enumerate(("a", "b")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise(24, 20, seed=100 * k + i).save(root / label / f"{label}{i}.png")
    return root


def reasons(result: data.IndexResult) -> dict[str, str]:
    return dict(zip(result.excluded["path"], result.excluded["reason"], strict=True))


# --- image modes: mapped by a stated rule, never silently black or white -------------------------

# id -> (image, file format, expected RGB of the left and the right half)
MODES: dict[str, tuple[Callable[[], Image.Image], str, list, list]] = {
    "1-bit-png": (lambda: halves("1", 0, 1), "PNG", [0, 0, 0], [255, 255, 255]),
    "gray-png": (lambda: halves("L", 30, 200), "PNG", [30] * 3, [200] * 3),
    "la-png-transparent-on-white": (lambda: halves("LA", (40, 255), (40, 0)), "PNG",
                                    [40] * 3, [255] * 3),
    "palette-png": (lambda: _palette(transparent=False), "PNG", [255, 0, 0], [0, 0, 0]),
    "palette-transparent-png": (lambda: _palette(transparent=True), "PNG",
                                [255, 0, 0], [255, 255, 255]),
    "pa-tiff": (lambda: _pa(), "TIFF", [255, 0, 0], [255, 255, 255]),
    "rgba-png": (lambda: halves("RGBA", (0, 0, 255, 255), (0, 0, 255, 0)), "PNG",
                 [0, 0, 255], [255, 255, 255]),
    "cmyk-tiff": (lambda: halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), "TIFF",
                  [255, 0, 0], [0, 0, 0]),
    "ycbcr-tiff": (lambda: halves("YCbCr", (76, 85, 255), (255, 128, 128)), "TIFF",
                   [254, 0, 0], [255, 255, 255]),
    "lab-tiff": (lambda: halves("LAB", (136, 208, 195), (255, 128, 128)), "TIFF",
                 [250, 3, 11], [254, 255, 254]),
    # 16-bit using 12 bits: stretched by the brightest pixel, not divided by 65535 (near black).
    "uint16-png-12-bit-range": (lambda: from_array(_halves_array(np.uint16, 0, 4000)), "PNG",
                                [0] * 3, [255] * 3),
    "uint16-tiff-big-endian": (lambda: from_array(_halves_array(">u2", 1000, 2000)), "TIFF",
                               [128] * 3, [255] * 3),
    "int32-tiff-negative": (lambda: from_array(_halves_array(np.int32, -100, 100)), "TIFF",
                            [0] * 3, [255] * 3),
    # The black float32 TIFF: [0, 1] is read as that range.
    "float32-tiff-unit-range": (lambda: from_array(_halves_array(np.float32, 0.5, 1.0)), "TIFF",
                                [128] * 3, [255] * 3),
    "float32-tiff-wide-range": (lambda: from_array(_halves_array(np.float32, 250.0, 1000.0)),
                                "TIFF", [64] * 3, [255] * 3),
    "float32-tiff-signed": (lambda: from_array(_halves_array(np.float32, -1.0, 1.0)), "TIFF",
                            [0] * 3, [255] * 3),
}


def _halves_array(dtype, left, right) -> np.ndarray:
    values = np.full((4, 8), left, dtype=dtype)
    values[:, 4:] = right
    return values


def _palette(transparent: bool) -> Image.Image:
    image = halves("P", 1, 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    if transparent:
        image.info["transparency"] = 0
    return image


def _pa() -> Image.Image:
    image = Image.new("PA", (8, 4), (1, 255))
    image.paste((1, 0), (4, 0, 8, 4))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return image


@pytest.mark.parametrize("case", list(MODES), ids=list(MODES))
def test_each_mode_maps_to_rgb_by_its_rule(tmp_path, case):
    build, fmt, left, right = MODES[case]
    image = build()
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, fmt, **({"transparency": 0} if "transparency" in image.info else {}))
    with Image.open(path) as stored:
        assert stored.mode == image.mode  # the file really has the mode under test
    rgb = load_rgb(path)
    pixels = np.asarray(rgb)
    assert rgb.mode == "RGB" and pixels.shape == (4, 8, 3)
    assert pixels[0, 0].tolist() == left and pixels[0, 7].tolist() == right
    assert index_folder(_dataset_with(tmp_path, path)).index["path"].str.endswith(
        path.name).any()  # prepare keeps it


def _dataset_with(tmp_path: Path, path: Path) -> Path:
    root = two_classes(tmp_path / "dataset")
    (root / "a" / path.name).write_bytes(path.read_bytes())
    return root


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["float32-tiff-nan", "float32-tiff-inf"])
def test_non_finite_float_images_are_refused(tmp_path, value):
    values = np.full((4, 8), 0.5, dtype=np.float32)
    values[1, 1] = value
    root = two_classes(tmp_path / "dataset")
    Image.fromarray(values).save(root / "a" / "float.tif")
    with pytest.raises(UnusableImage, match="float.tif.*NaN or infinite"):
        load_rgb(root / "a" / "float.tif")
    result = index_folder(root)
    assert reasons(result) == {"a/float.tif": "float image with NaN or infinite pixels: "
                                              "replace them and save again"}


def test_a_mode_without_a_rule_is_refused_by_name(tmp_path, monkeypatch):
    # Every mode Pillow writes to a file has a rule, so one is taken away to reach the refusal.
    monkeypatch.delitem(data.IMAGE_MODES, "L")
    halves("L", 0, 255).save(tmp_path / "gray.png")
    with pytest.raises(UnusableImage) as refused:
        load_rgb(tmp_path / "gray.png")
    assert refused.value.reason == "unsupported image mode L: save it as 8-bit RGB or grayscale"


# --- size: the decoded size and the resized size are bounded from the header ----------------------

# id -> (width, height claimed by the header, the start of the reason)
BOMBS = {
    "header-400-megapixels": (20_000, 20_000, "too many pixels (decompression-bomb limit)"),
    "header-100-megapixels": (10_000, 10_000, "too many pixels (above Image.MAX_IMAGE_PIXELS)"),
    "aspect-3x60000": (3, 60_000, "aspect ratio 1:20000 (3x60000 px) is above 1:20"),
    "aspect-60000x3": (60_000, 3, "aspect ratio 1:20000 (60000x3 px) is above 1:20"),
    "aspect-21-to-1": (420, 20, "aspect ratio 1:21 (420x20 px) is above 1:20"),
    "too-thin-1-px": (1, 40, "too small (1x40 px)"),
}


@pytest.mark.parametrize("case", list(BOMBS), ids=list(BOMBS))
def test_size_bombs_are_refused_from_the_header(tmp_path, case):
    width, height, reason = BOMBS[case]
    root = two_classes(tmp_path / "dataset")
    png_with_header_size(root / "a" / "bomb.png", width, height)
    with pytest.raises(UnusableImage) as refused:
        load_rgb(root / "a" / "bomb.png")
    # The data is 8 x 8: had it been decoded, the reason would be a decoding error.
    assert refused.value.reason.startswith(reason), refused.value.reason
    assert str(root / "a" / "bomb.png") in str(refused.value)
    assert reasons(index_folder(root))["a/bomb.png"].startswith(reason)


def test_a_real_3x60000_png_of_a_few_hundred_bytes_is_refused_and_1_to_20_is_kept(tmp_path):
    root = two_classes(tmp_path / "dataset")
    Image.new("L", (3, 60_000), 90).save(root / "a" / "strip.png")
    assert (root / "a" / "strip.png").stat().st_size < 2_000
    noise(400, 20, seed=7).save(root / "b" / "wide.png")  # exactly 1:20
    result = index_folder(root)
    assert reasons(result)["a/strip.png"].startswith("aspect ratio 1:20000")
    assert "b/wide.png" in set(result.index["path"])
    assert load_rgb(root / "b" / "wide.png").size == (400, 20)


# --- masks: non-zero is foreground, by mode -------------------------------------------------------

TRUTH = np.zeros((4, 8), dtype=bool)
TRUTH[:, :4] = True  # the left half is the object

# id -> (mask image, file format); every one must give TRUTH
MASKS: dict[str, tuple[Callable[[], Image.Image], str]] = {
    "mask-0-1-png": (lambda: halves("L", 1, 0), "PNG"),
    "mask-0-255-png": (lambda: halves("L", 255, 0), "PNG"),
    "mask-1-bit-png": (lambda: halves("1", 1, 0), "PNG"),
    "mask-uint16-png": (lambda: from_array(_halves_array(np.uint16, 65535, 0)), "PNG"),
    "mask-red-on-black-rgb": (lambda: halves("RGB", (200, 0, 0), (0, 0, 0)), "PNG"),
    "mask-rgba-alpha-zero-is-background": (lambda: halves("RGBA", (0, 255, 0, 255),
                                                          (255, 255, 255, 0)), "PNG"),
    # Index 1 is black and index 0 white: the index decides, not the colour.
    "mask-palette-index": (lambda: _index_mask(), "PNG"),
    "mask-la-png": (lambda: halves("LA", (9, 255), (9, 0)), "PNG"),
}


def _index_mask() -> Image.Image:
    image = halves("P", 1, 0)
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    return image


@pytest.mark.parametrize("case", list(MASKS), ids=list(MASKS))
def test_masks_follow_the_non_zero_rule(tmp_path, case):
    build, fmt = MASKS[case]
    path = tmp_path / f"mask.{fmt.lower()}"
    build().save(path, fmt)
    np.testing.assert_array_equal(load_mask(path), TRUTH)


def test_a_jpeg_mask_is_thresholded_at_half_range_not_at_its_noise(tmp_path):
    y, x = np.mgrid[:64, :64]
    truth = (y - 30) ** 2 + (x - 34) ** 2 < 20**2  # a disc: curved edges ring in JPEG
    Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).save(tmp_path / "m.jpg",
                                                                    quality=30)
    with Image.open(tmp_path / "m.jpg") as stored:
        noisy = np.asarray(stored)
    background_noise = ((noisy > 0) & ~truth).sum()
    assert background_noise > 100  # what the lossless non-zero rule would call foreground
    assert (load_mask(tmp_path / "m.jpg") != truth).sum() < background_noise / 10


@pytest.mark.parametrize("case", ["mask-cmyk", "mask-float-nan"])
def test_masks_without_a_rule_are_refused(tmp_path, case):
    path = tmp_path / "mask.tif"
    if case == "mask-cmyk":
        Image.new("CMYK", (8, 4)).save(path)
        expected = "mask mode CMYK has no foreground rule"
    else:
        Image.fromarray(np.full((4, 8), np.nan, dtype=np.float32)).save(path)
        expected = "mask with NaN or infinite pixels"
    with pytest.raises(UnusableImage, match=expected):
        load_mask(path)


# --- masks in prepare: checked before training, listed, the image kept without its mask -----------

def masked(tmp_path: Path, write_mask: Callable[[Path], None]) -> tuple[Path, Path]:
    root = two_classes(tmp_path / "images")
    masks = tmp_path / "masks"
    (masks / "a").mkdir(parents=True)
    for i in range(1, 3):
        Image.fromarray(np.where(np.arange(24) < 12, 255, 0).astype(np.uint8)[None].repeat(20, 0)
                        ).save(masks / "a" / f"a{i}.png")
    write_mask(masks / "a")
    return root, masks


def _truncated(folder: Path) -> None:
    buffer = io.BytesIO()
    noise(24, 20, seed=9).convert("L").save(buffer, "PNG")
    (folder / "a0.png").write_bytes(buffer.getvalue()[:60])


# id -> (writes the mask of a/a0.png, the start of its excluded.csv reason, or the count it adds)
MASK_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "mask-corrupt-png": (_truncated, "mask of a/a0.png cannot be decoded: "),
    "mask-text-file": (lambda f: (f / "a0.png").write_text("not a mask"),
                       "mask of a/a0.png cannot be decoded: cannot identify image file"),
    "mask-wrong-size": (lambda f: Image.new("L", (20, 24), 255).save(f / "a0.png"),
                        "mask of a/a0.png: 20x24 px, the image is 24x20 px; image kept "
                        "without a mask"),
    "mask-cmyk-in-prepare": (lambda f: Image.new("CMYK", (24, 20)).save(f / "a0.tif"),
                             "mask of a/a0.png: mask mode CMYK has no foreground rule"),
    "mask-all-background": (lambda f: Image.new("L", (24, 20), 0).save(f / "a0.png"),
                            "masks_all_background"),
    "mask-all-foreground": (lambda f: Image.new("L", (24, 20), 1).save(f / "a0.png"),
                            "masks_all_foreground"),
}


@pytest.mark.parametrize("case", list(MASK_FILES), ids=list(MASK_FILES))
def test_prepare_checks_every_mask(tmp_path, case):
    write, expected = MASK_FILES[case]
    root, masks = masked(tmp_path, write)
    result = index_folder(root, masks)
    mask_of = dict(zip(result.index["path"], result.index["mask_path"], strict=True))
    assert mask_of["a/a1.png"] == "a/a1.png" and mask_of["b/b0.png"] == ""
    assert len(result.index) == 6  # no image is lost over its mask
    if expected.startswith("masks_"):
        assert mask_of["a/a0.png"] == "a/a0.png"
        assert result.counts[expected] == 1 and result.excluded.empty
        return
    assert mask_of["a/a0.png"] == ""
    [(path, reason)] = result.excluded.values.tolist()
    assert path.startswith("a/a0.") and reason.startswith(expected), reason
    assert reason.endswith("image kept without a mask")
    assert (result.mismatched_masks, result.counts["undecodable_masks"]) == (
        (1, 0) if case == "mask-wrong-size" else (0, 1))


# --- duplicates: one file or one content under several labels -------------------------------------

def _link_folder(root: Path) -> None:
    (root / "b" / "from_a").symlink_to(root / "a", target_is_directory=True)


def _link_file(root: Path) -> None:
    (root / "b" / "x.png").symlink_to(root / "a" / "a0.png")


def _hardlink(root: Path) -> None:
    os.link(root / "a" / "a0.png", root / "b" / "x.png")


def _copy(root: Path) -> None:
    (root / "b" / "x.png").write_bytes((root / "a" / "a0.png").read_bytes())


def _copy_to_new_class(root: Path) -> None:
    (root / "c").mkdir()
    for i in range(3):
        noise(24, 20, seed=300 + i).save(root / "c" / f"c{i}.png")
    _copy(root)
    (root / "c" / "y.png").write_bytes((root / "a" / "a0.png").read_bytes())


# id -> (makes the duplicate, {path: start of the reason}, ambiguous count, within-class count)
DUPLICATES: dict[str, tuple[Callable[[Path], None], dict[str, str], int, int]] = {
    "symlinked-folder-across-classes": (_link_folder, {
        **{f"a/a{i}.png": f"same file as b/from_a/a{i}.png under class b" for i in range(3)},
        **{f"b/from_a/a{i}.png": f"same file as a/a{i}.png under class a" for i in range(3)},
        "a/": "class folder without usable images (all duplicates)",
    }, 6, 0),
    "symlinked-file-across-classes": (_link_file, {
        "a/a0.png": "same file as b/x.png under class b",
        "b/x.png": "same file as a/a0.png under class a"}, 2, 0),
    "hardlink-across-classes": (_hardlink, {
        "a/a0.png": "same file as b/x.png under class b",
        "b/x.png": "same file as a/a0.png under class a"}, 2, 0),
    "copy-across-classes": (_copy, {
        "a/a0.png": "same content as b/x.png under class b",
        "b/x.png": "same content as a/a0.png under class a"}, 2, 0),
    "copy-in-three-classes": (_copy_to_new_class, {
        "a/a0.png": "same content as b/x.png under class b",
        "b/x.png": "same content as a/a0.png under class a",
        "c/y.png": "same content as a/a0.png under class a"}, 3, 0),
    "copy-within-class": (lambda r: (r / "a" / "z.png").write_bytes(
        (r / "a" / "a0.png").read_bytes()),
        {"a/z.png": "duplicate: same content as a/a0.png in the same class"}, 0, 1),
    "hardlink-within-class": (lambda r: os.link(r / "a" / "a0.png", r / "a" / "z.png"),
                              {"a/z.png": "duplicate: same file as a/a0.png"}, 0, 1),
    "symlink-within-class": (lambda r: (r / "a" / "z.png").symlink_to(r / "a" / "a1.png"),
                             {"a/z.png": "duplicate: same file as a/a1.png"}, 0, 1),
}


@pytest.mark.parametrize("case", list(DUPLICATES), ids=list(DUPLICATES))
def test_duplicates_are_resolved_by_one_rule(tmp_path, case):
    make, expected, ambiguous, within = DUPLICATES[case]
    root = two_classes(tmp_path / "dataset")
    make(root)
    result = index_folder(root)
    found = reasons(result)
    assert set(found) == set(expected)
    for path, start in expected.items():
        assert found[path].startswith(start), (path, found[path])
    kept = set(result.index["path"])
    assert not kept & set(expected)
    assert result.index["path"].is_unique
    if ambiguous:
        assert all(r.endswith("ambiguous label, excluded from every class")
                   for p, r in found.items() if not p.endswith("/"))
    else:
        first = found[next(iter(expected))].split(" as ")[1].split(" ")[0]
        assert first in kept  # one copy stays
    assert (result.counts["duplicates_ambiguous_label"],
            result.counts["duplicates_within_class"]) == (ambiguous, within)


# --- the real prepare stage, in-process -----------------------------------------------------------

@pytest.fixture(scope="module")
def prepare_repo(tmp_path_factory, mlflow_db_template) -> Path:
    return make_repo(tmp_path_factory.mktemp("decoding"), mlflow_db_template)


def configure(repo: Path, root: Path, masks: Path | str = "") -> None:
    import yaml

    (repo / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="folder", root=str(root), masks=str(masks))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def leftovers(repo: Path) -> list[str]:
    return [p.name for p in repo.rglob(".*") if ".tmp" in p.name or ".partial-" in p.name]


def hostile_dataset(base: Path) -> tuple[Path, Path]:
    """The issue's probe in one folder: a float TIFF, a 3x60000 strip, a 0/1 mask, a coloured
    mask, a corrupt mask, a folder symlink into another class and a copy within a class."""
    root, masks = two_classes(base / "images", n=4), base / "masks"
    (root / "c").mkdir()
    for i in range(4):
        noise(24, 20, seed=400 + i).save(root / "c" / f"c{i}.png")
    Image.fromarray(np.linspace(0, 1, 24 * 20, dtype=np.float32).reshape(20, 24)).save(
        root / "a" / "float.tif")
    Image.new("L", (3, 60_000)).save(root / "a" / "strip.png")
    (root / "b" / "linked_c").symlink_to(root / "c", target_is_directory=True)
    (root / "a" / "copy.png").write_bytes((root / "a" / "a0.png").read_bytes())
    (masks / "a").mkdir(parents=True)
    Image.fromarray(np.eye(20, 24, dtype=np.uint8)).save(masks / "a" / "a1.png")  # 0/1
    halves("RGB", (0, 90, 0), (0, 0, 0), (24, 20)).save(masks / "a" / "a2.png")
    (masks / "a" / "a3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("L", (24, 20), 0).save(masks / "a" / "a0.png")  # all background
    return root, masks


def test_prepare_reports_the_hostile_probe(prepare_repo, tmp_path):
    root, masks = hostile_dataset(tmp_path)
    configure(prepare_repo, root, masks)
    before = tree_digest(tmp_path)
    result = run_script("stages/prepare.py", cwd=prepare_repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_digest(tmp_path) == before and not leftovers(prepare_repo)
    metrics = json.loads((prepare_repo / "metrics/details/prepare.json").read_text())
    excluded = pd.read_csv(prepare_repo / "data/prepared/excluded.csv", keep_default_na=False)
    why = dict(zip(excluded["path"], excluded["reason"], strict=True))
    assert why["a/strip.png"].startswith("aspect ratio 1:20000")
    assert why["a/copy.png"].startswith("duplicate: same content as a/a0.png")
    assert why["b/linked_c/c0.png"].startswith("same file as c/c0.png under class c")
    assert why["a/a3.png"].startswith("mask of a/a3.png cannot be decoded")
    assert (metrics["duplicates_ambiguous_label"], metrics["duplicates_within_class"]) == (8, 1)
    assert (metrics["undecodable_masks"], metrics["masks_all_background"]) == (1, 1)
    assert metrics["excluded"] == len(excluded) == 1 + 1 + 8 + 1 + 1  # + class c vanished
    assert why["c/"] == "class folder without usable images (all duplicates)"
    index = pd.read_csv(prepare_repo / "data/prepared/index.csv", keep_default_na=False)
    mask_of = dict(zip(index["path"], index["mask_path"], strict=True))
    assert mask_of["a/float.tif"] == "" and mask_of["a/a3.png"] == ""
    assert (mask_of["a/a1.png"], mask_of["a/a2.png"]) == ("a/a1.png", "a/a2.png")
    assert metrics["images"] == len(index) == 4 + 1 + 4  # a0-a3 + float, b0-b3
    assert load_mask(masks / "a" / "a1.png").sum() == 20  # the 0/1 diagonal, not empty
    assert load_rgb(root / "a" / "float.tif").getextrema() == ((0, 255),) * 3


def test_prepare_refuses_a_dataset_whose_every_image_is_ambiguous(prepare_repo, tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        noise(24, 20, seed=i).save(root / "a" / f"{i}.png")
    (root / "b").symlink_to(root / "a", target_is_directory=True)
    configure(prepare_repo, root)
    for stale in ("index.csv", "excluded.csv"):
        (prepare_repo / "data" / "prepared" / stale).unlink(missing_ok=True)
    before = tree_digest(tmp_path)
    result = run_script("stages/prepare.py", cwd=prepare_repo)
    assert_one_line_error(result, str(root), "no decodable images")
    assert tree_digest(tmp_path) == before and not leftovers(prepare_repo)
    assert not (prepare_repo / "data" / "prepared" / "index.csv").exists()
