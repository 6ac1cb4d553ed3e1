"""Image folders as tables: decoding, indexing and splitting.

A dataset is a folder with one sub-folder per class (nested folders inside a class belong to that
class). Whether a file is an image is decided by decoding it, never by its extension: Caltech-101
ships a JPEG called ``tmp``. Files that cannot be decoded are excluded and listed, the dataset
directory is only ever read.
"""

from __future__ import annotations

import glob
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from retrieval.outputs import UserError

# Pillow refuses images above 2x this many pixels (DecompressionBombError) and warns above it;
# 89 MP is Pillow's own default, which no photo dataset needs to exceed.
Image.MAX_IMAGE_PIXELS = 89_478_485

SPLITS = ("train", "val", "test")


class DatasetError(UserError):
    """The dataset folder cannot be used (missing, empty, a single class, ...)."""


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode any image Pillow reads into 8-bit RGB, with its EXIF orientation applied.

    Grayscale, CMYK, palette, 16-bit and alpha images are converted here, at load time, so the
    rest of the pipeline only ever sees RGB. ``draft_size`` lets JPEG decode at a reduced scale
    (much faster) when the caller will downsample anyway.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: rescale to 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent pixels have undefined colour underneath.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_mask(path: str | Path) -> np.ndarray:
    """A foreground mask as a bool array (H, W): any non-zero pixel is foreground."""
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L")) > 127


def _decode_problem(path: Path) -> str | None:
    """None if `path` decodes as an image, else a short reason."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        image = load_rgb(path, draft_size=64)
    except Image.DecompressionBombError:
        return "too many pixels (decompression-bomb limit)"
    except Image.DecompressionBombWarning:
        return "too many pixels (above Image.MAX_IMAGE_PIXELS)"
    except Image.UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as error:
        return f"cannot decode: {str(error).splitlines()[0][:80]}"
    if min(image.size) < 2:
        return f"too small ({image.size[0]}x{image.size[1]} px)"
    return None


def _files_below(folder: Path) -> list[Path]:
    """Regular files below `folder`, sorted, skipping hidden entries and symlink loops."""
    found, visited, top = [], set(), folder.resolve()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = Path(current).resolve()
        # A directory symlink back to this folder or above it (a loop; above it, it would also
        # pull other classes' images into this class), or to a folder already walked.
        if real in visited or (visited and top.is_relative_to(real)):
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(current) / f for f in sorted(files) if not f.startswith(".")]
    return sorted(p for p in found if p.is_file())


@dataclass
class IndexResult:
    index: pd.DataFrame  # path (relative to root, posix), label, mask_path ("" if none)
    excluded: pd.DataFrame  # path, reason
    missing_masks: int = 0
    mismatched_masks: int = 0


def index_folder(root: str | Path, masks_root: str | Path | None = None) -> IndexResult:
    """Index a one-folder-per-class dataset: every decodable image, with its mask if any."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist: set data.root in params.yaml")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"dataset folder {root} has no class sub-folders: expected "
                           "<root>/<class>/<image> (one folder per class)")
    masks_root = Path(masks_root) if masks_root else None
    if masks_root is not None and not masks_root.is_dir():
        raise DatasetError(f"masks folder {masks_root} does not exist: fix data.masks in "
                           "params.yaml or set it to ''")
    rows, excluded = [], []
    missing_masks = mismatched_masks = 0
    for class_dir in class_dirs:
        kept_before = len(rows)
        for path in _files_below(class_dir):
            relative = path.relative_to(root).as_posix()
            problem = _decode_problem(path)
            if problem:
                excluded.append((relative, problem))
                continue
            mask_path = ""
            if masks_root is not None:
                mask_path, status = _find_mask(path, root, masks_root)
                missing_masks += status == "missing"
                mismatched_masks += status == "mismatched"
            rows.append((relative, class_dir.name, mask_path))
        if len(rows) == kept_before:  # listed, so a class that vanished is not a silent surprise
            excluded.append((f"{class_dir.name}/", "class folder without decodable images"))
    index = pd.DataFrame(rows, columns=["path", "label", "mask_path"])
    if index.empty:
        raise DatasetError(f"dataset folder {root} contains no decodable images")
    return IndexResult(index, pd.DataFrame(excluded, columns=["path", "reason"]),
                       missing_masks, mismatched_masks)


