"""Saliency maps for embedding and classifier models, and how well they segment the object.

What to explain is a small callable *target* applied to one image's model output (the
pytorch-grad-cam convention): ``SimilarityToPrototype`` for embedding models, ``ClassLogit`` for
classifiers. ``saliency_maps`` turns a batch of images and one target per image into maps in
[0, 1], with a method of the registry ``SALIENCY_METHODS`` (adding a method is one entry there);
``binarize`` turns maps into masks, with a setting written in the one binarisation grammar
(``parse_binarization``); ``iou``/``dice`` score masks against ground truth;
``centered_ellipse_mask`` and ``full_mask`` are the trivial baselines the maps have to beat.

Models follow one contract: ``forward(x (B, 3, H, W))`` returns (B, D) embeddings or (B, C) logits,
and the attribute ``target_layer`` is the module whose output Grad-CAM explains (the last
convolutional block).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

# pytorch_grad_cam (and the OpenCV it loads) is imported only when a CAM method runs: config
# validation reads the registries below, and loading params should not cost seconds of imports.
if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM

Target = Callable[[torch.Tensor], torch.Tensor]


# --- targets: what to explain ---------------------------------------------------------------


class SimilarityToPrototype:
    """Cosine similarity of an image's embedding to a class prototype (D,).

    The prototype is normalised here, so the mean of a class's training embeddings can be passed
    as it is (see ``class_prototypes``).
    """

    def __init__(self, prototype: torch.Tensor | np.ndarray) -> None:
        if isinstance(prototype, torch.Tensor):
            prototype = prototype.detach().cpu().float()
        else:
            prototype = torch.as_tensor(np.asarray(prototype), dtype=torch.float32)
        if prototype.ndim != 1:
            raise ValueError(f"prototype must be 1-D (D,), got shape {tuple(prototype.shape)}")
        norm = prototype.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("prototype must be finite and non-zero")
        self.prototype = prototype / norm

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        # (D,) -> scalar or (B, D) -> (B,); divide by the norm anyway so the target is a true
        # cosine even for a model that forgot to normalise.
        prototype = self.prototype.to(model_output.device, model_output.dtype)
        norm = model_output.norm(dim=-1).clamp_min(1e-12)
        return (model_output * prototype).sum(dim=-1) / norm


class ClassLogit:
    """The logit of class ``index`` of a classifier's output (C,) or (B, C)."""

    def __init__(self, index: int) -> None:
        self.index = int(index)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output[..., self.index]


def class_prototypes(embeddings: np.ndarray, labels: Sequence | np.ndarray) -> dict:
    """{label: the mean embedding of that class, L2-normalised (D,)} from (N, D) embeddings."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"embeddings must be (N, D) with one label each, got {embeddings.shape} "
            f"and {len(labels)} labels"
        )
    prototypes = {}
    for label in np.unique(labels):
        mean = embeddings[labels == label].mean(axis=0)
        prototypes[label.item()] = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
    return prototypes


# --- saliency ---------------------------------------------------------------------------------


def saliency_maps(
    model: nn.Module, images: torch.Tensor, targets: Sequence[Target], method: str
) -> np.ndarray:
    """(B, H, W) float32 maps in [0, 1], one per image, of what drives ``targets[i]`` on image i.

    ``method`` names an entry of ``SALIENCY_METHODS`` (see there). Every map is min-max
    normalised on its own. The model's training mode, ``requires_grad`` flags and ``.grad`` are
    left as they were.
    """
    if method not in SALIENCY_METHODS:
        raise ValueError(f"method must be one of {tuple(SALIENCY_METHODS)}, got {method!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if len(targets) != len(images):
        raise ValueError(f"targets must have one entry per image: {len(targets)} for {len(images)}")
    entry = SALIENCY_METHODS[method]
    if entry.parts:  # made of other methods' maps
        return entry.combine([saliency_maps(model, images, targets, part)
                              for part in entry.parts])
    if entry.needs_target_layer and not isinstance(getattr(model, "target_layer", None),
                                                   nn.Module):
        raise ValueError(f"{method} needs model.target_layer (an nn.Module); the model has none")

    device = next(model.parameters()).device
    # A leaf that requires grad makes every activation require grad, so frozen backbones
    # (requires_grad False) can still be explained; it is a copy, the caller's tensor is untouched.
    images = images.detach().to(device).clone().requires_grad_(True)
    with _explaining(model), torch.enable_grad():
        maps = entry.compute(model, images, targets)
    return np.clip(maps, 0.0, 1.0).astype(np.float32)


@contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside; training mode, flags and ``.grad`` restored after.

    Freezing means backward computes only what the maps need and accumulates nothing into the
    parameters; ``.grad`` is put back because pytorch-grad-cam calls ``model.zero_grad()``.
    """
    was_training = model.training
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.eval()
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


