"""Segmentation for free: saliency maps of the trained models, binarised and scored against masks.

Hypothesis (issue #5): a network that has learned to tell classes apart must separate the object
from the background, so its gradients segment the object with no extra training.

    explainers  what to explain for each model (``Explainer``): for an embedding model, the cosine
                of the image's embedding to its class prototype (the mean training embedding of
                its class); for the untrained baseline, the same on the pooled backbone
                descriptor; for a cross-entropy classifier, the predicted class logit.
    geometry    ground-truth masks go through the images' own resize + centre crops
                (``align_mask``), so maps and masks are scored on the model's input view,
                image_size x image_size pixels. Predicted masks are written back at each image's
                own size (``restore_mask``); what lies outside the centre crop is background.
    binarise    per (model, method), the setting with the best mean IoU on validation, applied
                unchanged to test. A flat map (no evidence anywhere) gives an empty mask.
    baselines   a centred ellipse covering the mean foreground fraction of the training masks,
                and the all-foreground mask, scored on the same test images.

``evaluate`` runs it on a split table (the gradcam_segment stage); ``segment_main`` is the
``retrieval segment`` command: a folder of images (+ masks) -> a folder of masks (+ IoU table).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from retrieval import cam, data, embed, models, outputs, runtime, transforms
from retrieval.cache import ImageCache
from retrieval.config import GradcamConfig
from retrieval.outputs import UserError

# --- geometry: masks in the model's input view and back ---------------------------------------


def align_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W) bool mask of an image -> (s, s) bool mask of the model's input view of it.

    The very transforms the images go through (``decode_transform``: antialiased resize of the
    shorter side, centre crop; then ``eval_crop``), applied to the mask as an 8-bit image and
    thresholded at half, so the mask lines up with the model input pixel for pixel.
    """
    picture = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    view = transforms.eval_crop(image_size)(transforms.decode_transform(image_size)(picture))
    return view[0].numpy() >= 128


