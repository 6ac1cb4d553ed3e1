"""Image folders as tables: decoding, indexing and splitting.

A dataset is a folder with one sub-folder per class (nested folders inside a class belong to that
class). Whether a file is an image is decided by decoding it, never by its extension: Caltech-101
ships a JPEG called ``tmp``. Files that cannot be used are excluded and listed with the reason,
the dataset directory is only ever read.

Dataset rules (README.md, "Dataset rules", says the same for users):

- Size: Pillow's header check (``Image.MAX_IMAGE_PIXELS``) bounds the decoded size, and an image
  whose long side exceeds ``MAX_ASPECT_RATIO`` times its short side is refused from its header,
  before any pixel is decoded: the cache resizes the short side to ``cache_size(image_size)``, so
  this bounds the resized image too (at most ``MAX_ASPECT_RATIO * S**2`` pixels).
- Modes (``IMAGE_MODES``): every mode Pillow reads is mapped to 8-bit RGB by a stated rule, or
  refused with the reason; a float image with NaN or infinity is refused.
- Masks (``load_mask``): a non-zero pixel is foreground (0/1 and 0/255 masks both work); an RGB
  pixel with any non-zero channel is foreground; a fully transparent pixel (alpha 0) is
  background; a palette mask uses its index, not its colour; a JPEG mask is thresholded at half
  range (> 127), since its compression noise makes many background pixels non-zero.
- Duplicates: the same file (symlink, hardlink) or the same bytes under two or more classes has
  an ambiguous label and is excluded from every class; copies within one class keep the first
  path only (sorted order), so a duplicate can never sit in both train and test.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from retrieval.outputs import UserError

# Pillow refuses images above 2x this many pixels (DecompressionBombError) and warns above it;
# 89 MP is Pillow's own default, which no photo dataset needs to exceed.
Image.MAX_IMAGE_PIXELS = 89_478_485

# Long side / short side. The cache resizes the short side to S = cache_size(image_size) and
# keeps the aspect ratio, so a 3 x 60,000 px PNG of 1 KB would become 183 x 3.66 M px (2 GB)
# at 160 px. Above 1:20 the centre crop would also show the model under 5% of the image; phone
# panoramas stay below 1:10.
MAX_ASPECT_RATIO = 20
MIN_SIDE = 2

# Lossy formats: compression noise around 0 and 255 in masks (see load_mask).
_LOSSY = ("JPEG", "MPO")
_INTEGER_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height

SPLITS = ("train", "val", "test")
AMBIGUOUS = "ambiguous label"  # in the reason of a duplicate found under several classes


class DatasetError(UserError):
    """The dataset folder cannot be used (missing, empty, a single class, ...)."""


class UnusableImage(UserError):
    """An image or mask file that decodes, but breaks a dataset rule (size, mode, values).

    A ValueError (through UserError), so callers that skip undecodable files skip these too.
    """

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


@contextmanager
def _opened(path: str | Path) -> Iterator[Image.Image]:
    """Image.open with the header checks done, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise UnusableImage(path, "too many pixels (decompression-bomb limit)") from error
        except Image.DecompressionBombWarning as error:
            raise UnusableImage(path, "too many pixels (above Image.MAX_IMAGE_PIXELS)") from error
        with image:
            problem = header_problem(image.size)
            if problem:
                raise UnusableImage(path, problem)
            yield image