@contextmanager
def _released(cam: BaseCAM) -> Iterator[BaseCAM]:
    # Not the package's own `with cam:`, whose __exit__ prints and swallows IndexError.
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()


def _grad_cam(
    cam_class: type[BaseCAM], model: nn.Module, images: torch.Tensor, targets: Sequence[Target],
    layers: Sequence[nn.Module] | None = None, **smoothing: bool
) -> np.ndarray:
    """pytorch-grad-cam's ``cam_class`` on ``layers`` (default: the target layer). Several layers
    are fused as the package does: each map is upsampled to the image, then they are averaged.
    ``smoothing``: the package's aug_smooth (mean over flipped and rescaled copies) and
    eigen_smooth (first principal component of the weighted activations)."""
    layers = list(layers) if layers is not None else [model.target_layer]
    with _released(cam_class(model=model, target_layers=layers)) as cam:
        # (B, H, W), already in [0, 1]
        return cam(input_tensor=images, targets=list(targets), **smoothing)


def _gradcam(model: nn.Module, images: torch.Tensor, targets: Sequence[Target],
             **smoothing: bool) -> np.ndarray:
    from pytorch_grad_cam import GradCAM

    return _grad_cam(GradCAM, model, images, targets, **smoothing)


def _gradcam_plus_plus(
    model: nn.Module, images: torch.Tensor, targets: Sequence[Target]
) -> np.ndarray:
    from pytorch_grad_cam import GradCAMPlusPlus

    return _grad_cam(GradCAMPlusPlus, model, images, targets)


def _layer_cam(model: nn.Module, images: torch.Tensor, targets: Sequence[Target],
               **smoothing: bool) -> np.ndarray:
    from pytorch_grad_cam import LayerCAM

    return _grad_cam(LayerCAM, model, images, targets, cam_layers(model), **smoothing)


def cam_layers(model: nn.Module) -> list[nn.Module]:
    """The layers multi-layer CAMs fuse: the model's ``fine_layers`` (higher-resolution stages,
    finest first), then its target layer."""
    return [*getattr(model, "fine_layers", ()), model.target_layer]


def _product(maps: Sequence[np.ndarray]) -> np.ndarray:
    return _normalized(np.prod(np.stack(maps), axis=0)).astype(np.float32)


def _input_gradient(
    model: nn.Module, images: torch.Tensor, targets: Sequence[Target]
) -> np.ndarray:
    return _gradient_map(_input_gradients(model, images, targets))


def _guided_backprop(
    model: nn.Module, images: torch.Tensor, targets: Sequence[Target]
) -> np.ndarray:
    with guided_relus(model):
        return _gradient_map(_input_gradients(model, images, targets))


def _input_gradients(
    model: nn.Module, images: torch.Tensor, targets: Sequence[Target]
) -> torch.Tensor:
    """d (sum of each image's target) / d images: (B, C, H, W); images must require grad."""
    outputs = model(images)
    score = torch.stack(
        [target(output) for target, output in zip(targets, outputs, strict=True)]
    ).sum()
    (grad,) = torch.autograd.grad(score, images)
    return grad


