"""The one place that defines how pixels become model inputs.

Images are decoded once into a square uint8 cache at ``cache_size(image_size)`` (shorter side
resized, then centre-cropped; the 8/7 margin is the classic 256/224 ratio, room for random crops).
Evaluation centre-crops ``image_size`` from it; training augmentation random-resized-crops from
it. Both end with ToTensor-style scaling to [0, 1] and ImageNet mean/std normalisation.
``Resize(224)`` alone would keep the aspect ratio and could not be batched, hence the crop.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cache_size(image_size: int) -> int:
    return round(image_size * 8 / 7)


def decode_transform(image_size: int) -> v2.Compose:
    """PIL RGB image -> uint8 tensor (3, S, S), S = cache_size(image_size)."""
    size = cache_size(image_size)
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 normalised with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def eval_crop(image_size: int) -> v2.CenterCrop:
    """Cached uint8 tensors -> the evaluation view (batched: works on (B, 3, S, S))."""
    return v2.CenterCrop(image_size)


def train_augment(image_size: int, crop_scale_min: float, flip: bool,
                  color_jitter: float) -> v2.Compose:
    """Per-image random augmentation on a cached uint8 tensor (3, S, S) -> (3, s, s) uint8."""
    steps: list = [v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose(steps)


def eval_pil_transform(image_size: int) -> v2.Compose:
    """PIL image -> normalised float tensor (3, s, s): the same numbers as cache + eval_crop."""
    return v2.Compose([decode_transform(image_size), eval_crop(image_size),
                       v2.Lambda(lambda x: normalize(x[None])[0])])


def image_to_input(image: Image.Image, image_size: int) -> torch.Tensor:
    return eval_pil_transform(image_size)(image)


def channel_stats(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std over a batch (B, 3, H, W) of float tensors."""
    flat = images.transpose(0, 1).reshape(3, -1).double()
    return {"mean": flat.mean(1).tolist(), "std": flat.std(1).tolist()}


def normalization_problems(stats: dict[str, list[float]], mean_tolerance: float,
                           std_tolerance: float) -> list[str]:
    """Channels whose normalised mean is not ~0 or std not ~1 (empty list: all good)."""
    problems = []
    for channel, (mean, std) in enumerate(zip(stats["mean"], stats["std"], strict=True)):
        if abs(mean) > mean_tolerance:
            problems.append(f"channel {channel} mean {mean:.3f} not within {mean_tolerance} of 0")
        if abs(std - 1) > std_tolerance:
            problems.append(f"channel {channel} std {std:.3f} not within {std_tolerance} of 1")
    return problems
