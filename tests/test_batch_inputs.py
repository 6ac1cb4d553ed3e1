"""Model inputs made a whole batch at a time: runtime.model_input and transforms.BatchAugment.

Both replace slower per-image or out-of-place code (issue #7), so each is checked against the
torchvision / transforms reference it stands for.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from retrieval import runtime, training, transforms
from retrieval.config import AugmentConfig

CPU = torch.device("cpu")
IMAGENET = transforms.NORMALIZATIONS["imagenet"]


def random_images(n: int = 4, side: int = 40, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=generator)


def test_model_input_is_normalize_bit_for_bit_in_channels_last():
    images = random_images()
    x = runtime.model_input(images, CPU, IMAGENET)
    assert torch.equal(x, transforms.normalize(images, IMAGENET))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert images.dtype == torch.uint8  # the cached batch is not modified


def test_batch_augment_without_randomness_is_resize_then_normalize():
    # crop scale 1 on a square image: every try of ratio != 1 overflows, so the whole image
    augment = transforms.BatchAugment(32, AugmentConfig(enabled=True, crop_scale_min=1.0,
                                                      flip=False, color_jitter=0.0), IMAGENET)
    images = random_images(side=40)
    expected = transforms.normalize(TF.resize(images.float(), [32, 32], antialias=False),
                                    IMAGENET)
    out = augment(images)
    assert out.shape == (4, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    # interior pixels: at the border grid_sample may read outside the crop, resize clamps
    assert torch.allclose(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4)


def test_colour_map_is_torchvision_jitter_then_normalize():
    augment = transforms.BatchAugment(16, AugmentConfig(enabled=True, color_jitter=0.4), IMAGENET)
    # Narrow mid-range values (seeded): even three 1.4x jitters stay inside [0, 1], so
    # torchvision never clamps and the affine map must match it exactly.
    x = 110 + 30 * torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    augment.reseed(3)
    matrix, offset = augment._colour_map(x.mean(dim=(2, 3)))
    replay = torch.Generator().manual_seed(3)  # the draws: factors (B, 3), then the order
    factors = torch.empty(6, 3).uniform_(0.6, 1.4, generator=replay)
    order = torch.argsort(torch.rand(6, 3, generator=replay), dim=1)
    jitters = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for b in range(6):
        image = x[b:b + 1] / 255
        for kind in order[b].tolist():
            image = jitters[kind](image, factors[b, kind].item())
        expected = transforms.normalize(image * 255, IMAGENET)[0]
        ours = (matrix[b] @ x[b].reshape(3, -1) + offset[b, :, None]).reshape(3, 8, 8)
        assert torch.allclose(ours, expected, atol=1e-4), order[b]


def test_crops_follow_random_resized_crop_and_flip_half():
    augment = transforms.BatchAugment(32, AugmentConfig(enabled=True, crop_scale_min=0.5), IMAGENET)
    grid = augment._sampling_grid(4000, 40, 40)  # (B, s, s, 2) in [-1, 1]
    xs, ys = grid[:, 0, :, 0], grid[:, :, 0, 1]
    step_x = (xs[:, -1] - xs[:, 0]).abs() / 31 * 32 / 2 * 40  # crop width in pixels
    step_y = (ys[:, -1] - ys[:, 0]) / 31 * 32 / 2 * 40
    area, ratio = step_x * step_y / 1600, step_x / step_y
    assert area.min() >= 0.5 - 0.03 and area.max() <= 1 + 1e-4
    assert ratio.min() >= 3 / 4 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    assert xs.abs().max() <= 1 and ys.abs().max() <= 1  # inside the image
    flipped = (xs[:, -1] < xs[:, 0]).float().mean()
    assert abs(flipped - 0.5) < 0.05


def test_batch_augment_draws_from_its_own_seeded_stream_and_stays_in_the_pixel_range():
    augment = transforms.BatchAugment(24, AugmentConfig(enabled=True, color_jitter=0.5), IMAGENET)
    images = random_images(8, 28)
    augment.reseed(7)
    global_state = torch.get_rng_state()
    first = augment(images)
    assert torch.equal(torch.get_rng_state(), global_state)  # torch's global RNG untouched
    assert not torch.equal(first, augment(images))  # the stream moves on ...
    torch.manual_seed(123)  # ... and does not depend on the global RNG
    augment.reseed(7)
    assert torch.equal(first, augment(images))
    low, high = augment._normalised_range(CPU)
    assert (first >= low - 1e-6).all() and (first <= high + 1e-6).all()
    assert math.isfinite(first.sum().item())


@pytest.mark.parametrize("enabled", [True, False])
def test_image_encoder_inputs_are_channels_last_float(enabled):
    from retrieval import config, models
    from retrieval.cache import ImageCache

    images = ImageCache(random_images(6, 37).numpy())
    net = models.EmbeddingNet(config.ModelConfig(weights="none",
                                                 backbone="cifar_resnet", cifar_n=1))
    encoder = training.ImageEncoder(net, images, 32, AugmentConfig(enabled=enabled), CPU,
                                    "fp32")
    x = encoder.inputs([0, 2, 5])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
