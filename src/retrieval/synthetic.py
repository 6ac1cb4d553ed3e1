"""The bundled sample dataset: one textured shape per image over a cluttered background.

A class is a (shape, pattern) pair such as ``star_checker``. Every image holds exactly one object
of its class at a random position, size and rotation (the pattern has its own random orientation
and scale), over a background of colour gradients, mottled noise, soft blobs and thin lines.
Colours are drawn per image from one distribution for objects and background alike, so a colour
histogram says nothing about the class; only shape and pattern do.

The data is generated, never committed: ``generate`` writes

    out_dir/images/<class_name>/<NNNN>.png   RGB
    out_dir/masks/<class_name>/<NNNN>.png    8-bit L, 255 on the object's pixels, 0 elsewhere

Each image comes from its own generator seeded with (seed, class, index), so the files do not
depend on the order of generation, and a dataset with fewer classes or images per class is an
exact subset of a bigger one with the same seed.
"""

import colorsys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from retrieval.outputs import atomic_folder

SHAPES = ("disc", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
PATTERNS = ("stripes", "checker", "dots", "solid")

# Each shape comes with two patterns and each pattern with four shapes, so neither cue alone
# names the class. The order makes every prefix mix both: the first 6 already hold two discs, two
# checkers and two dotted shapes, and the first 10 hold all eight shapes.
_CLASSES = (
    ("disc", "stripes"),
    ("square", "checker"),
    ("triangle", "solid"),
    ("hexagon", "dots"),
    ("disc", "dots"),
    ("star", "checker"),
    ("cross", "stripes"),
    ("ring", "solid"),
    ("crescent", "checker"),
    ("square", "dots"),
    ("triangle", "stripes"),
    ("star", "solid"),
    ("hexagon", "stripes"),
    ("cross", "dots"),
    ("ring", "checker"),
    ("crescent", "solid"),
)
MIN_CLASSES, MAX_CLASSES = 2, len(_CLASSES)
# Shapes and patterns read clearly from 96 px up; 32 px still works for quick pipeline tests.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 512

# The object covers 5-22% of the image (log-uniform), whatever its shape: its area is no cue.
_AREA_FRACTION = (0.15, 0.4)  # object area / image area: large enough to learn from scratch
_MIN_CONTRAST = 80.0  # RGB distance between each object colour and the background under it
_MIN_PATTERN_CONTRAST = 60.0  # luminance gap between a pattern's two colours: visible in grey too
_NOISE_SIGMA = 4.0


@dataclass(frozen=True)
class Sample:
    """One rendered image; ``background`` is the same image without the object."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True exactly on the object's pixels
    background: np.ndarray  # (H, W, 3) uint8, equal to ``image`` outside the mask


def class_names(n_classes: int = 10) -> list[str]:
    """The first ``n_classes`` class names, e.g. ``["disc_stripes", "square_checker", ...]``."""
    _check_int("n_classes", n_classes, MIN_CLASSES, MAX_CLASSES)
    return [f"{shape}_{pattern}" for shape, pattern in _CLASSES[:n_classes]]


def render(class_name: str, index: int, image_size: int = 128, seed: int = 0) -> Sample:
    """Render image ``index`` of ``class_name``: the same arguments always give the same pixels."""
    names = class_names(MAX_CLASSES)
    if class_name not in names:
        raise ValueError(
            f"class_name ({class_name!r}) is not a synthetic class: expected one of "
            f"{', '.join(names)}"
        )
    _check_int("index", index, 0, None)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    _check_int("seed", seed, 0, None)
    class_index = names.index(class_name)
    shape, pattern = _CLASSES[class_index]
    rng = np.random.default_rng([seed, class_index, index])

    background = _background(rng, image_size)  # (S, S, 3) float
    x, y = _pixel_grid(image_size)
    radius, cx, cy, angle = _pose(rng, shape, image_size)
    dx, dy = x - cx, y - cy
    u, v = _rotate(dx, dy, angle)
    mask = _largest_piece(_shape_mask(shape, u / radius, v / radius))
    colours = _object_colours(rng, background[mask].mean(axis=0), pattern)
    obj = _paint(rng, pattern, colours, dx, dy, radius)

    # One noise field over both, so that outside the mask the image equals the background.
    noise = _NOISE_SIGMA * rng.standard_normal(background.shape, dtype=np.float32)
    behind = _to_uint8(background + noise)
    image = np.where(mask[..., None], _to_uint8(obj + noise), behind)
    return Sample(image=image, mask=mask, background=behind)


def generate(
    out_dir: Path,
    n_classes: int = 10,
    images_per_class: int = 48,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the dataset into ``out_dir`` (replaced whole if ``overwrite``); return a summary.

    The files are written into a hidden sibling folder that is renamed into place at the end, so
    an interrupted run never leaves half a dataset behind.
    """
    names = class_names(n_classes)
    _check_int("images_per_class", images_per_class, 1, None)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    _check_int("seed", seed, 0, None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"out_dir ({out_dir}) exists and is not a folder: remove it or pick another"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir ({out_dir}) exists and is not empty: pass overwrite=True to replace it"
        )

    with atomic_folder(out_dir) as partial:
        for name in names:
            image_dir, mask_dir = partial / "images" / name, partial / "masks" / name
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for index in range(images_per_class):
                sample = render(name, index, image_size, seed)
                _save_png(sample.image, image_dir / f"{index:04d}.png")
                _save_png(sample.mask.astype(np.uint8) * 255, mask_dir / f"{index:04d}.png")
    return {
        "classes": names,
        "counts": {name: images_per_class for name in names},
        "n_images": len(names) * images_per_class,
        "image_size": image_size,
        "seed": seed,
    }


# --- arguments and files ---------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    # bool is an int subclass, but n_classes=True is a typo, not a request for one class.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if high is None and value < low:
        raise ValueError(f"{name} ({value}) must be at least {low}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} ({value}) must be between {low} and {high}")


def _save_png(array: np.ndarray, path: Path) -> None:
    # Pillow writes no time stamp or other metadata into a PNG: same pixels, same bytes.
    Image.fromarray(array).save(path, format="PNG")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


# --- geometry --------------------------------------------------------------------------------


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size, dtype=np.float32) + np.float32(0.5)
    x, y = np.meshgrid(centres, centres)  # (S, S) each, x along columns
    return x, y


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame turned by ``angle``, i.e. the points turned by ``-angle``."""
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _regular_polygon(n: int, start: float = np.pi / 2) -> np.ndarray:
    angles = start + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2), circumradius 1


def _star(points: int, inner: float) -> np.ndarray:
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _plus(half_width: float) -> np.ndarray:
    w, arm = half_width, np.sqrt(1 - half_width**2)  # arm corners on the unit circle
    quarter = np.array([(arm, -w), (arm, w), (w, w)])  # one arm's end and the corner after it
    # Each copy turned a quarter further counter-clockwise, so the vertices stay in boundary order.
    turns = [_rotate(quarter[:, 0], quarter[:, 1], -k * np.pi / 2) for k in range(4)]
    return np.concatenate([np.stack(turn, axis=1) for turn in turns])


# Vertices of the polygon shapes, in order along the boundary, all on or inside the unit circle.
_POLYGONS = {
    "square": _regular_polygon(4, np.pi / 4),
    "triangle": _regular_polygon(3),
    "hexagon": _regular_polygon(6),
    "star": _star(5, 0.45),
    "cross": _plus(0.32),
}


def _inside_polygon(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd test: a point is inside when a ray to its right crosses the boundary oddly often."""
    inside = np.zeros(u.shape, dtype=bool)
    for (u1, v1), (u2, v2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if v1 == v2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        spans = (v1 > v) != (v2 > v)
        inside ^= spans & (u < u1 + (v - v1) * (u2 - u1) / (v2 - v1))
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in unit coordinates (circumradius 1, centred on the origin)."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.5, v) >= 0.8)
    return _inside_polygon(_POLYGONS[shape], u, v)


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """Drop stray pixels: sampled at pixel centres, the thin tip of a crescent can break off."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


@cache
def _unit_area(shape: str) -> float:
    """Area of ``shape`` at circumradius 1, measured on a fine grid once per shape."""
    grid = (np.arange(400) + 0.5) / 200 - 1
    u, v = np.meshgrid(grid, grid)
    return float(_shape_mask(shape, u, v).mean() * 4.0)


def _pose(rng: np.random.Generator, shape: str, size: int) -> tuple[float, float, float, float]:
    """Circumradius, centre and rotation of the object, wholly inside the image."""
    fraction = np.exp(rng.uniform(*np.log(_AREA_FRACTION)))
    radius = min(np.sqrt(fraction * size * size / _unit_area(shape)), 0.45 * size)
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    return float(radius), float(cx), float(cy), float(rng.uniform(0, 2 * np.pi))


# --- colours, patterns and background --------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """One RGB colour in 0..255; objects and background draw from this same distribution."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.15, 1), rng.uniform(0.15, 1)
    return 255 * np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _object_colours(
    rng: np.random.Generator, behind: np.ndarray, pattern: str
) -> tuple[np.ndarray, np.ndarray]:
    """Two colours (the same twice for ``solid``) that stand out from the mean colour behind."""
    best, best_score = None, -np.inf
    for _ in range(100):
        first, second = _random_colour(rng), _random_colour(rng)
        if pattern == "solid":
            second = first
        gap = min(np.linalg.norm(first - behind), np.linalg.norm(second - behind))
        lum_gap = (
            _MIN_PATTERN_CONTRAST
            if pattern == "solid"
            else abs(_luminance(first) - _luminance(second))
        )
        score = min(gap / _MIN_CONTRAST, lum_gap / _MIN_PATTERN_CONTRAST)
        if score >= 1.0:
            return first, second
        if score > best_score:
            best, best_score = (first, second), score
    return best  # rare: a background so varied that no draw passed; keep the clearest one


def _paint(
    rng: np.random.Generator,
    pattern: str,
    colours: tuple[np.ndarray, np.ndarray],
    dx: np.ndarray,
    dy: np.ndarray,
    radius: float,
) -> np.ndarray:
    """The object's colours over the whole image (the mask cuts it out): pattern and shading."""
    # The pattern has its own orientation and a scale tied to the object, with a floor in pixels
    # so that it stays visible on small objects.
    px, py = _rotate(dx, dy, rng.uniform(0, 2 * np.pi))
    phase = rng.uniform(0, 1, size=2)
    if pattern == "stripes":
        period = max(radius * rng.uniform(0.3, 0.45), 6.0)
        second = (px / period + phase[0]) % 1.0 < 0.5
    elif pattern == "checker":
        cell = max(radius * rng.uniform(0.25, 0.38), 4.0)
        second = (np.floor(px / cell + phase[0]) + np.floor(py / cell + phase[1])) % 2 == 1
    elif pattern == "dots":
        spacing = max(radius * rng.uniform(0.32, 0.45), 7.0)
        fx, fy = (px / spacing + phase[0]) % 1.0 - 0.5, (py / spacing + phase[1]) % 1.0 - 0.5
        second = np.hypot(fx, fy) < rng.uniform(0.26, 0.34)
    else:
        second = np.zeros(dx.shape, dtype=bool)
    obj = np.where(second[..., None], colours[1], colours[0])
    # Soft light from one side, as on a real object; it also keeps ``solid`` from being flat.
    sx, _ = _rotate(dx, dy, rng.uniform(0, 2 * np.pi))
    return obj * (1 + 0.12 * np.clip(sx / radius, -1, 1))[..., None]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A (size, size) float32 field with unit variance, about ``cells`` blobs a side."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient, mottling, soft blobs and thin lines: clutter that looks like no class object."""
    x, y = _pixel_grid(size)
    along, _ = _rotate(x - size / 2, y - size / 2, rng.uniform(0, 2 * np.pi))
    t = np.clip(along / size + 0.5, 0, 1).astype(np.float32)[..., None]
    image = (1 - t) * _random_colour(rng) + t * _random_colour(rng)
    image += 28 * np.stack([_smooth_noise(rng, size, 4) for _ in range(3)], axis=-1)
    mottle = _smooth_noise(rng, size, 12)[..., None]
    image += 14 * mottle

    # Blobs: big level sets of smooth noise have organic outlines, never a disc or a polygon.
    for _ in range(rng.integers(1, 4)):
        field = _smooth_noise(rng, size, int(rng.integers(2, 6)))
        # The k-th smallest value is the quantile, without sorting the whole field.
        k = int(rng.uniform(0.72, 0.9) * field.size)
        threshold = np.partition(field.ravel(), k)[k]
        alpha = np.clip((field - threshold) / rng.uniform(0.05, 0.4), 0, 1)[..., None]
        fill = _random_colour(rng) * (1 + 0.15 * mottle)
        image += alpha * (fill - image)

    # Lines: 1-3 px at 128 px, thin enough that a crossing never reads as a cross.
    canvas = Image.fromarray(_to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 5)):
        points = rng.uniform(-0.2 * size, 1.2 * size, size=(int(rng.integers(2, 5)), 2))
        colour = tuple(int(c) for c in _random_colour(rng))
        width = int(rng.integers(1, 4)) * max(1, size // 128)
        draw.line([tuple(p) for p in points], fill=colour, width=width, joint="curve")
    return np.asarray(canvas, dtype=np.float32)
