import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from retrieval import synthetic
from retrieval.synthetic import class_names, generate, render

# --- class names -----------------------------------------------------------------------------


def test_class_names_are_prefixes_of_one_list_and_need_both_cues():
    every = class_names(synthetic.MAX_CLASSES)
    assert len(set(every)) == synthetic.MAX_CLASSES
    assert class_names(6) == every[:6]
    shapes = Counter(name.split("_")[0] for name in every)
    patterns = Counter(name.split("_")[1] for name in every)
    assert set(shapes) == set(synthetic.SHAPES) and set(shapes.values()) == {2}
    assert set(patterns) == set(synthetic.PATTERNS) and set(patterns.values()) == {4}
    # Already in the first 6 classes some share a shape and some a pattern.
    first = [name.split("_") for name in class_names(6)]
    assert len({shape for shape, _ in first}) < 6
    assert len({pattern for _, pattern in first}) < 6


# --- files -----------------------------------------------------------------------------------


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_sizes_and_summary(tmp_path):
    summary = generate(tmp_path / "data", n_classes=3, images_per_class=4, image_size=64)
    names = class_names(3)
    assert summary["classes"] == names
    assert summary["counts"] == {name: 4 for name in names}
    assert summary["n_images"] == 12
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["images", "masks"]
    for kind in ("images", "masks"):
        assert sorted(p.name for p in (tmp_path / "data" / kind).iterdir()) == sorted(names)
    for name in names:
        files = sorted(p.name for p in (tmp_path / "data" / "images" / name).iterdir())
        assert files == ["0000.png", "0001.png", "0002.png", "0003.png"]
        for file in files:
            image = Image.open(tmp_path / "data" / "images" / name / file)
            mask = Image.open(tmp_path / "data" / "masks" / name / file)
            assert (image.mode, image.size) == ("RGB", (64, 64))
            assert (mask.mode, mask.size) == ("L", (64, 64))
            values = np.asarray(mask)
            assert set(np.unique(values)) <= {0, 255}
            # The files hold exactly what render() draws.
            sample = render(name, int(file[:4]), image_size=64)
            np.testing.assert_array_equal(np.asarray(image), sample.image)
            np.testing.assert_array_equal(values == 255, sample.mask)
    # Nothing is left beside the dataset: the partial folder was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate(tmp_path / "a", n_classes=3, images_per_class=3, image_size=64, seed=7)
    generate(tmp_path / "b", n_classes=3, images_per_class=3, image_size=64, seed=7)
    generate(tmp_path / "c", n_classes=3, images_per_class=3, image_size=64, seed=8)
    a, b, c = (_hashes(tmp_path / name) for name in "abc")
    assert len(a) == 2 * first["n_images"]
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[key] != c[key] for key in a if key.startswith("images"))


def test_images_do_not_depend_on_how_many_are_generated(tmp_path):
    generate(tmp_path / "big", n_classes=3, images_per_class=3, image_size=64)
    generate(tmp_path / "small", n_classes=2, images_per_class=2, image_size=64)
    big, small = _hashes(tmp_path / "big"), _hashes(tmp_path / "small")
    assert small.items() <= big.items()


