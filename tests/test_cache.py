"""The decoded-image cache: built once, content-addressed, identical to the PIL evaluation path."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval import cache as cache_module
from retrieval.cache import ImageCache, cache_key
from retrieval.data import load_rgb
from retrieval.transforms import (
    NORMALIZATIONS,
    cache_size,
    eval_crop,
    eval_pil_transform,
    normalize,
)

IMAGENET = NORMALIZATIONS["imagenet"]

IMAGE_SIZE = 32
SIDE = cache_size(IMAGE_SIZE)  # round(32 * 8 / 7) = round(36.57) = 37


def noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Small images (short side < 2 * 37, so JPEG draft decoding changes nothing) in odd modes."""
    folder = tmp_path / "images"
    folder.mkdir()
    noise(60, 40, 0).save(folder / "wide.png")
    noise(40, 70, 1).save(folder / "tall.jpg")
    noise(50, 50, 2, "L").save(folder / "gray.png")
    noise(20, 30, 3).convert("CMYK").save(folder / "small cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated a quarter turn
    noise(64, 40, 4).save(folder / "rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


def cache_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_build_decodes_into_one_uint8_file(images, tmp_path):
    directory = tmp_path / "cache"
    cache = ImageCache.build(images, IMAGE_SIZE, directory, workers=0, progress=False)
    key = cache_key(images, IMAGE_SIZE)
    assert cache_files(directory) == [f"images-{key}.json", f"images-{key}.u8"]  # no .tmp
    assert len(cache) == 5 and cache.size == SIDE
    assert cache.batch([0, 1]).shape == (2, 3, SIDE, SIDE)
    assert cache.batch([0]).dtype == torch.uint8
    assert (directory / f"images-{key}.u8").stat().st_size == 5 * 3 * SIDE * SIDE
    meta = json.loads((directory / f"images-{key}.json").read_text())
    data = (directory / f"images-{key}.u8").read_bytes()
    assert meta == {"images": 5, "shape": [5, 3, SIDE, SIDE], "image_size": IMAGE_SIZE,
                    "bytes": len(data), "crc32": zlib.crc32(data)}  # verified on every open


def test_batch_keeps_the_order_asked_for(images, tmp_path):
    cache = ImageCache.build(images, IMAGE_SIZE, tmp_path / "cache", workers=0, progress=False)
    assert torch.equal(cache.batch([3, 0]), torch.stack([cache[3], cache[0]]))


def test_second_build_loads_without_decoding(images, tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    first = ImageCache.build(images, IMAGE_SIZE, directory, workers=0, progress=False)
    file = directory / f"images-{cache_key(images, IMAGE_SIZE)}.u8"
    mtime = file.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second build decoded the images again")

    monkeypatch.setattr(cache_module, "_decode_into", no_decoding)
    second = ImageCache.build(images, IMAGE_SIZE, directory, workers=0, progress=False)
    assert file.stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(first.array), np.asarray(second.array))


def test_cached_crop_equals_the_pil_evaluation_path(images, tmp_path):
    cache = ImageCache.build(images, IMAGE_SIZE, tmp_path / "cache", workers=0, progress=False)
    from_cache = normalize(eval_crop(IMAGE_SIZE)(cache.batch(list(range(len(images))))),
                           IMAGENET)
    for i, path in enumerate(images):
        from_pil = eval_pil_transform(IMAGE_SIZE, IMAGENET)(load_rgb(path))
        assert from_pil.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.equal(from_pil, from_cache[i]), path.name


def test_large_jpegs_match_when_loaded_with_the_same_draft(tmp_path):
    # 400 x 300 with cache side 37: libjpeg decodes at 1/8 (min(400 // 37, 300 // 37) = 8), so
    # the PIL path matches the cache only when it loads with the same draft size.
    path = tmp_path / "large.jpg"
    noise(40, 30, 5).resize((400, 300), Image.BILINEAR).save(path)
    cache = ImageCache.build([path], IMAGE_SIZE, tmp_path / "cache", workers=0, progress=False)
    from_pil = eval_pil_transform(IMAGE_SIZE, IMAGENET)(load_rgb(path, draft_size=SIDE))
    assert torch.equal(from_pil, normalize(eval_crop(IMAGE_SIZE)(cache.batch([0])), IMAGENET)[0])


def test_key_follows_content_size_and_order_not_names(images, tmp_path):
    key = cache_key(images, IMAGE_SIZE)
    assert cache_key(images, IMAGE_SIZE + 1) != key
    assert cache_key(images[::-1], IMAGE_SIZE) != key  # the array is in path order
    copy = tmp_path / "copy.png"
    copy.write_bytes(images[0].read_bytes())
    assert cache_key([copy, *images[1:]], IMAGE_SIZE) == key  # same bytes, same cache

    directory = tmp_path / "cache"
    before = ImageCache.build(images, IMAGE_SIZE, directory, workers=0, progress=False)
    noise(60, 40, 99).save(images[0])  # new content under the same name
    assert cache_key(images, IMAGE_SIZE) != key
    after = ImageCache.build(images, IMAGE_SIZE, directory, workers=0, progress=False)
    assert len(list(directory.glob("*.u8"))) == 2
    assert not torch.equal(before[0], after[0])
    assert torch.equal(before.batch([1, 2, 3, 4]), after.batch([1, 2, 3, 4]))


def test_failed_build_leaves_nothing_behind(images, tmp_path):
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_text("not an image")
    directory = tmp_path / "cache"
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        ImageCache.build([*images, broken], IMAGE_SIZE, directory, workers=0, progress=False)
    assert cache_files(directory) == []  # neither a half-written cache nor a .tmp
