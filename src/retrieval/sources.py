"""Where ``data.source`` puts the images: the registry of dataset sources (``SOURCES``).

A source turns the data params into a one-folder-per-class image folder (and its parallel masks
folder, if any) that ``data.index_folder`` indexes:

    synthetic  the generated sample (shapes × patterns, with masks), written into data/prepared
    digits     scikit-learn's bundled 8×8 handwritten digits, written into data/prepared
    folder     the user's folder (``data.root``, ``data.masks``), only ever read

A new source is one entry here and one value in ``config.DataConfig.source``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.config import DataConfig


@dataclass(frozen=True)
class DatasetLocation:
    root: Path  # one folder per class
    masks: Path | None  # parallel masks folder, if any


def _synthetic(cfg: DataConfig, root: Path | None, masks: Path | None, out_dir: Path,
               seed: int) -> DatasetLocation:
    from retrieval import synthetic

    s = cfg.synthetic
    synthetic.generate(out_dir, n_classes=s.classes, images_per_class=s.images_per_class,
                       image_size=s.size, seed=seed, overwrite=True)
    return DatasetLocation(out_dir / "images", out_dir / "masks")


def _digits(cfg: DataConfig, root: Path | None, masks: Path | None, out_dir: Path,
            seed: int) -> DatasetLocation:
    from retrieval import digits

    digits.write(out_dir)
    return DatasetLocation(out_dir / "images", None)


def _folder(cfg: DataConfig, root: Path | None, masks: Path | None, out_dir: Path,
            seed: int) -> DatasetLocation:
    assert root is not None  # DataConfig.validate: data.root is set for the folder source
    return DatasetLocation(root, masks)


Locate = Callable[[DataConfig, "Path | None", "Path | None", Path, int], DatasetLocation]
SOURCES: dict[str, Locate] = {"synthetic": _synthetic, "digits": _digits, "folder": _folder}


def locate_dataset(cfg: DataConfig, root: Path | None, masks: Path | None, out_dir: Path,
                   seed: int) -> DatasetLocation:
    """The image (and mask) folders of ``cfg.source``; a generated source is written into
    ``out_dir`` (replaced whole), a user folder (``root``, ``masks``: resolved paths) is only
    read."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data.source {cfg.source!r}: expected one of "
                         f"{', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg, root, masks, out_dir, seed)