def _gradient_map(grad: torch.Tensor) -> np.ndarray:
    return _normalized(grad.abs().amax(dim=1).float().cpu().numpy())  # (B, H, W)


def _normalized(maps: np.ndarray) -> np.ndarray:
    """Each (H, W) map of (B, H, W) min-max scaled to [0, 1]; a flat map becomes all zero."""
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)


class _PositiveGradient(torch.autograd.Function):
    """Identity whose backward keeps only positive gradients.

    Placed after a ReLU (whose backward already masks by input > 0) it gives guided backprop's
    rule, grad * (input > 0) * (grad > 0).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # a new tensor, so in-place ReLUs and later in-place adds stay valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[None]:
    """Inside, backward through every ``nn.ReLU`` and ``nn.ReLU6`` of ``model`` follows guided
    backprop (EfficientNet-Lite0's activations are ReLU6: without them guided backprop would be
    the plain input gradient).

    Forward hooks instead of pytorch-grad-cam's ``GuidedBackpropReLUModel``, which explains only
    the first image's class logit and swaps the model's ReLU modules for new ones.
    """
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
    if not relus:
        raise ValueError("guided_backprop needs nn.ReLU modules; the model has none")
    handles = [m.register_forward_hook(lambda _m, _x, y: _PositiveGradient.apply(y)) for m in relus]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the registry of saliency methods ----------------------------------------------------------
# One entry per method, as pytorch-grad-cam's name -> class table: config validation, the
# `retrieval segment --method` choices and the gradcam_segment stage all read it, so a new
# method is one function and one entry here.


def computed_methods(methods: Sequence[str]) -> set[str]:
    """The methods whose maps are computed (not combined) when ``methods`` all run."""
    found: set[str] = set()
    for method in methods:
        parts = SALIENCY_METHODS[method].parts
        found |= computed_methods(parts) if parts else {method}
    return found


@dataclass(frozen=True)
class SaliencyMethod:
    """How to compute a method's maps, and what it needs of the model."""

    # (model, images (B, C, H, W) requiring grad, one target per image) -> (B, H, W) in [0, 1];
    # called in eval mode with frozen parameters and grad enabled (see ``saliency_maps``).
    compute: Callable[[nn.Module, torch.Tensor, Sequence[Target]], np.ndarray] | None
    needs_target_layer: bool = False  # explains model.target_layer (the last conv block)
    # A method made of other methods' maps: ``combine(maps of parts)``; callers that computed
    # the parts already (gradcam_segment) reuse them.
    parts: tuple[str, ...] = ()
    combine: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None


SALIENCY_METHODS: dict[str, SaliencyMethod] = {
    # pytorch-grad-cam on model.target_layer, upsampled to the image size.
    "gradcam": SaliencyMethod(_gradcam, needs_target_layer=True),
    "gradcam++": SaliencyMethod(_gradcam_plus_plus, needs_target_layer=True),
    # LayerCAM (Jiang et al. 2021) on model.fine_layers and the target layer, fused: the
    # earlier stages' finer grids (Lite0 at 160 px: 20x20 and 10x10 against 5x5) outline the
    # object.
    "layercam": SaliencyMethod(_layer_cam, needs_target_layer=True),
    # The package's smoothing, which costs time: eigen_smooth (the weighted activations' first
    # principal component) and aug_smooth (the mean over 6 flipped/rescaled copies: 6x the time).
    "gradcam_eigen": SaliencyMethod(partial(_gradcam, eigen_smooth=True),
                                    needs_target_layer=True),
    "layercam_aug": SaliencyMethod(partial(_layer_cam, aug_smooth=True),
                                   needs_target_layer=True),
    # Guided Grad-CAM (Selvaraju et al.): the pixel-sharp guided gradients, gated by where
    # Grad-CAM looks; their product, min-max normalised.
    "guided_gradcam": SaliencyMethod(None, parts=("gradcam", "guided_backprop"),
                                     combine=_product),
    # |d target / d image|, max over channels.
    "input_gradient": SaliencyMethod(_input_gradient),
    # The same on guided gradients; only nn.ReLU modules are guided (a functional F.relu is not).
    "guided_backprop": SaliencyMethod(_guided_backprop),
}


