"""Pixels to model inputs: shapes, ImageNet normalisation, and the check that catches bad ones."""

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import VerifyNormalizationConfig
from retrieval.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    cache_size,
    channel_stats,
    decode_transform,
    eval_crop,
    eval_pil_transform,
    normalization_problems,
    normalize,
)

TOLERANCES = VerifyNormalizationConfig()  # the defaults params.yaml also uses
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
IMAGENET, TF_LITE = NORMALIZATIONS["imagenet"], NORMALIZATIONS["tf_lite"]


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    return normalize(images, IMAGENET)


def test_cache_size_keeps_the_256_to_224_margin():
    assert cache_size(224) == 256  # 224 * 8 / 7
    assert cache_size(96) == 110  # 109.71 rounded


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (50, 30), (110, 110), (1000, 999)])
def test_decode_transform_gives_square_uint8(size):
    image = Image.new("RGB", size, (10, 20, 30))
    out = decode_transform(96)(image)
    assert out.shape == (3, 110, 110) and out.dtype == torch.uint8
    assert (out[:, 55, 55] == torch.tensor([10, 20, 30], dtype=torch.uint8)).all()


def test_decode_transform_keeps_the_centre_and_orientation():
    # 300 x 100 in vertical thirds red | green | blue. Resized to 330 x 110, the green third
    # spans x = 110..220, exactly the centre crop (330 - 110) / 2 = 110.
    wide = np.zeros((100, 300, 3), dtype=np.uint8)
    wide[:, :100, 0], wide[:, 100:200, 1], wide[:, 200:, 2] = 255, 255, 255
    out = decode_transform(96)(Image.fromarray(wide))
    inner = out[:, :, 2:-2]  # the outermost columns blend a little red/blue (antialiasing)
    assert (inner == torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)).all()
    # Portrait, top half red and bottom half blue: rows stay rows (no transposition).
    tall = np.zeros((200, 100, 3), dtype=np.uint8)
    tall[:100, :, 0], tall[100:, :, 2] = 255, 255
    out = decode_transform(96)(Image.fromarray(tall))
    assert out[:, 0, 55].tolist() == [255, 0, 0] and out[:, -1, 55].tolist() == [0, 0, 255]


def test_eval_crop_takes_the_centre_of_a_batch():
    batch = torch.arange(2 * 3 * 110 * 110).reshape(2, 3, 110, 110)
    crop = eval_crop(96)(batch)
    assert crop.shape == (2, 3, 96, 96)
    assert torch.equal(crop, batch[:, :, 7:103, 7:103])  # (110 - 96) / 2 = 7 on each side


def test_normalize_maps_the_imagenet_mean_to_zero():
    exact = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 4, 4) * 255
    assert normalize_imagenet(exact).abs().max() < 1e-6
    # uint8 124, 116, 104 (the mean rounded): (124/255 - 0.485) / 0.229 = 0.0056,
    # (116/255 - 0.456) / 0.224 = -0.0049, (104/255 - 0.406) / 0.225 = 0.0082.
    rounded = torch.tensor([124, 116, 104], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    out = normalize_imagenet(rounded)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 4, 4)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0056, -0.0049, 0.0082], abs=1e-4)
    # White: (1 - 0.485) / 0.229 = 2.2489 in the red channel.
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert normalize_imagenet(white)[0, 0, 0, 0].item() == pytest.approx(2.2489, abs=1e-4)


def test_eval_pil_transform_is_decode_crop_normalize():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), np.uint8))
    expected = normalize(eval_crop(96)(decode_transform(96)(image))[None], TF_LITE)[0]
    assert torch.equal(eval_pil_transform(96, TF_LITE)(image), expected)


def test_tf_lite_normalisation_is_minus_127_over_128():
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(pixels, TF_LITE)[0, :, 0, 0]
    assert out.tolist() == pytest.approx([-127 / 128, 0.0, 1.0], abs=1e-6)


def test_expected_stats_are_zero_and_one_for_imagenet_and_follow_for_tf_lite():
    assert IMAGENET.expected_stats()["mean"] == pytest.approx([0, 0, 0], abs=1e-12)
    assert IMAGENET.expected_stats()["std"] == pytest.approx([1, 1, 1])
    # Red: (0.485 - 127/255) / (128/255) = -0.0259; std 0.229 / (128/255) = 0.4562.
    assert TF_LITE.expected_stats()["mean"][0] == pytest.approx(-0.0259, abs=1e-4)
    assert TF_LITE.expected_stats()["std"][0] == pytest.approx(0.4562, abs=1e-4)


def test_channel_stats_by_hand():
    # Channel c holds c*10 + [0, 2] in image 0 and c*10 + [4, 6] in image 1: mean c*10 + 3,
    # sample std sqrt((9 + 1 + 1 + 9) / 3) = 2.5820.
    images = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(2, 1, 1, 2) + torch.tensor(
        [0.0, 10.0, 20.0]).view(1, 3, 1, 1)
    stats = channel_stats(images)
    assert stats["mean"] == pytest.approx([3.0, 13.0, 23.0])
    assert stats["std"] == pytest.approx([2.5820] * 3, abs=1e-4)


def natural_ish_images(n: int = 16, side: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, side, side) smooth random fields with roughly ImageNet's pixel statistics."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 6, 6, generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")
    field = (field - field.mean()) / field.std()  # unit variance
    pixels = (MEAN + STD * field) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("normalization", [IMAGENET, TF_LITE], ids=lambda n: n.name)
def test_the_correct_pipeline_passes_the_normalisation_check(normalization):
    stats = channel_stats(normalize(natural_ish_images(), normalization))
    assert normalization_problems(stats, normalization.expected_stats(),
                                  TOLERANCES.mean_tolerance, TOLERANCES.std_tolerance) == []


def test_the_other_backbones_normalisation_fails_the_check():
    # ImageNet-normalised tensors checked against what TF-Lite's normalisation implies: their
    # stds (~1) are over twice the expected ~0.46, so every channel's std is flagged.
    stats = channel_stats(normalize(natural_ish_images(), IMAGENET))
    problems = normalization_problems(stats, TF_LITE.expected_stats(),
                                      TOLERANCES.mean_tolerance, TOLERANCES.std_tolerance)
    assert sum(" std " in p for p in problems) == 3, problems


@pytest.mark.parametrize(("name", "wrong", "means_fail"), [
    # Forgot ToTensor's /255: means ~ (120 - 0.485) / 0.229 ~ 500, stds ~ 255: all 6 fail.
    ("no /255 scaling", lambda x: (x.float() - MEAN) / STD, True),
    # Mean 0, std 1: means ~0.40-0.49 may slip under the 0.5 tolerance, stds ~0.22 cannot.
    ("mean 0 std 1", lambda x: x.float() / 255, None),
    # Normalised twice: means ~ (0 / 255 - 0.45) / 0.22 ~ -2, stds ~ 1 / (255 * 0.22): all fail.
    ("normalised twice", lambda x: (normalize_imagenet(x) / 255 - MEAN) / STD, True),
])
def test_a_wrong_pipeline_fails_the_normalisation_check(name, wrong, means_fail):
    stats = channel_stats(wrong(natural_ish_images()))
    problems = normalization_problems(stats, IMAGENET.expected_stats(),
                                      TOLERANCES.mean_tolerance, TOLERANCES.std_tolerance)
    assert sum(" std " in p for p in problems) == 3, (name, problems)  # every channel's std
    if means_fail:
        assert sum(" mean " in p for p in problems) == 3, (name, problems)
