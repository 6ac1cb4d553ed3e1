"""Mask refinement: GrabCut seeded by a saliency map, the largest component, hole filling, and the
refinement grammar. Known answers on synthetic images and hand-made masks."""

import cv2
import numpy as np
import pytest
from scipy import ndimage

from retrieval import cam
from retrieval.config import ParamsError
from retrieval.segmentation import refine
from retrieval.segmentation.refine import Step


def disc_scene(size: int = 64, radius: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image: a red disc on a noisy green-grey background, and the disc's mask."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    disc = (y - size / 2) ** 2 + (x - size / 2) ** 2 <= radius ** 2
    image = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
    image[..., 1] += 60  # greenish background
    image[disc] = rng.integers(0, 30, (int(disc.sum()), 3)) + np.array([200, 20, 20])
    return image.astype(np.uint8), disc


def coarse_map(disc: np.ndarray, shift: int = 5, sigma: float = 9.0) -> np.ndarray:
    """What a coarse CAM gives: the object blurred into a blob, its peak off the centre."""
    blob = ndimage.gaussian_filter(np.roll(disc, shift, axis=1).astype(float), sigma)
    return (blob - blob.min()) / (blob.max() - blob.min())


def test_grabcut_recovers_the_object_a_coarse_map_only_roughly_finds():
    image, disc = disc_scene()
    saliency = coarse_map(disc)
    rough = cam.binarize(saliency, "top_percent", 40.0)
    before = cam.iou(rough, disc)
    after = cam.iou(refine.grabcut(image, saliency, rough, 10, 30), disc)
    assert before < 0.8  # the coarse, shifted blob misses the edges
    assert after > 0.95 and after > before + 0.15


def test_grabcut_without_evidence_returns_the_mask_unchanged():
    image, disc = disc_scene()
    flat = np.zeros(disc.shape)
    empty = np.zeros(disc.shape, bool)
    assert not refine.grabcut(image, flat, empty, 10, 30).any()
    mask = disc.copy()
    np.testing.assert_array_equal(refine.grabcut(image, flat, mask, 10, 30), mask)
    with pytest.raises(ValueError, match="share H, W"):
        refine.grabcut(image[:10], flat, mask, 10, 30)


def test_largest_component_keeps_the_biggest_blob_with_8_connectivity():
    mask = np.zeros((8, 10), bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[4:7, 5:8] = True  # 9 pixels
    mask[7, 8] = True  # touches the 9-pixel blob diagonally: part of it under 8-connectivity
    mask[0, 9] = True  # a lone pixel
    expected = np.zeros_like(mask)
    expected[4:7, 5:8] = True
    expected[7, 8] = True
    np.testing.assert_array_equal(refine.largest_component(mask), expected)
    assert not refine.largest_component(np.zeros((3, 3), bool)).any()


def test_fill_holes_fills_enclosed_background_only():
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False  # a hole: enclosed
    ring[1:4, 0] = False
    notch = ring.copy()
    notch[5, 3] = False  # open to the border through row 6: not a hole
    notch[6, 3] = False
    filled = refine.fill_holes(ring)
    assert filled[3, 3] and filled.sum() == ring.sum() + 1
    assert not refine.fill_holes(notch)[5, 3]


def test_components_step_is_largest_component_then_hole_filling():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[4, 4] = False  # hole
    mask[0, 8] = True  # separate speck (corner, not 8-connected: (1, 7) is its diagonal)
    mask[1, 7] = False
    expected = np.zeros_like(mask)
    expected[1:8, 1:8] = True
    expected[1, 7] = False
    result = refine.refine(np.zeros((9, 9, 3), np.uint8), np.zeros((9, 9)), mask,
                           (Step("components"),))
    np.testing.assert_array_equal(result, expected)


def test_refine_batch_matches_one_image_at_a_time():
    scenes = [disc_scene(seed=s) for s in range(3)]
    views = np.stack([image.transpose(2, 0, 1) for image, _ in scenes])
    maps = np.stack([coarse_map(disc, shift=s + 3) for s, (_, disc) in enumerate(scenes)])
    masks = cam.binarize(maps, "top_percent", 40.0)
    steps = refine.parse_refinement("grabcut:10/30+components")
    batch = refine.refine_batch(views, maps, masks, steps)
    for i, (image, _) in enumerate(scenes):
        np.testing.assert_array_equal(batch[i], refine.refine(image, maps[i], masks[i], steps))
    np.testing.assert_array_equal(refine.refine_batch(views, maps, masks, ()), masks)


@pytest.mark.parametrize("text, steps", [
    ("none", ()),
    ("components", (Step("components"),)),
    ("grabcut:10/30", (Step("grabcut", 10.0, 30.0),)),
    ("grabcut:2.5/40+components", (Step("grabcut", 2.5, 40.0), Step("components"))),
])
def test_refinement_grammar_round_trips(text, steps):
    assert refine.parse_refinement(text) == steps
    assert refine.format_refinement(steps) == text


@pytest.mark.parametrize("text, message", [
    ("grabcut", "is not a step"), ("grabcut:10", "is not a step"), ("blur", "is not a step"),
    ("grabcut:60/40", "add up to less than 100"), ("none+components", "is not a step"),
])
def test_bad_refinements_are_refused_naming_the_key(text, message):
    with pytest.raises(ValueError, match=message):
        refine.parse_refinement(text)
    with pytest.raises(ParamsError, match="gradcam_segment.refine"):
        refine.check_refinements([text])


def test_grabcut_is_deterministic_whatever_ran_before_on_the_thread():
    # Random colours and a random smooth map: GrabCut's k-means start matters here.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    saliency = ndimage.gaussian_filter(rng.random((48, 48)), 3)
    saliency = (saliency - saliency.min()) / np.ptp(saliency)
    rough = cam.binarize(saliency, "top_percent", 40.0)
    masks = []
    for seed in range(6):
        cv2.setRNGSeed(seed)  # what other OpenCV calls may have left
        masks.append(refine.grabcut(image, saliency, rough, 10, 30))
    assert all(np.array_equal(masks[0], mask) for mask in masks[1:])
    views = np.stack([image.transpose(2, 0, 1)] * 8)
    maps, rough8 = np.stack([saliency] * 8), np.stack([rough] * 8)
    steps = refine.parse_refinement("grabcut:10/30")
    batch = refine.refine_batch(views, maps, rough8, steps, workers=4)
    assert all(np.array_equal(masks[0], mask) for mask in batch)  # same on every thread
