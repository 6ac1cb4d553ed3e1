"""The segmentation experiment on a split table: explain, binarise, refine, score
(gradcam_segment).

Per (model, method), the binarisation with the best mean IoU on validation is chosen first, then,
with it, the refinement (``refine``: GrabCut, largest component) with the best mean IoU on
validation; both are applied unchanged to test. A flat map (no evidence anywhere) gives an empty
mask. The trivial baselines (priors) are a centred ellipse and a centred square, each covering
the mean foreground fraction of the training masks, and the all-foreground mask, scored on the
same test images. Each model's test accuracy (its predicted class: the largest logit, or the
nearest class prototype) is reported beside its IoU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from retrieval import cam, data, rng, transforms
from retrieval.cache import ImageCache
from retrieval.config import GradcamConfig
from retrieval.progress import Progress
from retrieval.segmentation import refine
from retrieval.segmentation.explainers import Explainer, explain, with_prototypes
from retrieval.segmentation.geometry import align_mask, oriented_size, restore_mask


@dataclass
class SplitImages:
    """The images of one split to explain (a seeded choice of at most max_images)."""

    rows: pd.DataFrame  # rows of the split table: file, label, mask_file, ...
    indices: np.ndarray  # (N,) rows of the image cache
    truth: np.ndarray  # (N, s, s) bool ground truth in the model view (False where none)
    has_truth: np.ndarray  # (N,) bool: the image has a mask
    sizes: np.ndarray  # (N, 2) each image's own (height, width)
    views: np.ndarray  # (N, 3, s, s) uint8 model views (decoded once, explained by every model)
    name: str = ""  # val | test

    @property
    def labels(self) -> list[str]:
        return self.rows["label"].tolist()


def split_images(table: pd.DataFrame, split: str, max_images: int, seed: int,
                 image_size: int, images: ImageCache) -> SplitImages:
    positions = np.flatnonzero(table["split"].to_numpy() == split)
    positions = positions[rng.subsample(len(positions), max_images, seed,
                                        rng.Subsample[f"SEGMENT_{split.upper()}"])]
    rows = table.iloc[positions].reset_index(drop=True)
    has_truth = (rows["mask_file"] != "").to_numpy()
    truth = np.zeros((len(rows), image_size, image_size), dtype=bool)
    for i in np.flatnonzero(has_truth):
        truth[i] = align_mask(data.load_mask(rows["mask_file"].iloc[i]), image_size)
    sizes = np.array([oriented_size(f) for f in rows["file"]], dtype=int).reshape(-1, 2)
    views = (transforms.eval_crop(image_size)(images.batch(positions)).numpy() if len(positions)
             else np.zeros((0, 3, image_size, image_size), np.uint8))
    return SplitImages(rows, positions, truth, has_truth, sizes, views, split)


def foreground_fraction(mask_files: Sequence[str], image_size: int) -> float | None:
    """Mean fraction of foreground pixels of these masks in the model view (None: no masks)."""
    fractions = [align_mask(data.load_mask(f), image_size).mean() for f in mask_files if f]
    return float(np.mean(fractions)) if fractions else None


@dataclass
class Overlays:
    """What the overlay figures show, for a seeded choice of K test images."""

    views: np.ndarray  # (K, 3, s, s) uint8 model views
    labels: list[str]
    truth: np.ndarray  # (K, s, s) bool
    has_truth: np.ndarray  # (K,) bool
    maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (K, s, s)
    masks: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (K, s, s) bool
    ious: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (K,), NaN: no mask

    def of_model(self, model: str) -> tuple[dict, dict, dict]:
        """method -> maps, masks and IoUs of one model, in the order the methods ran."""
        methods = [method for name, method in self.maps if name == model]
        return tuple({method: found[(model, method)] for method in methods}
                     for found in (self.maps, self.masks, self.ious))


@dataclass
class Extremes:
    """The best and worst test images (by IoU) of one (model, method)."""

    positions: np.ndarray  # (K,) rows of the test split: best first, then worst
    maps: np.ndarray  # (K, s, s)
    masks: np.ndarray  # (K, s, s) bool
    ious: np.ndarray  # (K,)


@dataclass
class SegmentationResult:
    scores: pd.DataFrame  # model, method, file, label, iou, dice, iou_unrefined: test, masked
    choices: pd.DataFrame  # model, method, target, view, binarization, refinement,
    #                        val_mean_iou_unrefined, val_mean_iou, flat_maps
    baselines: pd.DataFrame  # baseline (ellipse | square | full), file, label, iou, dice
    foreground_fraction: float | None  # of the training masks, in the model view
    images: dict[str, int]  # explained and scored images per split
    overlays: Overlays
    prototype_classes_from_split: int  # classes absent from train (class-disjoint splits)
    explainers: list[Explainer]  # with their class prototypes
    accuracy: dict[str, float]  # model -> test accuracy of its predicted class
    extremes: dict[tuple[str, str], Extremes]  # (model, method) -> best and worst test images
    test_views: np.ndarray  # (N, 3, s, s) uint8: the test images explained
    test_labels: list[str]
    test_truth: np.ndarray  # (N, s, s) bool (all False where an image has no mask)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per part of the work

    @property
    def iou_computed(self) -> bool:
        return self.images["test_scored"] > 0


# (model, method, split table row, (H, W) bool mask at the image's own size) -> None
MaskWriter = Callable[[str, str, pd.Series, np.ndarray], None]


def evaluate(explainers: Sequence[Explainer], images: ImageCache, table: pd.DataFrame,
             settings: GradcamConfig, seed: int, image_size: int, precision: str,
             write_mask: MaskWriter) -> SegmentationResult:
    """Explain, binarise and score the val/test images of ``table`` with every explainer and
    method; ``write_mask`` receives every predicted test mask, at its image's own size."""
    # Without any ground-truth mask there is nothing to score or choose a binarisation on, so
    # only the overlay figures' test images are explained (Caltech-101: 25 minutes -> seconds);
    # `retrieval segment` makes masks for any other image.
    has_masks = bool((table["mask_file"] != "").any())
    val = split_images(table, "val", settings.max_images if has_masks else 0, seed, image_size,
                       images)
    test = split_images(table, "test", settings.max_images if has_masks else settings.overlays,
                        seed, image_size, images)
    train = table[table["split"] == "train"]
    train_masks = train["mask_file"].iloc[rng.subsample(len(train), settings.max_images, seed,
                                                        rng.Subsample.SEGMENT_PRIOR_MASKS)]
    fraction = foreground_fraction(train_masks.tolist(), image_size)

    # Prototypes from the training images; a class with none there (class-disjoint splits) gets
    # the mean of its own val/test images, which uses their labels but never their masks.
    orphans = table["split"].isin(["val", "test"]) & ~table["label"].isin(set(train["label"]))
    reference = np.flatnonzero((table["split"] == "train") | orphans)
    seconds: dict[str, float] = {}
    clock = _stopwatch(seconds)
    with clock("prototypes"):
        explainers = [with_prototypes(e, images, reference,
                                      table["label"].iloc[reference].tolist(), image_size,
                                      precision) for e in explainers]
    accuracy = {e.name: split_accuracy(e, test, settings.batch_size, set(train["label"]))
                for e in explainers}

    shown = rng.subsample(len(test.rows), settings.overlays, seed, rng.Subsample.SEGMENT_OVERLAYS)
    overlays = Overlays(test.views[shown], [test.labels[i] for i in shown], test.truth[shown],
                        test.has_truth[shown])
    candidates = [cam.parse_binarization(text) for text in settings.binarize]
    refinements = [refine.parse_refinement(text) for text in settings.refine]
    scores, choices, extremes = [], [], {}
    pairs = [(explainer, method) for explainer in explainers for method in settings.methods]
    computed: dict[tuple[str, str, str], np.ndarray] = {}  # (explainer, split, method) -> maps
    for explainer, method in Progress(pairs, desc="saliency (model x method)", unit="combination"):
        if method == settings.methods[0]:  # the previous explainer's maps are no longer needed
            computed.clear()
        # Without validation masks: the first candidates.
        setting, refinement, val_raw, val_iou = candidates[0], refinements[0], None, None
        if val.has_truth.any():
            with clock("saliency"):
                val_maps = split_saliency(explainer, method, val, settings.batch_size, computed)
            with clock("choosing on val"):
                setting, val_raw = choose_setting(val_maps, val, candidates)
                refinement, val_iou = choose_refinement(val_maps, val, setting, refinements)
        with clock("saliency"):
            maps = split_saliency(explainer, method, test, settings.batch_size, computed)
        with clock("test masks"):
            raw = binarize_maps(maps, setting)  # (N, s, s)
            masks = refine.refine_batch(test.views, maps, raw, refinement)
        with clock("writing masks"):
            for i, (_, row) in enumerate(test.rows.iterrows()):
                write_mask(explainer.name, method, row, restore_mask(masks[i], *test.sizes[i]))
        scored = _score(masks, test).assign(
            model=explainer.name, method=method,
            iou_unrefined=cam.iou_batch(raw[test.has_truth], test.truth[test.has_truth]))
        scores.append(scored)
        choices.append({"model": explainer.name, "method": method, "target": explainer.target,
                        "view": explainer.view, "binarization": cam.format_binarization(setting),
                        "refinement": refine.format_refinement(refinement),
                        "val_mean_iou_unrefined": val_raw, "val_mean_iou": val_iou,
                        "flat_maps": float(constant_maps(maps).mean()) if len(maps) else 0.0})
        key = (explainer.name, method)
        overlays.maps[key], overlays.masks[key] = maps[shown], masks[shown]
        overlays.ious[key] = _iou_or_nan(masks[shown], test.truth[shown], test.has_truth[shown])
        extremes[key] = _extremes(maps, masks, test, settings.overlays)

    baselines = []
    if fraction is not None:
        size = (image_size, image_size)
        for name, mask in prior_masks(image_size, fraction).items():
            masks = np.broadcast_to(mask, (len(test.rows), *size))
            baselines.append(_score(masks, test).assign(baseline=name))
    columns = ["model", "method", "file", "label", "iou", "dice", "iou_unrefined"]
    return SegmentationResult(
        scores=pd.concat(scores)[columns] if scores else pd.DataFrame(columns=columns),
        choices=pd.DataFrame(choices),
        baselines=(pd.concat(baselines)[["baseline", "file", "label", "iou", "dice"]]
                   if baselines else pd.DataFrame(columns=["baseline", "file", "label", "iou",
                                                           "dice"])),
        foreground_fraction=fraction,
        images={"val": len(val.rows), "val_scored": int(val.has_truth.sum()),
                "test": len(test.rows), "test_scored": int(test.has_truth.sum())},
        overlays=overlays,
        prototype_classes_from_split=int(table.loc[orphans, "label"].nunique()),
        explainers=explainers, accuracy=accuracy, extremes=extremes,
        test_views=test.views, test_labels=test.labels, test_truth=test.truth, seconds=seconds)


