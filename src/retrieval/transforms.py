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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

if TYPE_CHECKING:
    from retrieval.config import AugmentConfig

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


class BatchAugment:
    """Random resized crop, horizontal flip and colour jitter of a whole uint8 batch at once,
    ending in the normalised model input.

    The distributions of ``transforms.train_augment`` (torchvision's RandomResizedCrop with
    scale (crop_scale_min, 1) and ratio (3/4, 4/3), 10 tries then the whole image;
    RandomHorizontalFlip; ColorJitter(j, j, j) in a random order per image), drawn for every
    image as tensors from its own ``generator`` (``reseed`` it every epoch, no global state) and
    applied in three batched ops: crop + resize + flip as one bilinear ``grid_sample``; then
    jitter and the backbone's normalisation, all linear in the RGB vector, as one per-image 3x3
    matrix and offset (a grouped 1x1 convolution); then a clamp to the range of valid pixels.
    Two differences from torchvision, both immaterial here: no antialiasing (the crop is never
    more than the cache's 8/7 larger than the output) and one clamp at the end instead of one
    after each jitter. torchvision's per-image transforms in a Python loop cost ~5 ms an image,
    ~20% of a ResNet-18 training step at 160 px on 2 CPU cores; this costs a few percent.
    """

    GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale

    def __init__(self, image_size: int, augment: AugmentConfig,
                 normalization: Normalization):
        self.size, self.scale_min = image_size, augment.crop_scale_min
        self.normalization = normalization
        self.flip, self.jitter = augment.flip, augment.color_jitter
        self.generator = torch.Generator()  # on the CPU: the draws are small

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed`` (``training.fit`` does, every epoch)."""
        self.generator.manual_seed(seed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) on any device -> normalised float32 (B, 3, s, s), channels_last."""
        n, _, height, width = batch.shape
        grid = self._sampling_grid(n, height, width).to(batch.device)  # (B, s, s, 2)
        x = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)  # (B, 3, s, s) in [0, 255]
        matrix, offset = self._colour_map(x.mean(dim=(2, 3)).cpu())  # (B, 3, 3), (B, 3)
        # Per image y = matrix @ rgb + offset at every pixel: a 1x1 convolution with one group
        # per image (far faster on a CPU than a batched matmul with an inner size of 3).
        y = F.conv2d(x.view(1, 3 * n, self.size, self.size),
                     matrix.reshape(3 * n, 3, 1, 1).to(batch.device),
                     offset.reshape(3 * n).to(batch.device), groups=n).view_as(x)
        low, high = self._normalised_range(batch.device)
        return y.clamp_(low, high).contiguous(memory_format=torch.channels_last)

    def _sampling_grid(self, n: int, height: int, width: int) -> torch.Tensor:
        """Where each output pixel samples the input, in grid_sample's [-1, 1] coordinates."""
        g = self.generator
        area = height * width * torch.empty(n, 10).uniform_(self.scale_min, 1.0, generator=g)
        ratio = torch.exp(torch.empty(n, 10).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                           generator=g))
        w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.float().argmax(dim=1, keepdim=True)  # the first of the 10 tries that fits
        any_fits = fits.any(dim=1)
        w = torch.where(any_fits, w.gather(1, first)[:, 0], torch.tensor(float(width)))
        h = torch.where(any_fits, h.gather(1, first)[:, 0], torch.tensor(float(height)))
        top = torch.floor(torch.rand(n, generator=g) * (height - h + 1))
        left = torch.floor(torch.rand(n, generator=g) * (width - w + 1))
        steps = (torch.arange(self.size) + 0.5) / self.size  # output pixel centres in (0, 1)
        xs = (left[:, None] + w[:, None] * steps) * 2 / width - 1  # (B, s)
        ys = (top[:, None] + h[:, None] * steps) * 2 / height - 1  # (B, s)
        if self.flip:
            xs = torch.where((torch.rand(n, generator=g) < 0.5)[:, None], xs.flip(1), xs)
        return torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)

    def _colour_map(self, mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the jitters then the normalisation as one affine map of the RGB vector."""
        n, g = len(mean_rgb), self.generator
        matrix, offset = torch.eye(3).repeat(n, 1, 1), torch.zeros(n, 3)
        if self.jitter > 0:
            gray = torch.tensor(self.GRAY)
            low = max(0.0, 1 - self.jitter)
            factors = torch.empty(n, 3).uniform_(low, 1 + self.jitter, generator=g)
            order = torch.argsort(torch.rand(n, 3, generator=g), dim=1)  # jitter order, per image
            for step in range(3):
                kind = order[:, step]
                f = factors.gather(1, kind[:, None])  # (B, 1)
                # brightness: f x; contrast: f x + (1 - f) mean grey; saturation:
                # f x + (1 - f) grey(x). Each maps (matrix, offset) to a new pair.
                mean_gray = (matrix @ mean_rgb[:, :, None])[:, :, 0] @ gray + offset @ gray
                to_gray = torch.outer(torch.ones(3), gray)  # grey(x) in every channel
                saturation = (f[:, :, None] * torch.eye(3)
                              + (1 - f)[:, :, None] * to_gray)  # (B, 3, 3)
                new_matrix = torch.where((kind == 2)[:, None, None], saturation @ matrix,
                                         f[:, :, None] * matrix)
                new_offset = torch.where((kind == 2)[:, None], (saturation @ offset[:, :, None])
                                         [:, :, 0], f * offset)
                new_offset = new_offset + torch.where((kind == 1)[:, None],
                                                      (1 - f) * mean_gray[:, None], 0.0)
                matrix, offset = new_matrix, new_offset
        mean = torch.tensor(self.normalization.mean)
        scale = 1 / (255 * torch.tensor(self.normalization.std))
        return scale[None, :, None] * matrix, scale * offset - mean * 255 * scale

    def _normalised_range(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values 0 and 255 after normalisation, per channel (1, 3, 1, 1)."""
        mean, std = self.normalization.tensors(device)
        return (0 - mean) / std, (1 - mean) / std
