"""The one place that defines how pixels become model inputs.

Images are decoded once into a square uint8 cache at ``cache_size(image_size)`` (shorter side
resized, then centre-cropped; the 8/7 margin is the classic 256/224 ratio, room for random crops).
Evaluation centre-crops ``image_size`` from it; training augmentation random-resized-crops from
it. Both end with ToTensor-style scaling to [0, 1] and the backbone's normalisation (its entry in
``NORMALIZATIONS``: ImageNet mean/std for the torchvision ResNets, (x - 127) / 128 for the
TF-trained EfficientNet-Lite0).
``Resize(224)`` alone would keep the aspect ratio and could not be batched, hence the crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """x -> (x / 255 - mean) / std per channel; mean and std in [0, 1] pixel units."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std as (1, 3, 1, 1) tensors."""
        return (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=device).view(1, 3, 1, 1))

    def expected_stats(self) -> dict[str, list[float]]:
        """Per-channel mean and std of normalised natural images (ImageNet's pixel statistics
        under this normalisation): 0 and 1 for ImageNet's own, else what verify_normalization
        checks against."""
        return {"mean": [(m - c) / s for m, c, s in zip(IMAGENET_MEAN, self.mean, self.std,
                                                         strict=True)],
                "std": [d / s for d, s in zip(IMAGENET_STD, self.std, strict=True)]}


NORMALIZATIONS = {
    "imagenet": Normalization("imagenet", IMAGENET_MEAN, IMAGENET_STD),
    # TensorFlow's EfficientNet-Lite preprocessing: (pixel - 127) / 128.
    "tf_lite": Normalization("tf_lite", (127 / 255,) * 3, (128 / 255,) * 3),
}


def cache_size(image_size: int) -> int:
    return round(image_size * 8 / 7)


def decode_transform(image_size: int) -> v2.Compose:
    """PIL RGB image -> uint8 tensor (3, S, S), S = cache_size(image_size)."""
    size = cache_size(image_size)
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def normalize(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 normalised."""
    mean, std = normalization.tensors(images.device)
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


def eval_pil_transform(image_size: int, normalization: Normalization) -> v2.Compose:
    """PIL image -> normalised float tensor (3, s, s): the same numbers as cache + eval_crop."""
    return v2.Compose([decode_transform(image_size), eval_crop(image_size),
                       v2.Lambda(lambda x: normalize(x[None], normalization)[0])])


def image_to_input(image: Image.Image, image_size: int,
                   normalization: Normalization) -> torch.Tensor:
    return eval_pil_transform(image_size, normalization)(image)


def channel_stats(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std over a batch (B, 3, H, W) of float tensors."""
    flat = images.transpose(0, 1).reshape(3, -1).double()
    return {"mean": flat.mean(1).tolist(), "std": flat.std(1).tolist()}


def normalization_problems(stats: dict[str, list[float]], expected: dict[str, list[float]],
                           mean_tolerance: float, std_tolerance: float) -> list[str]:
    """Channels whose normalised mean or std is off what the normalisation implies (empty list:
    all good). Tolerances are in units of the expected std, so they mean the same under every
    normalisation (for ImageNet's: within mean_tolerance of 0, std_tolerance of 1)."""
    problems = []
    for channel, (mean, std, want_mean, want_std) in enumerate(zip(
            stats["mean"], stats["std"], expected["mean"], expected["std"], strict=True)):
        if abs(mean - want_mean) > mean_tolerance * want_std:
            problems.append(f"channel {channel} mean {mean:.3f} not within "
                            f"{mean_tolerance * want_std:.3g} of {want_mean:.3f}")
        if abs(std / want_std - 1) > std_tolerance:
            problems.append(f"channel {channel} std {std:.3f} not within "
                            f"{std_tolerance * want_std:.3g} of {want_std:.3f}")
    return problems