def _stopwatch(seconds: dict[str, float]) -> Callable[[str], AbstractContextManager]:
    """``with clock("part"):`` adds the block's wall time to ``seconds["part"]``."""
    @contextmanager
    def clock(part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started
    return clock


def prior_masks(image_size: int, foreground_fraction: float) -> dict[str, np.ndarray]:
    """The trivial baselines, (s, s) bool each: what any saliency mask has to beat."""
    size = (image_size, image_size)
    return {"ellipse": cam.centered_ellipse_mask(*size, foreground_fraction),
            "square": cam.centered_box_mask(*size, foreground_fraction),
            "full": cam.full_mask(*size)}


def split_accuracy(explainer: Explainer, split: SplitImages, batch_size: int,
                   known: set[str]) -> float:
    """The fraction of the split's images of ``known`` classes (those with training images)
    whose predicted class is their label. NaN without such images, and for a classifier
    without class names: a class never trained on (class-disjoint splits) cannot be
    predicted by a classifier, and its prototype would be made of the very images scored."""
    keep = np.isin(np.array(split.labels, dtype=object), list(known))
    if not keep.any() or not explainer.can_predict:
        return float("nan")
    predicted = predicted_labels(explainer, split.views[keep], batch_size)
    return float(np.mean(np.array(predicted) == np.array(split.labels, dtype=object)[keep]))


def predicted_labels(explainer: Explainer, views: np.ndarray, batch_size: int) -> list[str]:
    """The class each uint8 model view (N, 3, s, s) is predicted to show."""
    predicted: list[str] = []
    for start in range(0, len(views), batch_size):
        batch = transforms.normalize(torch.from_numpy(views[start:start + batch_size])
                                     .to(explainer.device), explainer.normalization)
        predicted += explainer.predict(batch)
    return predicted


def _extremes(maps: np.ndarray, masks: np.ndarray, split: SplitImages, count: int) -> Extremes:
    """The ``count // 2`` best and as many worst scored images (fewer when few are scored)."""
    scored = np.flatnonzero(split.has_truth)
    ious = cam.iou_batch(masks[scored], split.truth[scored]) if len(scored) else np.zeros(0)
    order = scored[np.argsort(-ious, kind="stable")]
    half = min(count // 2, len(order) // 2)
    positions = np.concatenate([order[:half], order[len(order) - half:]]).astype(int)
    return Extremes(positions, maps[positions], masks[positions],
                    cam.iou_batch(masks[positions], split.truth[positions])
                    if len(positions) else np.zeros(0))


def choose_setting(maps: np.ndarray, split: SplitImages,
                   candidates: Sequence[cam.Binarization]
                   ) -> tuple[cam.Binarization, float | None]:
    """(the candidate with the best mean IoU on the split's images that have a mask, that IoU)."""
    maps, truth = maps[split.has_truth], split.truth[split.has_truth]
    scores = [cam.iou_batch(binarize_maps(maps, setting), truth).mean() for setting in candidates]
    best = int(np.argmax(scores))  # the first one on ties
    return candidates[best], float(scores[best])


def choose_refinement(maps: np.ndarray, split: SplitImages, setting: cam.Binarization,
                      refinements: Sequence[refine.Refinement]
                      ) -> tuple[refine.Refinement, float]:
    """(the refinement with the best mean IoU on the split's images that have a mask, after
    binarising with ``setting``; that IoU). The first one on ties."""
    keep = split.has_truth
    raw = binarize_maps(maps[keep], setting)
    scores = [cam.iou_batch(refine.refine_batch(split.views[keep], maps[keep], raw, steps),
                            split.truth[keep]).mean() for steps in refinements]
    best = int(np.argmax(scores))
    return refinements[best], float(scores[best])


def split_saliency(explainer: Explainer, method: str, split: SplitImages, batch_size: int,
                   computed: dict[tuple[str, str, str], np.ndarray]) -> np.ndarray:
    """``saliency_over``, reusing the maps in ``computed`` ((explainer, split, method) -> maps;
    filled here): a method made of other methods' maps (Guided Grad-CAM) costs no extra
    backward pass when its parts ran already."""
    key = (explainer.name, split.name, method)
    if key not in computed:
        entry = cam.SALIENCY_METHODS[method]
        computed[key] = (entry.combine([split_saliency(explainer, part, split, batch_size,
                                                       computed) for part in entry.parts])
                         if entry.parts else saliency_over(explainer, method, split, batch_size))
    return computed[key]


def saliency_over(explainer: Explainer, method: str, split: SplitImages,
                  batch_size: int) -> np.ndarray:
    """(N, s, s) maps of a split's images, ``batch_size`` images per saliency call."""
    size = split.views.shape[-1]
    maps = [np.zeros((0, size, size), np.float32)]
    for start in range(0, len(split.views), batch_size):
        views = torch.from_numpy(split.views[start:start + batch_size])
        maps.append(explain(explainer, method, views, split.labels[start:start + batch_size]))
    return np.concatenate(maps)


def _score(masks: np.ndarray, split: SplitImages) -> pd.DataFrame:
    """Per-image IoU and Dice of predicted masks (N, s, s), for the images with a mask."""
    keep = split.has_truth
    rows = split.rows[keep]
    return pd.DataFrame({"file": rows["path"].to_numpy(), "label": rows["label"].to_numpy(),
                         "iou": cam.iou_batch(masks[keep], split.truth[keep]),
                         "dice": cam.dice_batch(masks[keep], split.truth[keep])})


def _iou_or_nan(masks: np.ndarray, truth: np.ndarray, has_truth: np.ndarray) -> np.ndarray:
    ious = cam.iou_batch(masks, truth) if len(masks) else np.zeros(0)
    return np.where(has_truth, ious, np.nan)


def constant_maps(maps: np.ndarray) -> np.ndarray:
    """(N,) bool: the map is flat, so it points at nothing (Grad-CAM is all zero when the
    weighted activations are negative everywhere, common on small feature maps)."""
    return np.ptp(maps.reshape(len(maps), -1), axis=1) < 1e-6 if len(maps) else np.zeros(0, bool)


def binarize_maps(maps: np.ndarray, setting: cam.Binarization) -> np.ndarray:
    """``cam.binarize`` of (N, s, s) maps, except that a flat map gives an empty mask: top-p
    would otherwise pick the first pixels in raster order, a band along the top of the image."""
    masks = cam.binarize(maps, *setting)
    masks[constant_maps(maps)] = False
    return masks
