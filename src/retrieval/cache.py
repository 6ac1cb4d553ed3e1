"""Decode every image once: a content-addressed, memory-mapped uint8 cache.

JPEG decoding and resizing cost more than a small model's forward pass on a CPU, and every
stage and epoch reads the same images. So the first stage that needs them decodes all images of
the split table into one (N, 3, S, S) uint8 array on disk (S = cache_size(image_size)), keyed by
the files' contents and the size; later stages, epochs and experiments memory-map it.
Writes go to a temporary file renamed into place, so concurrent experiments and killed runs
never see half a cache.

Every cache file has a JSON record beside it (its size and CRC-32), written before the file is
renamed into place, and is verified on every open: a missing, truncated or garbled file is
rebuilt with a one-line warning, never used. CRC-32 costs about 0.5 s per GB from the page cache
(0.32 s for 700 MB on the 2-core test machine; BLAKE2b: 0.83 s), small next to decoding.
The image file's space is reserved before it is memory-mapped, so a full disk is an OSError
(a one-line StorageError), never a SIGBUS.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.data import load_rgb
from retrieval.outputs import atomic_path, write_json
from retrieval.progress import Progress
from retrieval.transforms import cache_size, decode_transform

# Bump when load_rgb or decode_transform changes what a file decodes to. 2: load_rgb maps
# 16-bit, 32-bit and float images by rule (issue 16), rounding instead of truncating.
_FORMAT_VERSION = "2"


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
        array = _open_verified(file, shape)
        if array is None:
            _decode_into(file, paths, image_size, shape, workers, progress)
            array = np.memmap(file, dtype=np.uint8, mode="r", shape=shape)
        return cls(array, key)


def record_of(file: Path) -> Path:
    """The JSON record (size, CRC-32) beside a cache file."""
    return file.with_suffix(".json")


def _crc32(data: object, running: int = 0) -> int:
    return zlib.crc32(data, running)  # type: ignore[arg-type]  # any buffer: bytes, an array


def _problem(file: Path, size: int | None = None) -> tuple[str | None, int]:
    """Why ``file`` cannot be trusted (None: it can, so far as its size goes), from its record,
    and the CRC-32 the record holds. ``size`` is the size its shape implies, where known."""
    record_file = record_of(file)
    if not file.exists():
        return ("missing (its record is there)" if record_file.exists() else "absent"), 0
    try:
        record = json.loads(record_file.read_text())
        recorded, crc = int(record["bytes"]), int(record["crc32"])
    except FileNotFoundError:
        return f"unverifiable (no record {record_file.name})", 0
    except KeyError:
        return (f"unverifiable (its record {record_file.name} has no checksum: an older "
                "version)"), 0
    except (ValueError, TypeError):
        return f"unverifiable (its record {record_file.name} is unreadable)", 0
    actual = file.stat().st_size
    expected = recorded if size is None else size
    if actual != recorded or actual != expected:
        return f"truncated or overwritten ({actual} bytes, {expected} expected)", 0
    return None, crc


def _checked(data: object, recorded: int) -> str | None:
    """None when ``data`` (the file's bytes) has the recorded CRC-32, else why not."""
    return None if _crc32(data) == recorded else "garbled (checksum mismatch)"


def _warn_rebuild(kind: str, file: Path, problem: str) -> None:
    print(f"warning: {kind} {file} is {problem}: rebuilding it", file=sys.stderr)


def _open_verified(file: Path, shape: tuple) -> np.ndarray | None:
    """The memory-mapped image cache if it is whole and unchanged, else None (after a warning
    when there was one to distrust). The checksum runs over the mapping that is returned."""
    problem, crc = _problem(file, int(np.prod(shape)))
    if problem is None:
        array = np.memmap(file, dtype=np.uint8, mode="r", shape=shape)
        problem = _checked(array, crc)
        if problem is None:
            return array
        del array
    if problem != "absent":
        _warn_rebuild("image cache", file, problem)
    return None


def _write_record(file: Path, temp: Path, crc: int, extra: dict | None = None) -> None:
    """The record of ``temp`` (its bytes have CRC-32 ``crc``), the future ``file``: written
    first, so that a reader who sees the new file also sees its record (an old record over a
    new file only causes a rebuild)."""
    write_json(record_of(file), {**(extra or {}), "bytes": temp.stat().st_size, "crc32": crc})


def _reserve(temp: Path, size: int) -> None:
    """Allocate ``size`` bytes now: a memory-mapped write past a full disk is a SIGBUS."""
    descriptor = os.open(temp, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(descriptor, size)  # a file system without allocation: best effort
    finally:
        os.close(descriptor)


def _decode_into(file: Path, paths: list[Path], image_size: int, shape: tuple,
                 workers: int | None, progress: bool) -> None:
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(_DecodeDataset(paths, image_size), batch_size=64, num_workers=workers)
    with atomic_path(file) as temp:
        _reserve(temp, int(np.prod(shape)))
        array = np.memmap(temp, dtype=np.uint8, mode="r+", shape=shape)
        start, crc = 0, 0
        with Progress(desc="decode images (once)", total=len(paths), unit="image",
                      disable=not progress) as bar:
            for batch in loader:
                pixels = np.ascontiguousarray(batch.numpy())
                array[start:start + len(batch)] = pixels
                crc = _crc32(pixels, crc)  # batches arrive in file order: no second pass
                start += len(batch)
                bar.update(len(batch))
        array.flush()
        del array
        _write_record(file, temp, crc, {"images": len(paths), "shape": list(shape),
                                        "image_size": image_size})


def images_for(files: list[str], image_size: int, progress: bool = True) -> ImageCache:
    """The shared cache of these image files (decoded on first use, by any stage)."""
    from retrieval.workspace import cache_dir

    return ImageCache.build([Path(f) for f in files], image_size, cache_dir() / "images",
                            progress=progress)


def array_for(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """A computed array cached under `name` (which must encode everything it depends on)."""
    from retrieval.workspace import cache_dir

    file = cache_dir() / "arrays" / f"{name}.npy"
    problem, crc = _problem(file)
    if problem is None:
        data = file.read_bytes()
        problem = _checked(data, crc)
        if problem is None:
            try:  # allow_pickle=False: a cache file holding pickled objects is refused, not run
                return np.load(io.BytesIO(data), allow_pickle=False)
            except (OSError, ValueError, EOFError):
                problem = "not an array file"
    if problem != "absent":
        _warn_rebuild("array cache", file, problem)
    array = compute()
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_path(file) as temp:
        temp.write_bytes(buffer.getbuffer())
        _write_record(file, temp, _crc32(buffer.getbuffer()))
    return array