def _find_mask(image_path: Path, root: Path, masks_root: Path) -> tuple[str, str]:
    """The mask for an image: same relative folder and stem, any image extension."""
    relative = image_path.relative_to(root)
    folder = masks_root / relative.parent
    # glob.escape: a stem like "d[1]" is a pattern that would match the mask of "d1".
    candidates = sorted(folder.glob(glob.escape(relative.stem) + ".*")) if folder.is_dir() else []
    if not candidates:
        return "", "missing"
    mask = candidates[0]
    with Image.open(image_path) as image, Image.open(mask) as mask_image:
        image_size = ImageOps.exif_transpose(image).size
        if mask_image.size != image_size:
            return "", "mismatched"
    return mask.relative_to(masks_root).as_posix(), "ok"


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int] | None:
    """Images per split for a class of n images, or None if a split would be empty.

    Validation and test get round(n * fraction) images (at least one each), train the rest, so
    the proportions hold in every class: 10% of a 100-image class is 10 images.
    """
    n_val = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    n_train = n - n_val - n_test
    return (n_train, n_val, n_test) if n_train >= 1 else None


def _class_rng(seed: int, label: str) -> np.random.Generator:
    # Seeding per class (not one stream for all) keeps a class's split unchanged when other
    # classes are added or removed.
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def stratified_split(index: pd.DataFrame, fractions: tuple[float, float, float], seed: int,
                     small_classes: str = "train") -> tuple[pd.DataFrame, list[str]]:
    """Split every class into train/val/test with the same proportions.

    Classes too small to put an image in every split (fewer than 3 images) go entirely to train
    (``small_classes='train'``, so they still serve as training data and distractors) or are
    dropped (``'drop'``). Returns the split table and the small classes' names.
    """
    parts, small = [], []
    for label, group in index.groupby("label", sort=True):
        group = group.sort_values("path")
        sizes = _split_sizes(len(group), fractions)
        if sizes is None:
            small.append(label)
            if small_classes == "train":
                parts.append(group.assign(split="train"))
            continue
        order = _class_rng(seed, label).permutation(len(group))
        names = np.repeat(SPLITS, sizes)
        assigned = np.empty(len(group), dtype=object)
        assigned[order] = names
        parts.append(group.assign(split=assigned))
    return _finish(parts, index), small


def class_disjoint_split(index: pd.DataFrame, fractions: tuple[float, float, float],
                         seed: int) -> pd.DataFrame:
    """Put whole classes into train/val/test (unseen-class retrieval, e.g. CUB-style)."""
    labels = np.array(sorted(index["label"].unique()))
    if len(labels) < 3:
        raise DatasetError(f"class_disjoint split needs >= 3 classes, found {len(labels)}: "
                           "use split.mode: stratified")
    sizes = _split_sizes(len(labels), fractions)
    if sizes is None:
        raise DatasetError(f"{len(labels)} classes are too few for split fractions {fractions}")
    order = np.random.default_rng(seed).permutation(len(labels))
    split_of = dict(zip(labels[order], np.repeat(SPLITS, sizes), strict=True))
    return _finish([index.assign(split=index["label"].map(split_of))], index)


def _finish(parts: list[pd.DataFrame], index: pd.DataFrame) -> pd.DataFrame:
    if not parts:
        raise DatasetError("no class has enough images to split (each needs >= 3)")
    table = pd.concat(parts).sort_values(["split", "label", "path"], key=_split_order)
    return table[["path", "label", "split", "mask_path"]].reset_index(drop=True)


def _split_order(column: pd.Series) -> pd.Series:
    return column.map(SPLITS.index) if column.name == "split" else column


def check_retrieval_possible(table: pd.DataFrame) -> None:
    """Metric learning needs two classes and a class with two images in train; validation and
    test pairs (half same-class, half different-class) need the same in val and test."""
    train = table[table["split"] == "train"]
    n_classes = train["label"].nunique()
    if n_classes < 2:
        raise DatasetError(f"the training split has {n_classes} class(es); contrastive "
                           "training and retrieval need at least 2 classes: give data.root "
                           "one sub-folder per class, two or more")
    if train["label"].value_counts().max() < 2:
        raise DatasetError("no training class has 2 images: positive pairs are impossible")
    for name in ("val", "test"):
        counts = table.loc[table["split"] == name, "label"].value_counts()
        if len(counts) < 2 or counts.max() < 2:
            found = (f"{len(counts)} class(es)" if len(counts) < 2
                     else f"{len(counts)} classes of 1 image each")
            raise DatasetError(
                f"the {name} split has {found}: its pairs need 2 classes and a class with 2 "
                f"images: raise split.{name} in params.yaml or add classes / images")


def load_split_table(split_csv: str | Path, dataset_json: str | Path) -> pd.DataFrame:
    """The split table with `file` and `mask_file` columns resolved against the dataset root."""
    import json

    location = json.loads(Path(dataset_json).read_text())
    table = pd.read_csv(split_csv, keep_default_na=False, dtype=str)
    root = Path(location["root"])
    table["file"] = [str(root / p) for p in table["path"]]
    masks = Path(location["masks"]) if location["masks"] else None
    table["mask_file"] = [str(masks / m) if masks and m else "" for m in table["mask_path"]]
    return table