# --- binarisation ---------------------------------------------------------------------------


class _ValueRange(NamedTuple):
    low: float
    high: float
    meaning: str  # said when a value lies outside [low, high]


# The binarisation grammar, "otsu" | "fixed:<0..1>" | "top_percent:<0..100>": each method and
# the range of its value (None: it takes none). params.yaml, the stage and `retrieval segment
# --binarize` all go through ``parse_binarization``.
_BINARIZATIONS: dict[str, _ValueRange | None] = {
    "otsu": None,
    "fixed": _ValueRange(0.0, 1.0, "a fixed threshold lies in [0, 1]"),
    "top_percent": _ValueRange(0.0, 100.0, "top_percent takes a percentage, 0..100"),
}
BINARIZATION_METHODS = tuple(_BINARIZATIONS)
BINARIZATION_GRAMMAR = "otsu, fixed:<0..1> or top_percent:<0..100>"
_SETTING = re.compile(r"(?P<method>[a-z_]+)(:(?P<value>\d+(\.\d+)?|\.\d+))?")

Binarization = tuple[str, float | None]  # ("otsu", None), ("fixed", 0.5), ("top_percent", 30.0)


def check_params(methods: Sequence[str], binarize: Sequence[str],
                 key: str = "gradcam_segment") -> None:
    """Every method is in the registry and every binarisation parses, or a ParamsError that
    names the key (the stage calls this before any work)."""
    from retrieval.config import ParamsError

    for method in methods:
        if method not in SALIENCY_METHODS:
            raise ParamsError(f"{key}.methods has unknown '{method}' (valid: "
                              f"{sorted(SALIENCY_METHODS)}): change {key}.methods in params.yaml")
    for candidate in binarize:
        try:
            parse_binarization(candidate)
        except ValueError as error:
            raise ParamsError(f"{key}.binarize has '{candidate}' ({error}): change "
                              f"{key}.binarize in params.yaml") from error


def parse_binarization(text: str) -> Binarization:
    """"otsu" -> ("otsu", None); "top_percent:30" -> ("top_percent", 30.0); "fixed:0.5" -> ...

    Raises ValueError saying what is wrong (callers add where the text came from).
    """
    found = _SETTING.fullmatch(text)
    if found is None or found["method"] not in _BINARIZATIONS:
        raise ValueError(f"use {BINARIZATION_GRAMMAR}")
    method, value_range = found["method"], _BINARIZATIONS[found["method"]]
    if (value_range is None) != (found["value"] is None):  # otsu takes no value, the others one
        raise ValueError(f"use {BINARIZATION_GRAMMAR}")
    if value_range is None:
        return method, None
    value = float(found["value"])
    if not value_range.low <= value <= value_range.high:
        raise ValueError(value_range.meaning)
    return method, value


def format_binarization(setting: Binarization) -> str:
    """The inverse of ``parse_binarization``: ("top_percent", 30.0) -> "top_percent:30"."""
    method, value = setting
    return method if value is None else f"{method}:{value:g}"