def header_problem(size: tuple[int, int]) -> str | None:
    """Why an image of this (width, height) is refused before decoding, or None."""
    short, long = min(size), max(size)
    if short < MIN_SIDE:
        return f"too small ({size[0]}x{size[1]} px)"
    if long > MAX_ASPECT_RATIO * short:
        return (f"aspect ratio 1:{long / short:.0f} ({size[0]}x{size[1]} px) is above "
                f"1:{MAX_ASPECT_RATIO}: resized to the cache size it would take "
                f"{long / short:.0f}x the memory of a square image; crop it")
    return None


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode any image Pillow reads into 8-bit RGB, with its EXIF orientation applied.

    The one image loader of the project (cache, CLI, prepare's check). The header is checked
    first (``header_problem``, Pillow's pixel limit), then the mode is mapped by
    ``IMAGE_MODES``; a file that breaks a rule raises ``UnusableImage`` naming it.
    ``draft_size`` lets JPEG decode at a reduced scale (much faster) when the caller will
    downsample anyway.
    """
    with _opened(path) as image:
        if image.mode not in IMAGE_MODES:
            raise UnusableImage(path, f"unsupported image mode {image.mode}: save it as 8-bit "
                                      "RGB or grayscale")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        try:
            return _to_rgb(image)
        except ValueError as error:
            raise UnusableImage(path, str(error)) from error


def _composite_on_white(image: Image.Image) -> Image.Image:
    # Transparent pixels have undefined colour underneath: white is what a viewer shows.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _stretch(values: np.ndarray, low: float, high: float) -> Image.Image:
    """Gray values mapped linearly from [low, high] to [0, 255] (all 0 when high == low),
    rounded to the nearest level so that `high` lands on 255 exactly."""
    scale = 255.0 / (high - low) if high > low else 0.0
    gray = np.clip(np.rint((values.astype(np.float64) - low) * scale), 0, 255)
    return Image.fromarray(gray.astype(np.uint8)).convert("RGB")


def _integer_to_rgb(image: Image.Image) -> Image.Image:
    # 16/32-bit gray: 0 stays black and the brightest pixel becomes 255 (files often use 10 or
    # 12 of the 16 bits, so dividing by 65535 would give a near-black image); negative values
    # (32-bit only) move the black point down to the minimum.
    values = np.asarray(image)
    return _stretch(values, min(0, int(values.min())), max(0, int(values.max())))


def _float_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own F -> L conversion clips at 0..255, which turns the usual [0, 1] float image
    # black: values within [0, 1] are read as that range, anything else is stretched like an
    # integer image.
    values = np.asarray(image)
    if not np.isfinite(values).all():
        raise ValueError("float image with NaN or infinite pixels: replace them and save again")
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return _stretch(values, 0.0, 1.0)
    return _stretch(values, min(0.0, low), max(0.0, high))


def _palette_to_rgb(image: Image.Image) -> Image.Image:
    return _composite_on_white(image) if "transparency" in image.info else image.convert("RGB")


# How each mode becomes RGB; any other mode is refused. "1", L: gray. CMYK, YCbCr, LAB, HSV:
# Pillow's own conversions (CMYK by inversion, without a colour profile). Alpha modes: composited
# on white.
IMAGE_MODES = {
    **{mode: lambda image: image.convert("RGB")
       for mode in ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")},
    **{mode: _composite_on_white for mode in ("LA", "PA", "RGBA", "RGBa")},
    "P": _palette_to_rgb,
    **{mode: _integer_to_rgb for mode in _INTEGER_GRAY},
    "F": _float_to_rgb,
}


def _to_rgb(image: Image.Image) -> Image.Image:
    return IMAGE_MODES[image.mode](image)


def load_mask(path: str | Path) -> np.ndarray:
    """A foreground mask as a bool array (H, W), by the mask rule of the module docstring.

    Raises ``UnusableImage`` for a mode without a rule (CMYK, YCbCr, LAB, HSV) or a float mask
    with NaN or infinity.
    """
    with _opened(path) as mask:
        mask.load()
        return _foreground(mask, path)


def _foreground(mask: Image.Image, path: str | Path) -> np.ndarray:
    mode = mask.mode
    # Lossy files: JPEG noise makes background pixels 1..~30, so threshold at half range.
    level = 127 if mask.format in _LOSSY else 0
    if mode == "F":
        values = np.asarray(mask)
        if not np.isfinite(values).all():
            raise UnusableImage(path, "mask with NaN or infinite pixels")
        return values != 0
    if mode in ("1", "L", "P", *_INTEGER_GRAY):  # P: the index, whatever its colour
        return np.asarray(mask) > level
    if mode in ("LA", "PA", "RGB", "RGBX", "RGBA"):
        values = np.asarray(mask)
        colour = values[..., :1] if mode in ("LA", "PA") else values[..., :3]
        foreground = (colour > level).any(axis=-1)
        if mode in ("LA", "PA", "RGBA"):
            foreground &= values[..., -1] > 0  # fully transparent: background
        return foreground
    raise UnusableImage(path, f"mask mode {mode} has no foreground rule: save the mask as "
                              "grayscale (0 = background, non-zero = foreground)")


def _decode_problem(path: Path) -> str | None:
    """None if `path` decodes as a usable image, else a short reason."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        load_rgb(path, draft_size=64)
    except UnusableImage as error:
        return error.reason
    except Image.UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as error:
        return f"cannot decode: {str(error).splitlines()[0][:80]}"
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
    excluded: pd.DataFrame  # path, reason (images, class folders, then masks)
    missing_masks: int = 0
    mismatched_masks: int = 0  # masks of another size than their image (image kept, no mask)
    counts: dict[str, int] = field(default_factory=dict)  # duplicates and mask rule reports


@dataclass(frozen=True)
class _Candidate:
    path: Path
    relative: str
    label: str


def index_folder(root: str | Path, masks_root: str | Path | None = None) -> IndexResult:
    """Index a one-folder-per-class dataset: every usable image, with its mask if any.

    Every image is decoded (JPEG in draft mode), duplicates are resolved by the module's rule
    and every mask is decoded and checked here, before any training: the stages after prepare
    only meet images and masks that passed.
    """
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
    undecodable: dict[str, list[tuple[str, str]]] = {d.name: [] for d in class_dirs}
    candidates = []
    for class_dir in class_dirs:
        for path in _files_below(class_dir):
            relative = path.relative_to(root).as_posix()
            problem = _decode_problem(path)
            if problem:
                undecodable[class_dir.name].append((relative, problem))
            else:
                candidates.append(_Candidate(path, relative, class_dir.name))
    duplicates = duplicate_reasons(candidates)
    rows, excluded, mask_report = [], [], _MaskReport()
    for class_dir in class_dirs:
        name = class_dir.name
        mine = [c for c in candidates if c.label == name]
        excluded += undecodable[name] + [(c.relative, duplicates[c.relative])
                                         for c in mine if c.relative in duplicates]
        kept = [c for c in mine if c.relative not in duplicates]
        for candidate in kept:
            mask_path = (mask_report.pair(candidate.path, root, masks_root)
                         if masks_root is not None else "")
            rows.append((candidate.relative, name, mask_path))
        if not kept:  # listed, so a class that vanished is not a silent surprise
            excluded.append((f"{name}/", "class folder without decodable images" if not mine
                             else "class folder without usable images (all duplicates)"))
    index = pd.DataFrame(rows, columns=["path", "label", "mask_path"])
    if index.empty:
        # excluded.csv is not written on error: the first reason says why in the message.
        first = f": {len(excluded)} excluded, first {excluded[0][0]} ({excluded[0][1]})"
        raise DatasetError(f"dataset folder {root} contains no decodable images it can use"
                           + (first if excluded else ""))
    counts = {
        "duplicates_ambiguous_label": sum(AMBIGUOUS in r for r in duplicates.values()),
        "duplicates_within_class": sum(AMBIGUOUS not in r for r in duplicates.values()),
        "undecodable_masks": mask_report.undecodable,
        "masks_all_background": mask_report.all_background,
        "masks_all_foreground": mask_report.all_foreground,
    }
    return IndexResult(index, pd.DataFrame(excluded + mask_report.excluded,
                                           columns=["path", "reason"]),
                       mask_report.missing, mask_report.mismatched, counts)


def content_hash(path: str | Path) -> str:
    """Hex digest of a file's bytes: the identity of an image for duplicate detection here and
    for "the query itself" in `retrieval search`, whatever its path."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def duplicate_reasons(candidates: list[_Candidate]) -> dict[str, str]:
    """{relative path: reason} of the images the duplicate rule excludes.

    Identity is the file's bytes (a hash), so symlinks, hardlinks and copies are all caught; the
    reason says "same file" when both paths lead to one inode, "same content" otherwise.
    """
    groups: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(content_hash(candidate.path), []).append(candidate)
    reasons = {}
    for group in (g for g in groups.values() if len(g) > 1):
        if len({c.label for c in group}) > 1:
            for candidate in group:
                other = next(c for c in group if c.label != candidate.label)
                reasons[candidate.relative] = (
                    f"{_sameness(candidate, other)} {other.relative} under class {other.label}: "
                    f"{AMBIGUOUS}, excluded from every class")
        else:
            first = group[0]  # candidates are in sorted path order
            for candidate in group[1:]:
                reasons[candidate.relative] = (
                    f"duplicate: {_sameness(candidate, first)} {first.relative} in the same "
                    "class, which is kept")
    return reasons


def _sameness(a: _Candidate, b: _Candidate) -> str:
    return "same file as" if a.path.samefile(b.path) else "same content as"


@dataclass
class _MaskReport:
    """Pairs images with masks and counts what it finds."""

    missing: int = 0
    mismatched: int = 0
    undecodable: int = 0
    all_background: int = 0
    all_foreground: int = 0
    excluded: list[tuple[str, str]] = field(default_factory=list)

    def pair(self, image_path: Path, root: Path, masks_root: Path) -> str:
        """The image's mask path (relative to masks_root), or "" if it has no usable mask."""
        mask = find_mask(image_path, root, masks_root)
        if mask is None:
            self.missing += 1
            return ""
        relative = mask.relative_to(masks_root).as_posix()
        of = f"mask of {image_path.relative_to(root).as_posix()}"
        try:
            with _opened(mask) as header:
                mask_size = header.size
        except UnusableImage as error:
            return self._unusable(relative, f"{of}: {error.reason}")
        except (OSError, SyntaxError, ValueError) as error:
            return self._unusable(relative, f"{of} cannot be decoded: {_first_line(error)}")
        image_size = displayed_size(image_path)
        if mask_size != image_size:
            self.mismatched += 1
            self.excluded.append((relative, f"{of}: {mask_size[0]}x{mask_size[1]} px, the image "
                                            f"is {image_size[0]}x{image_size[1]} px; image kept "
                                            "without a mask"))
            return ""
        try:
            foreground = load_mask(mask)
        except UnusableImage as error:
            return self._unusable(relative, f"{of}: {error.reason}")
        except (OSError, SyntaxError, ValueError) as error:
            return self._unusable(relative, f"{of} cannot be decoded: {_first_line(error)}")
        self.all_background += not foreground.any()
        self.all_foreground += bool(foreground.all())
        return relative

    def _unusable(self, relative: str, reason: str) -> str:
        self.undecodable += 1
        self.excluded.append((relative, f"{reason}; image kept without a mask"))
        return ""


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:80] if str(error) else type(error).__name__


def find_mask(image_path: Path, root: Path, masks_root: Path) -> Path | None:
    """The mask file of an image: same relative folder and stem, any extension."""
    relative = image_path.relative_to(root)
    folder = masks_root / relative.parent
    # glob.escape: a stem like "d[1]" is a pattern that would match the mask of "d1".
    candidates = sorted(folder.glob(glob.escape(relative.stem) + ".*")) if folder.is_dir() else []
    return candidates[0] if candidates else None


def displayed_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as load_rgb returns it, read from the header (EXIF rotation applied)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


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
    from retrieval import outputs

    location = outputs.read_json(dataset_json)
    with outputs.reading(dataset_json):
        root, masks = Path(location["root"]), Path(location["masks"]) if location["masks"] else None
    table = outputs.read_table(split_csv, ("path", "label", "split", "mask_path"),
                               keep_default_na=False, dtype=str)
    table["file"] = [str(root / p) for p in table["path"]]
    table["mask_file"] = [str(masks / m) if masks and m else "" for m in table["mask_path"]]
    return table