def _view_window(height: int, width: int, image_size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of the model view inside the resized image.

    The same arithmetic as torchvision's Resize(int) and CenterCrop, twice (cache, then eval).
    """
    side = transforms.cache_size(image_size)
    short, long = min(height, width), max(height, width)
    new_long = int(side * long / short)
    rh, rw = (side, new_long) if height <= width else (new_long, side)
    inner = int(round((side - image_size) / 2.0))
    return rh, rw, int(round((rh - side) / 2.0)) + inner, int(round((rw - side) / 2.0)) + inner


def restore_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(s, s) bool mask of the model view -> (height, width) bool mask of the original image.

    The inverse of ``align_mask``: the view is pasted into its window of the resized image, which
    is resized (bilinear) back to the image's size and thresholded at half. Pixels the model never
    saw (outside the centre crop) are background.
    """
    image_size = mask.shape[-1]
    rh, rw, top, left = _view_window(height, width, image_size)
    canvas = torch.zeros((1, rh, rw))
    canvas[0, top:top + image_size, left:left + image_size] = torch.from_numpy(
        np.asarray(mask, dtype=np.float32))
    full = TF.resize(canvas, [height, width], antialias=True)
    return full[0].numpy() >= 0.5


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """An 8-bit PNG, 255 = foreground, 0 = background (the convention of the dataset masks)."""
    with outputs.atomic_path(path) as temp:
        Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(temp, format="PNG")


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as ``data.load_rgb`` returns it (EXIF rotation applied)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return height, width


# --- explainers: what to explain for each model -------------------------------------------------


class PooledDescriptor(nn.Module):
    """The untrained baseline's embedding: the L2-normalised pooled backbone descriptor (B, C).

    With a frozen trunk, train_frozen's trunk is the backbone before any training, so this view
    of its checkpoint is the baseline the learned embeddings are compared with.
    """

    def __init__(self, net: models.EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    @property
    def target_layer(self) -> nn.Module:
        return self.net.target_layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.features(images).float(), dim=1)


class ClassifierLogits(nn.Module):
    """The cross-entropy baseline's class logits (B, C), read from the un-normalised head."""

    def __init__(self, net: models.EmbeddingNet) -> None:
        super().__init__()
        if net.classifier is None:
            raise ValueError("the network has no classifier (it was not trained with "
                             "cross_entropy)")
        self.net = net

    @property
    def target_layer(self) -> nn.Module:
        return self.net.target_layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(self.net(images, normalize=False))


@dataclass
class Explainer:
    """A model to explain, and which scalar of its output each image's saliency explains."""

    name: str
    model: nn.Module  # (B, 3, s, s) -> (B, D) embeddings or (B, C) logits; has .target_layer
    target: str  # "prototype": cosine to a class prototype | "logit": the predicted class logit
    view: str = "embedding"  # embedding | backbone (pooled descriptor) | classifier
    prototypes: dict[str, np.ndarray] = field(default_factory=dict)  # label -> unit (D,)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def normalization(self) -> transforms.Normalization:
        return getattr(self.model, "net", self.model).normalization  # the wrapped EmbeddingNet

    def predict(self, images: torch.Tensor) -> list[str] | list[int]:
        """The predicted class of each normalised image (B, 3, s, s): the largest logit, or the
        label of the nearest prototype (largest cosine)."""
        with torch.no_grad():
            output = self.model(images.to(self.device)).float().cpu()  # (B, C) or (B, D)
        if self.target == "logit":
            return output.argmax(dim=1).tolist()
        labels = list(self.prototypes)
        if not labels:
            raise ValueError(f"{self.name} has no class prototypes: call with_prototypes first")
        matrix = torch.from_numpy(np.stack([self.prototypes[label] for label in labels]))
        return [labels[i] for i in (F.normalize(output, dim=1) @ matrix.T).argmax(dim=1)]

    def targets(self, images: torch.Tensor, labels: Sequence[str] | None = None
                ) -> list[cam.Target]:
        """One target per image: the prototype of its class (``labels`` given) or of its
        predicted class; for classifiers always the predicted class logit."""
        if self.target == "logit":
            return [cam.ClassLogit(index) for index in self.predict(images)]
        if labels is None:
            labels = self.predict(images)
        missing = sorted(set(labels) - set(self.prototypes))
        if missing:
            raise ValueError(f"{self.name} has no prototype for class(es) {missing[:5]}")
        return [cam.SimilarityToPrototype(self.prototypes[label]) for label in labels]


def model_explainer(name: str, net: models.EmbeddingNet) -> Explainer:
    """A trained network: its classifier's predicted logit if it has one, else its embedding."""
    net.eval()
    if net.classifier is not None:
        return Explainer(name, ClassifierLogits(net).eval(), "logit", "classifier")
    return Explainer(name, net, "prototype", "embedding")


def backbone_explainer(name: str, net: models.EmbeddingNet) -> Explainer:
    """The pooled backbone descriptor of ``net`` (the untrained baseline for a frozen trunk)."""
    return Explainer(name, PooledDescriptor(net).eval(), "prototype", "backbone")


def with_prototypes(explainer: Explainer, images: ImageCache, indices: np.ndarray,
                    labels: Sequence[str], image_size: int, precision: str) -> Explainer:
    """The explainer with class prototypes from the embeddings of ``images[indices]``."""
    if explainer.target != "prototype":
        return explainer
    embeddings = embed.run_batched(explainer.model, images, np.asarray(indices), image_size,
                                   explainer.device, precision,
                                   explainer.normalization)  # (N, D)
    return replace(explainer, prototypes=cam.class_prototypes(embeddings, list(labels)))


def explain(explainer: Explainer, method: str, views: torch.Tensor,
            labels: Sequence[str] | None = None) -> np.ndarray:
    """(B, s, s) saliency maps in [0, 1] of uint8 model views (B, 3, s, s)."""
    images = transforms.normalize(views.to(explainer.device), explainer.normalization)
    return cam.saliency_maps(explainer.model, images, explainer.targets(images, labels), method)


# --- binarisation settings ----------------------------------------------------------------------


def parse_binarization(text: str) -> tuple[str, float | None]:
    """"otsu" -> ("otsu", None); "top_percent:30" -> ("top_percent", 30.0); "fixed:0.5" -> ..."""
    method, _, value = text.partition(":")
    if method not in cam.BINARIZATION_METHODS or (method == "otsu") != (value == ""):
        raise UserError(f"binarisation '{text}' is not one of otsu, fixed:<0..1>, "
                        "top_percent:<0..100>")
    try:
        number = float(value) if value else None
    except ValueError:
        raise UserError(f"binarisation '{text}': '{value}' is not a number") from None
    if method == "fixed" and not 0 <= number <= 1:
        raise UserError(f"binarisation '{text}': a fixed threshold lies in [0, 1]")
    if method == "top_percent" and not 0 <= number <= 100:
        raise UserError(f"binarisation '{text}': top_percent takes a percentage, 0..100")
    return method, number


# --- the experiment on a split table ------------------------------------------------------------


@dataclass
class SplitImages:
    """The images of one split to explain (a seeded choice of at most max_images)."""

    rows: pd.DataFrame  # rows of the split table: file, label, mask_file, ...
    indices: np.ndarray  # (N,) rows of the image cache
    truth: np.ndarray  # (N, s, s) bool ground truth in the model view (False where none)
    has_truth: np.ndarray  # (N,) bool: the image has a mask
    sizes: np.ndarray  # (N, 2) each image's own (height, width)

    @property
    def labels(self) -> list[str]:
        return self.rows["label"].tolist()


def choose_rows(count: int, limit: int, seed: int, stream: int) -> np.ndarray:
    """Sorted positions of a seeded choice of ``min(count, limit)`` of ``count`` items."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, stream]).choice(count, limit, replace=False))


def split_images(table: pd.DataFrame, split: str, max_images: int, seed: int,
                 image_size: int) -> SplitImages:
    positions = np.flatnonzero(table["split"].to_numpy() == split)
    positions = positions[choose_rows(len(positions), max_images, seed, data.SPLITS.index(split))]
    rows = table.iloc[positions].reset_index(drop=True)
    has_truth = (rows["mask_file"] != "").to_numpy()
    truth = np.zeros((len(rows), image_size, image_size), dtype=bool)
    for i in np.flatnonzero(has_truth):
        truth[i] = align_mask(data.load_mask(rows["mask_file"].iloc[i]), image_size)
    sizes = np.array([oriented_size(f) for f in rows["file"]], dtype=int).reshape(-1, 2)
    return SplitImages(rows, positions, truth, has_truth, sizes)


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
class SegmentationResult:
    scores: pd.DataFrame  # model, method, file, label, iou, dice: test images with a mask
    choices: pd.DataFrame  # model, method, target, view, binarization, val_mean_iou, flat_maps
    baselines: pd.DataFrame  # baseline (ellipse | full), file, label, iou, dice
    foreground_fraction: float | None  # of the training masks, in the model view
    images: dict[str, int]  # explained and scored images per split
    overlays: Overlays
    prototype_classes_from_split: int  # classes absent from train (class-disjoint splits)
    explainers: list[Explainer]  # with their class prototypes

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
    val = split_images(table, "val", settings.max_images, seed, image_size)
    test = split_images(table, "test", settings.max_images, seed, image_size)
    train = table[table["split"] == "train"]
    train_masks = train["mask_file"].iloc[choose_rows(len(train), settings.max_images, seed, 9)]
    fraction = foreground_fraction(train_masks.tolist(), image_size)

    # Prototypes from the training images; a class with none there (class-disjoint splits) gets
    # the mean of its own val/test images, which uses their labels but never their masks.
    orphans = table["split"].isin(["val", "test"]) & ~table["label"].isin(set(train["label"]))
    reference = np.flatnonzero((table["split"] == "train") | orphans)
    explainers = [with_prototypes(e, images, reference, table["label"].iloc[reference].tolist(),
                                  image_size, precision) for e in explainers]

    shown = choose_rows(len(test.rows), settings.overlays, seed, 7)
    crop = transforms.eval_crop(image_size)
    overlays = Overlays(crop(images.batch(test.indices[shown])).numpy() if len(shown) else
                        np.zeros((0, 3, image_size, image_size), np.uint8),
                        [test.labels[i] for i in shown], test.truth[shown], test.has_truth[shown])
    candidates = [parse_binarization(text) for text in settings.binarize]
    scores, choices = [], []
    pairs = [(explainer, method) for explainer in explainers for method in settings.methods]
    for explainer, method in tqdm(pairs, desc="saliency", unit="model x method"):
        setting, val_iou = candidates[0], None  # without validation masks: the first one
        if val.has_truth.any():
            val_maps = saliency_over(explainer, method, images, val, image_size,
                                     settings.batch_size)
            setting, val_iou = choose_setting(val_maps, val, candidates)
        maps = saliency_over(explainer, method, images, test, image_size, settings.batch_size)
        masks = binarize_maps(maps, setting)  # (N, s, s)
        for i, (_, row) in enumerate(test.rows.iterrows()):
            write_mask(explainer.name, method, row, restore_mask(masks[i], *test.sizes[i]))
        scores.append(_score(masks, test).assign(model=explainer.name, method=method))
        choices.append({"model": explainer.name, "method": method, "target": explainer.target,
                        "view": explainer.view, "binarization": format_binarization(setting),
                        "val_mean_iou": val_iou,
                        "flat_maps": float(constant_maps(maps).mean()) if len(maps) else 0.0})
        key = (explainer.name, method)
        overlays.maps[key], overlays.masks[key] = maps[shown], masks[shown]
        overlays.ious[key] = _iou_or_nan(masks[shown], test.truth[shown], test.has_truth[shown])

    baselines = []
    if fraction is not None:
        size = (image_size, image_size)
        for name, mask in (("ellipse", cam.centered_ellipse_mask(*size, fraction)),
                           ("full", cam.full_mask(*size))):
            masks = np.broadcast_to(mask, (len(test.rows), *size))
            baselines.append(_score(masks, test).assign(baseline=name))
    columns = ["model", "method", "file", "label", "iou", "dice"]
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
        explainers=explainers)


def choose_setting(maps: np.ndarray, split: SplitImages,
                   candidates: Sequence[tuple[str, float | None]]
                   ) -> tuple[tuple[str, float | None], float | None]:
    """(the candidate with the best mean IoU on the split's images that have a mask, that IoU)."""
    maps, truth = maps[split.has_truth], split.truth[split.has_truth]
    scores = [cam.iou_batch(binarize_maps(maps, setting), truth).mean() for setting in candidates]
    best = int(np.argmax(scores))  # the first one on ties
    return candidates[best], float(scores[best])


def saliency_over(explainer: Explainer, method: str, images: ImageCache, split: SplitImages,
                  image_size: int, batch_size: int) -> np.ndarray:
    """(N, s, s) maps of a split's images, ``batch_size`` images per saliency call."""
    crop = transforms.eval_crop(image_size)
    maps = [np.zeros((0, image_size, image_size), np.float32)]
    for start in range(0, len(split.indices), batch_size):
        views = crop(images.batch(split.indices[start:start + batch_size]))
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


def binarize_maps(maps: np.ndarray, setting: tuple[str, float | None]) -> np.ndarray:
    """``cam.binarize`` of (N, s, s) maps, except that a flat map gives an empty mask: top-p
    would otherwise pick the first pixels in raster order, a band along the top of the image."""
    masks = cam.binarize(maps, *setting)
    masks[constant_maps(maps)] = False
    return masks


def format_binarization(setting: tuple[str, float | None]) -> str:
    method, value = setting
    return method if value is None else f"{method}:{value:g}"


# --- summaries ----------------------------------------------------------------------------------


def _stats(frame: pd.DataFrame) -> dict[str, float]:
    return {"mean_iou": float(frame["iou"].mean()), "median_iou": float(frame["iou"].median()),
            "mean_dice": float(frame["dice"].mean()),
            "median_dice": float(frame["dice"].median()), "images": int(len(frame))}


def summary_table(result: SegmentationResult) -> pd.DataFrame:
    """One row per (model, method) and per trivial baseline: test IoU/Dice, mean and median;
    flat_maps is the fraction of test maps that point at nothing (empty masks)."""
    rows = []
    for choice in result.choices.to_dict("records"):
        frame = result.scores[(result.scores["model"] == choice["model"])
                              & (result.scores["method"] == choice["method"])]
        rows.append({**choice, **(_stats(frame) if len(frame) else {})})
    for name, frame in result.baselines.groupby("baseline", sort=False):
        setting = f"fraction {result.foreground_fraction:.3f}" if name == "ellipse" else ""
        rows.append({"model": "trivial", "method": name, "binarization": setting,
                     **_stats(frame)})
    columns = ["model", "method", "target", "binarization", "flat_maps", "val_mean_iou",
               "mean_iou", "median_iou", "mean_dice", "median_dice", "images"]
    return pd.DataFrame(rows).reindex(columns=columns)


def per_class_table(result: SegmentationResult) -> pd.DataFrame:
    """Mean and median IoU/Dice per (model, method, class) and per (baseline, class)."""
    trivial = result.baselines.rename(columns={"baseline": "method"}).assign(model="trivial")
    frames = pd.concat([result.scores, trivial]) if len(trivial) else result.scores
    columns = ["model", "method", "label", "mean_iou", "median_iou", "mean_dice", "median_dice",
               "images"]
    if frames.empty:
        return pd.DataFrame(columns=columns)
    grouped = frames.groupby(["model", "method", "label"], sort=False)
    table = grouped.agg(mean_iou=("iou", "mean"), median_iou=("iou", "median"),
                        mean_dice=("dice", "mean"), median_dice=("dice", "median"),
                        images=("iou", "size")).reset_index()
    return table[columns]


def metrics(result: SegmentationResult) -> dict:
    """The metrics JSON: {"iou_computed", "<model>": {"<method>": {...}}, "baselines": {...}}."""
    summary: dict = {"iou_computed": result.iou_computed, "images": result.images,
                     "foreground_fraction": result.foreground_fraction,
                     "prototype_classes_from_split": result.prototype_classes_from_split}
    if not result.iou_computed:
        summary["reason"] = ("no ground-truth masks for the test images: IoU was not computed "
                             "(set data.masks to a masks folder parallel to data.root)")
    table = summary_table(result)
    for row in table[table["model"] != "trivial"].to_dict("records"):
        entry = {"binarization": row["binarization"], "target": row["target"],
                 "flat_maps": row["flat_maps"]}
        if result.iou_computed:
            entry.update({k: row[k] for k in ("mean_iou", "median_iou", "mean_dice",
                                              "median_dice", "val_mean_iou")})
        summary.setdefault(row["model"], {})[row["method"]] = entry
    if result.iou_computed:
        summary["baselines"] = {
            row["method"]: {k: row[k] for k in ("mean_iou", "median_iou", "mean_dice",
                                                "median_dice")}
            for row in table[table["model"] == "trivial"].to_dict("records")}
        # The method of each model with the best validation IoU (chosen without test labels).
        chosen = result.choices.dropna(subset=["val_mean_iou"])
        if len(chosen):
            best = chosen.loc[chosen.groupby("model", sort=False)["val_mean_iou"].idxmax()]
            summary["best_method"] = dict(zip(best["model"], best["method"], strict=True))
    return summary


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; floats with 3 decimals, missing values empty."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.3f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# --- explainer files: what `retrieval segment` needs besides the checkpoint --------------------


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_explainer(path: str | Path, explainer: Explainer, model_file: str | Path,
                   binarizations: dict[str, str]) -> None:
    """Prototypes, view and the chosen binarisation per method, tied to one checkpoint file."""
    labels = list(explainer.prototypes)
    prototypes = (np.stack([explainer.prototypes[label] for label in labels]) if labels
                  else np.zeros((0, 0), np.float32))
    meta = {"name": explainer.name, "target": explainer.target, "view": explainer.view,
            "model_sha256": file_digest(model_file), "binarization": binarizations}
    with outputs.atomic_path(path) as temp, open(temp, "wb") as stream:
        np.savez(stream, labels=np.array(labels, dtype=str), prototypes=prototypes,
                 meta=np.array(json.dumps(meta, sort_keys=True)))


def load_explainer(model_file: str | Path, explainer_file: str | Path | None
                   ) -> tuple[Explainer, dict, dict]:
    """(explainer, checkpoint, binarisation per method) for a checkpoint and, for embedding
    models, the explainer file the gradcam_segment stage wrote for it."""
    net, checkpoint = models.load_model(model_file)
    if explainer_file is None or not Path(explainer_file).is_file():
        if net.classifier is not None:
            return model_explainer("model", net), checkpoint, {}
        where = f" ({explainer_file} does not exist)" if explainer_file else ""
        raise UserError(f"{model_file} is an embedding model: its saliency needs class "
                        f"prototypes{where}. Run `dvc repro gradcam_segment` and pass "
                        "--prototypes data/gradcam/prototypes/<model>.npz")
    try:
        with np.load(explainer_file, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            labels, prototypes = stored["labels"].tolist(), stored["prototypes"]
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"{explainer_file} is not a prototypes file written by gradcam_segment "
                        f"({type(error).__name__})") from error
    if meta["model_sha256"] != file_digest(model_file):
        raise UserError(f"{explainer_file} was computed for another model file than "
                        f"{model_file}: pass the matching --model, or re-run "
                        "`dvc repro gradcam_segment`")
    if meta["view"] == "backbone":
        explainer = backbone_explainer(meta["name"], net)
    else:
        explainer = model_explainer(meta["name"], net)
    explainer.prototypes = dict(zip(labels, prototypes.astype(np.float32), strict=True))
    return explainer, checkpoint, meta["binarization"]


# --- the `retrieval segment` command ------------------------------------------------------------

DEFAULT_MODEL = "models/train_unfrozen/best.pt"
DEFAULT_PROTOTYPES = "data/gradcam/prototypes/unfrozen.npz"


def segment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval segment",
        description="Segment the object of every image in a folder from a trained model's "
                    "saliency (no segmentation training). Writes one PNG mask per image "
                    "(255 = object) at the image's size, with the same relative path; with "
                    "--masks, also OUT/iou_table.csv (IoU and Dice per image, scored on the "
                    "model's centre-cropped input view, as in the gradcam_segment stage).")
    parser.add_argument("images", type=Path, help="folder of images (sub-folders are searched)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the masks (created; must not lie inside IMAGES)")
    parser.add_argument("--masks", type=Path, default=None,
                        help="ground-truth masks parallel to IMAGES (same relative path and "
                             "stem, any image format) to score the predictions")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint (default {DEFAULT_MODEL})")
    parser.add_argument("--prototypes", type=Path, default=None,
                        help="class prototypes of an embedding model, written by the "
                             "gradcam_segment stage as data/gradcam/prototypes/<model>.npz "
                             f"(default {DEFAULT_PROTOTYPES} with the default model)")
    parser.add_argument("--method", choices=cam.SALIENCY_METHODS, default="gradcam",
                        help="saliency method (default gradcam; metrics/gradcam_segment.json names "
                             "the best one per model under best_method)")
    parser.add_argument("--binarize", default=None,
                        help="otsu | fixed:<0..1> | top_percent:<0..100> (default: the "
                             "setting chosen on validation by gradcam_segment, else otsu)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input side in px (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per saliency call (default 16; lower it if out of memory)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    return parser


def segment_main(argv: Sequence[str] | None = None) -> int:
    """`retrieval segment IMAGES --out MASKS [--masks GT] ...`; user errors: one line, exit 2."""
    args = segment_parser().parse_args(argv)
    outputs.run_main(lambda: segment_folder(args))
    return 0


def segment_folder(args: argparse.Namespace) -> pd.DataFrame:
    """Run the command; returns the per-image table (also written with --masks)."""
    images_dir, out = args.images, args.out
    if not images_dir.is_dir():
        raise UserError(f"images folder {images_dir} does not exist or is not a folder: give "
                        "a folder of images")
    if args.masks is not None and not args.masks.is_dir():
        raise UserError(f"masks folder {args.masks} does not exist: give the folder of "
                        "ground-truth masks, or leave --masks out")
    for other in (images_dir, args.masks):
        if other is not None and out.resolve().is_relative_to(other.resolve()):
            raise UserError(f"--out {out} lies inside {other}: write the masks elsewhere")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    model_file = args.model or Path(DEFAULT_MODEL)
    explainer_file = args.prototypes or (Path(DEFAULT_PROTOTYPES) if args.model is None
                                         else None)
    if args.prototypes is not None and not args.prototypes.is_file():
        raise UserError(f"prototypes file {args.prototypes} does not exist")
    explainer, checkpoint, chosen = load_explainer(model_file, explainer_file)
    image_size = args.image_size or checkpoint.get("image_size")
    if not image_size:
        raise UserError(f"{model_file} does not record its image size: pass --image-size")
    setting = parse_binarization(args.binarize or chosen.get(args.method, "otsu"))
    explainer.model.to(runtime.resolve_device(args.device))
    _refuse_stem_clashes(images_dir)

    rows, skipped = [], []
    for batch in _decoded_batches(images_dir, args.batch_size, skipped):
        views = torch.stack([transforms.eval_crop(image_size)(
            transforms.decode_transform(image_size)(image)) for _, image in batch])
        masks = binarize_maps(explain(explainer, args.method, views), setting)
        for (relative, image), mask in zip(batch, masks, strict=True):
            target = out / relative.with_suffix(".png")
            write_mask_png(target, restore_mask(mask, image.height, image.width))
            rows.append({"file": relative.as_posix(), "mask": str(target),
                         "foreground_fraction": float(mask.mean()),
                         **_truth_scores(args.masks, relative, image, mask, image_size)})
    shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    if not rows:
        found = f" (only {len(skipped)} other files: {shown})" if skipped else ""
        raise UserError(f"{images_dir} contains no images Pillow can read{found}: give a "
                        "folder of images")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not images: {shown}", file=sys.stderr)
    table = pd.DataFrame(rows)
    message = (f"wrote {len(table)} masks to {out} ({args.method}, "
               f"{format_binarization(setting)})")
    if args.masks is not None:
        outputs.write_csv(out / "iou_table.csv", table)
        scored = table.dropna(subset=["iou"])
        message += (f"; mean IoU {scored['iou'].mean():.3f} over {len(scored)} images with a "
                    f"mask -> {out / 'iou_table.csv'}" if len(scored) else
                    "; no image had a matching mask")
    print(message)
    return table


def _decoded_batches(folder: Path, batch_size: int, skipped: list[str]
                     ) -> Iterator[list[tuple[Path, Image.Image]]]:
    """Batches of (path relative to folder, RGB image); undecodable files go to ``skipped``."""
    batch = []
    for path in _files(folder):
        try:
            image = data.load_rgb(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            skipped.append(path.relative_to(folder).as_posix())
            continue
        batch.append((path.relative_to(folder), image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _refuse_stem_clashes(folder: Path) -> None:
    """Two images with one folder and stem would write one mask file: refuse before writing any.
    Only files sharing a stem are opened (a header read), so the check costs nothing usually."""
    by_stem: dict[Path, list[Path]] = {}
    for path in _files(folder):
        by_stem.setdefault(path.relative_to(folder).with_suffix(""), []).append(path)
    for stem, paths in by_stem.items():
        images = [p for p in paths if len(paths) > 1 and _is_image(p)]
        if len(images) > 1:
            raise UserError(f"{images[0]} and {images[1]} would both write the mask "
                            f"{stem.with_suffix('.png')} (same folder and stem): rename one")


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path):
            return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _files(folder: Path) -> list[Path]:
    """Regular files below ``folder``, sorted; hidden entries skipped, symlinked folders not
    followed (no loops)."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(current) / f for f in files if not f.startswith(".")]
    return sorted(p for p in found if p.is_file())


def _truth_scores(masks_dir: Path | None, relative: Path, image: Image.Image, mask: np.ndarray,
                  image_size: int) -> dict:
    """{"mask_status", "iou", "dice"} of a predicted model-view mask against its ground truth."""
    if masks_dir is None:
        return {}
    folder = masks_dir / relative.parent
    found = sorted(folder.glob(glob.escape(relative.stem) + ".*")) if folder.is_dir() else []
    if not found:
        return {"mask_status": "missing", "iou": np.nan, "dice": np.nan}
    truth = data.load_mask(found[0])
    if truth.shape != (image.height, image.width):
        return {"mask_status": "size differs", "iou": np.nan, "dice": np.nan}
    truth = align_mask(truth, image_size)
    return {"mask_status": "ok", "iou": cam.iou(mask, truth), "dice": cam.dice(mask, truth)}