def binarize(saliency: np.ndarray, method: str, value: float | None = None) -> np.ndarray:
    """Boolean mask(s) of the same shape as ``saliency`` (H, W) or (B, H, W), values in [0, 1].

    "otsu": Otsu's threshold on a 256-bin histogram of each map (``value`` is ignored); a pixel is
    foreground when its bin is above the threshold bin, as with OpenCV's THRESH_OTSU on the map
    scaled to uint8. "fixed": ``saliency >= value``. "top_percent": exactly the ``value`` percent
    (0-100) highest pixels of each map, rounded to whole pixels; ties are broken by position.
    """
    if method not in BINARIZATION_METHODS:
        raise ValueError(f"method must be one of {BINARIZATION_METHODS}, got {method!r}")
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.ndim not in (2, 3):
        raise ValueError(f"saliency must be (H, W) or (B, H, W), got shape {saliency.shape}")
    if saliency.size and (saliency.min() < 0 or saliency.max() > 1):
        raise ValueError("saliency must lie in [0, 1]: normalise the maps first")
    if method != "otsu" and value is None:
        raise ValueError(f"value is required for method {method!r}")
    if method == "top_percent" and not 0 <= value <= 100:
        raise ValueError(f"value for top_percent must be a percentage in [0, 100], got {value}")

    batch = saliency.reshape(-1, saliency.shape[-2] * saliency.shape[-1])  # (B, H*W)
    if method == "otsu":
        masks = _otsu(batch)
    elif method == "fixed":
        masks = batch >= value
    else:
        masks = _top(batch, round(value / 100 * batch.shape[1]))
    return masks.reshape(saliency.shape)


def _otsu(batch: np.ndarray) -> np.ndarray:
    """Otsu's method per row of (B, N) values in [0, 1]; the same sums as OpenCV's, vectorised."""
    bins = np.minimum((batch * 256).astype(np.int64), 255)  # value k/255 falls in bin k
    offsets = np.arange(len(bins))[:, None] * 256
    hist = np.bincount((bins + offsets).ravel(), minlength=len(bins) * 256).reshape(-1, 256)
    p = hist / hist.sum(axis=1, keepdims=True)
    levels = np.arange(256)
    q1 = np.cumsum(p, axis=1)  # weight of class "<= t"
    m1 = np.cumsum(p * levels, axis=1)
    mu = m1[:, -1:]
    q2 = 1 - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        between = q1 * q2 * (m1 / q1 - (mu - m1) / q2) ** 2
    # One class (nearly) empty: no split, with OpenCV's epsilon. Ties go to the lowest threshold,
    # as in OpenCV.
    eps = np.finfo(np.float32).eps
    between = np.where((q1 >= eps) & (q2 >= eps), between, 0.0)
    threshold = between.argmax(axis=1)
    return bins > threshold[:, None]


def _top(batch: np.ndarray, count: int) -> np.ndarray:
    order = np.argsort(-batch, axis=1, kind="stable")[:, :count]
    masks = np.zeros(batch.shape, dtype=bool)
    np.put_along_axis(masks, order, True, axis=1)
    return masks


def choose_binarization(
    saliencies: np.ndarray, gt_masks: np.ndarray, candidates: Sequence[tuple[str, float]]
) -> tuple[str, float]:
    """The (method, value) among ``candidates`` with the best mean IoU; the first one on ties.

    Meant for the validation split; the choice is then applied unchanged to the test split.
    """
    if not candidates:
        raise ValueError("candidates must name at least one (method, value) pair")
    gt_masks = np.asarray(gt_masks, dtype=bool)
    scores = [iou_batch(binarize(saliencies, m, v), gt_masks).mean() for m, v in candidates]
    method, value = candidates[int(np.argmax(scores))]
    return method, value


# --- scores -----------------------------------------------------------------------------------
# Convention: when prediction and ground truth are both empty they agree perfectly, so IoU and
# Dice are 1.0 (not NaN, which would silently drop the image from a mean).


def iou_batch(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N,) intersection over union of (N, H, W) boolean masks; 1.0 where both are empty."""
    inter, pred_area, gt_area = _areas(pred, gt, ndim=3)
    union = pred_area + gt_area - inter
    return np.divide(inter, union, out=np.ones(len(inter)), where=union > 0)


def dice_batch(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N,) Dice coefficient 2|P&G| / (|P| + |G|) of (N, H, W) boolean masks; 1.0 where both are
    empty."""
    inter, pred_area, gt_area = _areas(pred, gt, ndim=3)
    total = pred_area + gt_area
    return np.divide(2 * inter, total, out=np.ones(len(inter)), where=total > 0)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two (H, W) boolean masks; 1.0 when both are empty."""
    _areas(pred, gt, ndim=2)
    return float(iou_batch(np.asarray(pred)[None], np.asarray(gt)[None])[0])


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two (H, W) boolean masks; 1.0 when both are empty."""
    _areas(pred, gt, ndim=2)
    return float(dice_batch(np.asarray(pred)[None], np.asarray(gt)[None])[0])


