"""Row 4: data loading in the first epoch (JPEG decode into the cache) vs the second (memmap).

Epoch 1 builds the cache in a fresh folder (content hash of the files, decode + resize with the
default DataLoader workers, write) and then reads every image back in shuffled batches, as
training does. Epoch 2 opens the cache again as a later stage would (content hash, memory map)
and reads the same batches. No model runs: this is the data-loading time alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common
import numpy as np

from retrieval.cache import ImageCache


def epoch(paths: list[Path], size: int, folder: Path, batch_size: int = 32) -> float:
    started = time.perf_counter()
    images = ImageCache.build(paths, size, folder, progress=False)
    order = np.random.default_rng(0).permutation(len(images))
    for start in range(0, len(order), batch_size):
        images.batch(np.sort(order[start:start + batch_size]))
    return time.perf_counter() - started


def run(quick: bool, workdir: Path) -> common.Result:
    n, size = (64, 64) if quick else (1024, 224)
    paths = common.image_paths(n, seed=4, workdir=workdir)
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        first = epoch(paths, size, Path(folder))
        second = epoch(paths, size, Path(folder))
    ratio = second / first
    return common.Result(
        row=4, name="image_cache",
        what="Image cache: 2nd epoch's data-loading time ÷ 1st epoch's",
        conditions=(f"{n} Caltech-101 JPEGs at {size} px (cache side {round(size * 8 / 7)}), "
                    "shuffled batches of 32; epoch 2 re-opens the cache (content hash + memmap) "
                    "like a later stage"),
        figure=f"{ratio:.3f} ({second:.2f} s / {first:.1f} s)",
        target="≤ 0.10", passed=ratio <= 0.10,
        details={"ratio": ratio, "first_s": first, "second_s": second,
                 "first_images_per_s": n / first})
