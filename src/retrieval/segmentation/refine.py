"""Refining a binarised saliency mask into an object mask: GrabCut seeded by the map, the largest
connected component, hole filling.

A refinement is written in one grammar, steps joined by "+" and applied in order:

- ``none``: the binarised mask as it is;
- ``components``: keep the largest 8-connected component and fill its holes (an object is one
  blob; a saliency map also lights up bits of clutter and misses the object's inside);
- ``grabcut:F/B``: OpenCV's GrabCut on the image, seeded by the map: its top F percent of pixels
  are sure foreground, its bottom B percent sure background, and the rest probable foreground
  where the binarised mask is set, probable background elsewhere. Colour models then move the
  boundary onto the image's edges, which a coarse CAM cannot see.

``gradcam_segment`` chooses the refinement on the validation split, like the binarisation, and
applies it once to test.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

REFINEMENT_GRAMMAR = "none, components, grabcut:<F>/<B> (percentages), or steps joined by '+'"
_GRABCUT = re.compile(r"grabcut:(?P<fg>\d+(\.\d+)?)/(?P<bg>\d+(\.\d+)?)")
# One iteration: on Leeds val (EfficientNet-Lite0, LayerCAM, 160 px) 3 iterations gain 0.011
# IoU (0.773 -> 0.784) for twice the time (37 -> 71 ms per image); GrabCut is most of the
# gradcam_segment stage's time. A half-size GrabCut is 4x faster but loses 0.05 IoU.
GRABCUT_ITERATIONS = 1


@dataclass(frozen=True)
class Step:
    name: str  # components | grabcut
    foreground_percent: float = 0.0  # grabcut: top percent of the map that is sure foreground
    background_percent: float = 0.0  # grabcut: bottom percent that is sure background


Refinement = tuple[Step, ...]  # () is "none"


def parse_refinement(text: str) -> Refinement:
    """"none" -> (); "grabcut:20/40+components" -> (Step(grabcut, 20, 40), Step(components)).

    Raises ValueError saying what is wrong (callers add where the text came from).
    """
    if text == "none":
        return ()
    steps = []
    for part in text.split("+"):
        if part == "components":
            steps.append(Step("components"))
            continue
        found = _GRABCUT.fullmatch(part)
        if found is None:
            raise ValueError(f"'{part}' is not a step: use {REFINEMENT_GRAMMAR}")
        fg, bg = float(found["fg"]), float(found["bg"])
        if fg + bg >= 100:
            raise ValueError(f"grabcut:{part[8:]} seeds every pixel: the sure foreground and "
                             "background percentages must add up to less than 100")
        steps.append(Step("grabcut", fg, bg))
    return tuple(steps)


def format_refinement(refinement: Refinement) -> str:
    """The inverse of ``parse_refinement``."""
    if not refinement:
        return "none"
    return "+".join(step.name if step.name == "components" else
                    f"grabcut:{step.foreground_percent:g}/{step.background_percent:g}"
                    for step in refinement)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest 8-connected foreground component (the first on ties)."""
    import cv2

    mask = np.asarray(mask, dtype=bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
    if count <= 2:  # background only, or one component
        return mask.copy()
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: background regions not connected to the border become foreground."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def grabcut(image: np.ndarray, saliency: np.ndarray, mask: np.ndarray,
            foreground_percent: float, background_percent: float,
            iterations: int = GRABCUT_ITERATIONS) -> np.ndarray:
    """(H, W) bool: GrabCut on an RGB uint8 image (H, W, 3), seeded by its saliency map.

    Sure foreground: the ``foreground_percent`` highest pixels of the map; sure background: the
    ``background_percent`` lowest; in between, ``mask`` decides probable foreground/background.
    When a side has no pixel at all (an empty mask, a flat map), GrabCut has no colour model to
    fit and ``mask`` is returned unchanged.
    """
    import cv2

    mask = np.asarray(mask, dtype=bool)
    saliency = np.asarray(saliency, dtype=np.float64)
    if image.shape[:2] != mask.shape or saliency.shape != mask.shape or image.shape[-1] != 3:
        raise ValueError(f"image (H, W, 3), saliency and mask must share H, W: got "
                         f"{image.shape}, {saliency.shape} and {mask.shape}")
    order = np.argsort(-saliency.ravel(), kind="stable")  # rank pixels, ties by position
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    rank = rank.reshape(mask.shape)
    n = mask.size
    seeds = np.where(mask, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[rank < round(foreground_percent / 100 * n)] = cv2.GC_FGD
    seeds[rank >= n - round(background_percent / 100 * n)] = cv2.GC_BGD
    foreground = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))
    if not foreground.any() or foreground.all() or np.ptp(saliency) == 0:
        return mask.copy()
    background_model, foreground_model = np.zeros((1, 65)), np.zeros((1, 65))
    # GrabCut's k-means draws from OpenCV's thread-local RNG: seed it for every image, so the
    # mask depends neither on what ran before on this thread nor on which thread runs it.
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), seeds, None, background_model,
                foreground_model, iterations, cv2.GC_INIT_WITH_MASK)  # OpenCV wants BGR
    return np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))


def refine(image: np.ndarray, saliency: np.ndarray, mask: np.ndarray,
           refinement: Refinement) -> np.ndarray:
    """One image's mask after every step of ``refinement``; image (H, W, 3) uint8 RGB."""
    mask = np.asarray(mask, dtype=bool)
    for step in refinement:
        if step.name == "components":
            mask = fill_holes(largest_component(mask)) if mask.any() else mask
        else:
            mask = grabcut(image, saliency, mask, step.foreground_percent,
                           step.background_percent)
    return mask


def refine_batch(views: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                 refinement: Refinement, workers: int = 2) -> np.ndarray:
    """(N, s, s) refined masks of uint8 views (N, 3, s, s), maps and masks (N, s, s).

    OpenCV releases the GIL, so GrabCut runs on ``workers`` threads."""
    if not refinement:
        return np.asarray(masks, dtype=bool).copy()
    images = np.ascontiguousarray(np.asarray(views).transpose(0, 2, 3, 1))  # (N, s, s, 3)

    def one(i: int) -> np.ndarray:
        return refine(images[i], maps[i], masks[i], refinement)

    if len(masks) == 0:
        return np.zeros_like(masks, dtype=bool)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return np.stack(list(pool.map(one, range(len(masks)))))


def check_refinements(texts: Sequence[str], key: str = "gradcam_segment.refine") -> None:
    """Every refinement parses, or a ParamsError naming the key."""
    from retrieval.config import ParamsError

    if not texts:
        raise ParamsError(f"{key} is empty: give at least 'none'")
    for text in texts:
        try:
            parse_refinement(text)
        except ValueError as error:
            raise ParamsError(f"{key} has '{text}' ({error}): change {key} in params.yaml"
                              ) from error
