"""Handwritten digits that need no network: scikit-learn's bundled ``load_digits``.

1,797 images of 8×8 pixels in 10 classes (the UCI "Optical Recognition of Handwritten Digits"
test set, 16 grey levels), shipped inside scikit-learn, so ``data.source: digits`` works offline
where MNIST's download would fail. ``write`` lays them out as any folder dataset:

    out_dir/images/<digit>/<NNNN>.png   8-bit grey, white strokes on black (as MNIST), 8×8

The images stay 8×8 on disk and are upsampled to ``data.image_size`` at load time, like the
images of any folder. The files are a pure function of the scikit-learn data: same bytes on
every run. MNIST itself, or any other digits folder, works through ``data.source: folder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from retrieval.outputs import atomic_folder

GREY_LEVELS = 16  # load_digits counts ink in 4×4 blocks of a 32×32 bitmap: values 0..16


def images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 images (N, 8, 8), 0 = no ink, 255 = full ink, and their labels (N,)."""
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / GREY_LEVELS)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def write(out_dir: str | Path) -> dict[str, int]:
    """Write every digit as a PNG under ``out_dir/images/<digit>/`` (replacing ``out_dir`` whole,
    atomically); returns the number of images per class."""
    images, labels = images_and_labels()
    counts: dict[str, int] = {}
    with atomic_folder(out_dir) as partial:
        for position, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = partial / "images" / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            # Pillow writes no time stamp into a PNG: same pixels, same bytes.
            Image.fromarray(image, mode="L").save(folder / f"{position:04d}.png", format="PNG")
            counts[str(label)] = counts.get(str(label), 0) + 1
    return counts
