"""Decode every image once: a content-addressed, memory-mapped uint8 cache.

JPEG decoding and resizing cost more than a small model's forward pass on a CPU, and every
stage and epoch reads the same images. So the first stage that needs them decodes all images of
the split table into one (N, 3, S, S) uint8 array on disk (S = cache_size(image_size)), keyed by
the files' contents and the size; later stages, epochs and experiments memory-map it.
Writes go to a temporary file renamed into place, so concurrent experiments and killed runs
never see half a cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from retrieval.data import load_rgb
from retrieval.outputs import atomic_path, write_json
from retrieval.transforms import cache_size, decode_transform

_FORMAT_VERSION = "1"  # bump when decode_transform changes


class _DecodeDataset(Dataset):
    def __init__(self, paths: list[Path], image_size: int):
        self.paths = paths
        self.image_size = image_size
        self.transform = decode_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale when the image is much larger.
        return self.transform(load_rgb(self.paths[i], draft_size=cache_size(self.image_size)))


def cache_key(paths: list[Path], image_size: int) -> str:
    digest = hashlib.sha256(f"{_FORMAT_VERSION}:{image_size}:{len(paths)}".encode())
    for path in paths:
        digest.update(hashlib.md5(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:24]


class ImageCache:
    """uint8 images (N, 3, S, S) in the order of the paths they were built from."""

    def __init__(self, array: np.ndarray, key: str = ""):
        self.array = array
        self.key = key  # content hash: identifies these exact images at this size

    def __len__(self) -> int:
        return len(self.array)

    @property
    def size(self) -> int:
        return self.array.shape[-1]

    def batch(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """(B, 3, S, S) uint8; indices are sorted on disk access by numpy's fancy indexing."""
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(indices)]))

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i]))

    @classmethod
    def build(cls, paths: list[Path], image_size: int, directory: Path,
              workers: int | None = None, progress: bool = True) -> ImageCache:
        """Load the cache for these images, decoding them first if no cache exists yet."""
        key = cache_key(paths, image_size)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / f"images-{key}.u8"
        side = cache_size(image_size)
        shape = (len(paths), 3, side, side)
        if not file.exists():
            _decode_into(file, paths, image_size, shape, workers, progress)
        return cls(np.memmap(file, dtype=np.uint8, mode="r", shape=shape), key)


def _decode_into(file: Path, paths: list[Path], image_size: int, shape: tuple,
                 workers: int | None, progress: bool) -> None:
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(_DecodeDataset(paths, image_size), batch_size=64, num_workers=workers)
    with atomic_path(file) as temp:
        array = np.memmap(temp, dtype=np.uint8, mode="w+", shape=shape)
        start = 0
        for batch in tqdm(loader, desc="decode images (once)", disable=not progress,
                          unit="batch"):
            array[start:start + len(batch)] = batch.numpy()
            start += len(batch)
        array.flush()
        del array
    write_json(file.with_suffix(".json"),
               {"images": len(paths), "shape": list(shape), "image_size": image_size})


def images_for(files: list[str], image_size: int, progress: bool = True) -> ImageCache:
    """The shared cache of these image files (decoded on first use, by any stage)."""
    from retrieval.workspace import cache_dir

    return ImageCache.build([Path(f) for f in files], image_size, cache_dir() / "images",
                            progress=progress)


def array_for(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """A computed array cached under `name` (which must encode everything it depends on)."""
    from retrieval.workspace import cache_dir

    file = cache_dir() / "arrays" / f"{name}.npy"
    if file.exists():
        try:  # allow_pickle=False: a cache file holding pickled objects is refused, not run
            return np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            pass  # unreadable or tampered with: recompute and replace it
    array = compute()
    with atomic_path(file) as temp, open(temp, "wb") as stream:
        np.save(stream, array)
    return array