def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match=r"out_dir .* not empty: pass overwrite=True"):
        generate(out, n_classes=2, images_per_class=1, image_size=64)
    assert (out / "keep.txt").exists()

    generate(out, n_classes=2, images_per_class=1, image_size=64, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["images", "masks"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_an_empty_out_dir_is_fine(tmp_path):
    (tmp_path / "data").mkdir()
    generate(tmp_path / "data", n_classes=2, images_per_class=1, image_size=64)
    assert (tmp_path / "data" / "masks" / class_names(2)[1] / "0000.png").exists()


def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", n_classes=2, images_per_class=2, image_size=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_classes": 20}, r"^n_classes \(20\) must be between 2 and 16$"),
        ({"n_classes": 1}, r"^n_classes \(1\) must be between 2 and 16$"),
        ({"n_classes": 2.5}, r"^n_classes must be an integer, got 2.5$"),
        ({"images_per_class": 0}, r"^images_per_class \(0\) must be at least 1$"),
        ({"image_size": 16}, r"^image_size \(16\) must be between 32 and 512$"),
        ({"seed": -1}, r"^seed \(-1\) must be at least 0$"),
        ({"seed": True}, r"^seed must be an integer, got True$"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_render_rejects_an_unknown_class():
    with pytest.raises(ValueError, match=r"class_name \('star_plaid'\) is not a synthetic class"):
        render("star_plaid", 0)


# --- pixels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", class_names(synthetic.MAX_CLASSES))
def test_the_mask_is_exactly_the_object(name):
    for index in range(4):
        sample = render(name, index, image_size=128)
        assert sample.image.shape == (128, 128, 3) and sample.mask.shape == (128, 128)
        # One object of a sane size, in one piece (diagonal neighbours count: the tips are thin).
        assert 0.03 < sample.mask.mean() < 0.6
        assert ndimage.label(sample.mask, structure=np.ones((3, 3)))[1] == 1
        # Outside the mask the image is the background, pixel for pixel; inside it is not.
        outside, inside = ~sample.mask, sample.mask
        np.testing.assert_array_equal(sample.image[outside], sample.background[outside])
        change = np.abs(sample.image[inside].astype(int) - sample.background[inside]).sum(axis=1)
        assert (change > 30).mean() > 0.8, f"{name} {index}: the object hardly differs from behind"


# --- learnable, but not from colour ----------------------------------------------------------

N_CLASSES, PER_CLASS = 6, 40  # 240 images at 128 px: a couple of seconds


def _colour_histogram(image: np.ndarray) -> np.ndarray:
    bins = (image // 32).astype(int)  # 8 levels per channel
    codes = (bins[..., 0] * 8 + bins[..., 1]) * 8 + bins[..., 2]
    return np.bincount(codes.ravel(), minlength=512) / codes.size


def _shape_and_texture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rotation-invariant shape descriptors of the mask and texture statistics inside it."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    # Shape: the outline's distance from the centroid as a function of angle, 64 bins; the
    # magnitudes of its Fourier coefficients do not change when the object turns.
    edge_y, edge_x = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    bins = ((np.arctan2(edge_y - cy, edge_x - cx) + np.pi) / (2 * np.pi) * 64).astype(int) % 64
    outline = np.zeros(64)
    np.maximum.at(outline, bins, np.hypot(edge_y - cy, edge_x - cx))
    harmonics = np.abs(np.fft.rfft(outline / outline.mean()))[1:9] / 64
    holes = 1 - mask.sum() / ndimage.binary_fill_holes(mask).sum()
    fill = mask.sum() / (np.pi * outline.max() ** 2)

    # Texture: grey levels away from the outline.
    grey = image.astype(float) @ np.array([0.299, 0.587, 0.114])
    inner = ndimage.binary_erosion(mask, iterations=2)
    inner = inner if inner.sum() >= 20 else mask
    values = grey[inner]
    low, high = np.percentile(values, [10, 90])
    bright = grey > (low + high) / 2
    minority = min(bright[inner].mean(), 1 - bright[inner].mean())
    gy, gx = np.gradient(ndimage.gaussian_filter(grey, 1.0))
    jxx, jyy, jxy = (gx * gx)[inner].mean(), (gy * gy)[inner].mean(), (gx * gy)[inner].mean()
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9)  # 1 for stripes
    pieces = ndimage.label(bright & inner)[1] + ndimage.label(~bright & inner)[1]
    return np.concatenate(
        [harmonics, [holes, fill, (high - low) / 255, minority, coherence, np.log1p(pieces)]]
    )


def _accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    train = np.arange(len(labels)) % 2 == 0  # even indices train, odd ones test
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    model.fit(features[train], labels[train])
    return float((model.predict(features[~train]) == labels[~train]).mean())


@pytest.fixture(scope="module")
def small_set() -> tuple[list[synthetic.Sample], np.ndarray]:
    samples, labels = [], []
    for label, name in enumerate(class_names(N_CLASSES)):
        for index in range(PER_CLASS):
            samples.append(render(name, index, image_size=128))
            labels.append(label)
    return samples, np.array(labels)


def test_colour_histograms_are_near_chance(small_set):
    samples, labels = small_set
    accuracy = _accuracy(np.stack([_colour_histogram(s.image) for s in samples]), labels)
    chance = 1 / N_CLASSES
    print(f"colour-histogram accuracy {accuracy:.3f} (chance {chance:.3f})")
    assert accuracy < 2.5 * chance


def test_shape_and_texture_are_learnable(small_set):
    samples, labels = small_set
    features = np.stack([_shape_and_texture(s.image, s.mask) for s in samples])
    accuracy = _accuracy(features, labels)
    print(f"shape+texture accuracy {accuracy:.3f} (chance {1 / N_CLASSES:.3f})")
    assert accuracy > 0.8
