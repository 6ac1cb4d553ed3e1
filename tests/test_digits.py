"""The bundled-digits source: scikit-learn's 8×8 handwritten digits as a folder dataset."""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from retrieval import data, digits, sources
from retrieval.config import DataConfig


def _digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the digits source must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_digits_are_ten_class_folders_of_every_bundled_image(tmp_path, no_network):
    counts = digits.write(tmp_path / "out")
    bunch = load_digits()
    expected = {str(d): int((bunch.target == d).sum()) for d in range(10)}
    assert counts == expected and sum(counts.values()) == 1797
    images = tmp_path / "out" / "images"
    assert sorted(p.name for p in images.iterdir()) == [str(d) for d in range(10)]
    for digit, count in expected.items():
        assert len(list((images / digit).glob("*.png"))) == count


def test_digit_pixels_are_the_sklearn_values_scaled_to_8_bits(tmp_path):
    digits.write(tmp_path / "out")
    bunch = load_digits()
    for position in (0, 17, 1796):
        label = bunch.target[position]
        with Image.open(tmp_path / "out" / "images" / str(label) / f"{position:04d}.png") as image:
            assert image.mode == "L" and image.size == (8, 8)
            pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, np.rint(bunch.images[position] * 255 / 16))
    assert pixels.max() > 200 and pixels.min() == 0  # white ink on black, the full range


def test_digits_are_byte_identical_across_writes_and_replace_the_folder(tmp_path):
    digits.write(tmp_path / "a")
    (tmp_path / "a" / "stale.txt").write_text("left over")
    digits.write(tmp_path / "a")  # replaced whole: nothing stale survives
    digits.write(tmp_path / "b")
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no partial folders


def test_digits_source_is_indexed_like_any_folder(tmp_path, no_network):
    location = sources.locate_dataset(DataConfig(source="digits"), None, None,
                                      tmp_path / "sample", seed=0)
    assert location.masks is None
    result = data.index_folder(location.root, location.masks)
    assert len(result.index) == 1797 and result.index["label"].nunique() == 10
    assert result.excluded.empty and (result.index["mask_path"] == "").all()


def test_folder_source_only_points_at_the_users_folder(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    location = sources.locate_dataset(DataConfig(source="folder", root=str(root)), root, None,
                                      tmp_path / "sample", seed=0)
    assert location.root == root and not (tmp_path / "sample").exists()


def test_a_source_is_one_registry_entry_matching_the_config():
    from typing import get_args, get_type_hints

    allowed = get_args(get_type_hints(DataConfig)["source"])
    assert tuple(sources.SOURCES) == allowed