def _areas(pred: np.ndarray, gt: np.ndarray, ndim: int) -> tuple[np.ndarray, ...]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != ndim:
        raise ValueError(
            f"pred and gt must be {ndim}-D masks of one shape, got {pred.shape} and {gt.shape}"
        )
    axes = tuple(range(-2, 0))
    return (pred & gt).sum(axis=axes), pred.sum(axis=axes), gt.sum(axis=axes)


# --- trivial baselines ----------------------------------------------------------------------


def centered_ellipse_mask(h: int, w: int, foreground_fraction: float) -> np.ndarray:
    """(H, W) bool: a centred ellipse with the image's aspect covering that fraction of pixels.

    Exactly ``round(foreground_fraction * h * w)`` pixels, taken in order of elliptical radius:
    the ellipse of that area, clipped by the image border above pi/4.
    """
    if h < 1 or w < 1:
        raise ValueError(f"h and w must be positive, got {h} x {w}")
    if not 0 <= foreground_fraction <= 1:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
    y = (np.arange(h) + 0.5 - h / 2) / (h / 2)  # pixel centres scaled so the image spans [-1, 1]
    x = (np.arange(w) + 0.5 - w / 2) / (w / 2)
    y, x = np.meshgrid(y, x, indexing="ij")  # (H, W) each
    radius2 = y**2 + x**2
    # Many pixels share a radius on a grid. Ordering ties by (|y|, |x|, quadrant) keeps each
    # pixel's four mirror images together, so an exact count breaks symmetry by at most 3 pixels.
    quadrant = 2 * (y < 0) + (x < 0)
    order = np.lexsort(tuple(a.ravel() for a in (quadrant, np.abs(x), np.abs(y), radius2)))
    mask = np.zeros(h * w, dtype=bool)
    mask[order[: round(foreground_fraction * h * w)]] = True
    return mask.reshape(h, w)


def centered_box_mask(h: int, w: int, foreground_fraction: float) -> np.ndarray:
    """(H, W) bool: a centred box with the image's aspect (a square on the square model view)
    covering about that fraction of pixels (sides h * sqrt(f) and w * sqrt(f), rounded)."""
    if h < 1 or w < 1:
        raise ValueError(f"h and w must be positive, got {h} x {w}")
    if not 0 <= foreground_fraction <= 1:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
    side = np.sqrt(foreground_fraction)
    bh, bw = round(h * side), round(w * side)
    top, left = (h - bh) // 2, (w - bw) // 2
    mask = np.zeros((h, w), dtype=bool)
    mask[top:top + bh, left:left + bw] = True
    return mask


def full_mask(h: int, w: int) -> np.ndarray:
    """(H, W) bool: every pixel is foreground."""
    return np.ones((h, w), dtype=bool)


# --- summary ----------------------------------------------------------------------------------


def summarize(scores: np.ndarray, labels: Sequence | np.ndarray) -> dict:
    """Mean, median and count of per-image ``scores``, overall and per class.

    {"mean", "median", "count", "per_class": {str(label): {"mean", "median", "count"}}}; labels
    become strings so the result can be written as JSON.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or len(scores) != len(labels) or len(scores) == 0:
        raise ValueError(
            f"scores must be 1-D, non-empty, with one label each: {scores.shape} scores, "
            f"{len(labels)} labels"
        )

    def stats(values: np.ndarray) -> dict:
        return {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "count": int(len(values)),
        }

    per_class = {str(label): stats(scores[labels == label]) for label in np.unique(labels)}
    return {**stats(scores), "per_class": per_class}
