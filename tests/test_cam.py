"""Saliency, binarisation, mask scores and baselines, on tiny models whose answer is known."""

import copy
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import GuidedBackpropReLUModel
from torch import nn

from retrieval import cam
from retrieval.cam import (
    SALIENCY_METHODS,
    ClassLogit,
    SimilarityToPrototype,
    binarize,
    centered_ellipse_mask,
    choose_binarization,
    class_prototypes,
    dice,
    dice_batch,
    format_binarization,
    full_mask,
    guided_relus,
    iou,
    iou_batch,
    parse_binarization,
    saliency_maps,
    summarize,
)

# --- tiny models following the contract: forward -> (B, D) or (B, C), plus .target_layer --------


class KeepTopLeft(nn.Module):
    """Zeroes every activation outside the top-left quadrant of the feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mask = torch.zeros_like(x)
        mask[..., : h // 2, : w // 2] = 1
        return x * mask


class QuadrantNet(nn.Module):
    """A classifier whose logits depend only on the top-left quadrant of the image.

    The mask sits inside target_layer, so Grad-CAM's activations are zero elsewhere; positive head
    weights make every channel count positively for every class, so the CAM is not all zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.target_layer = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), KeepTopLeft()
        )
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.head.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.target_layer(self.stem(x)).mean(dim=(2, 3)))


class TinyEmbedder(nn.Module):
    """An embedding model with BatchNorm and dropout, so train/eval mode matters."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.target_layer = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.target_layer(self.stem(x)).mean(dim=(2, 3))
        return F.normalize(self.head(features), dim=1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def images(b: int = 2, h: int = 48, w: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1))


# --- scores --------------------------------------------------------------------------------


def test_iou_and_dice_by_hand() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    top = empty.copy()
    top[:2] = True  # rows 0-1: 8 pixels
    left = empty.copy()
    left[:, :2] = True  # cols 0-1: 8 pixels
    bottom = ~top

    # Both empty: perfect agreement by convention.
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0
    # One empty: nothing shared.
    assert iou(empty, top) == 0.0 and dice(top, empty) == 0.0
    assert iou(top, bottom) == 0.0 and dice(top, bottom) == 0.0
    assert iou(top, top) == 1.0 and dice(top, top) == 1.0
    # top & left = the 2x2 corner (4 px); union = 8 + 8 - 4 = 12 -> IoU 4/12 = 1/3;
    # Dice = 2 * 4 / (8 + 8) = 1/2.
    assert iou(top, left) == pytest.approx(1 / 3)
    assert dice(top, left) == pytest.approx(0.5)

    pred = np.stack([empty, empty, top, top])
    gt = np.stack([empty, top, bottom, left])
    np.testing.assert_allclose(iou_batch(pred, gt), [1, 0, 0, 1 / 3])
    np.testing.assert_allclose(dice_batch(pred, gt), [1, 0, 0, 0.5])


def test_scores_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="pred and gt"):
        iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="pred and gt"):
        iou_batch(np.zeros((4, 4), bool), np.zeros((4, 4), bool))


# --- binarisation ----------------------------------------------------------------------------


def bimodal_map(seed: int, h: int = 40, w: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), dtype=bool)
    truth[10:30, 5 + seed : 25 + seed] = True
    saliency = np.where(truth, rng.uniform(0.6, 0.95, (h, w)), rng.uniform(0.0, 0.35, (h, w)))
    return saliency, truth


def test_otsu_separates_a_bimodal_map() -> None:
    saliency, truth = bimodal_map(0)
    np.testing.assert_array_equal(binarize(saliency, "otsu"), truth)


def test_otsu_matches_opencv_on_uint8_maps() -> None:
    rng = np.random.default_rng(3)
    maps = [bimodal_map(seed)[0] for seed in range(3)]
    # Skewed and three-mode maps, where the threshold is not obvious.
    maps.append(rng.beta(0.5, 3.0, (40, 50)))
    maps.append(np.concatenate([rng.normal(m, 0.05, (40, 20)) for m in (0.2, 0.5, 0.8)], axis=1))
    for saliency in maps:
        u8 = np.round(np.clip(saliency, 0, 1) * 255).astype(np.uint8)
        _, reference = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        np.testing.assert_array_equal(binarize(u8 / 255.0, "otsu"), reference > 0)

    # A batch is thresholded map by map.
    batch = np.stack([np.round(np.clip(m[:40, :50], 0, 1) * 255) / 255 for m in maps])
    one_by_one = np.stack([binarize(m, "otsu") for m in batch])
    np.testing.assert_array_equal(binarize(batch, "otsu"), one_by_one)


def test_top_percent_and_fixed() -> None:
    saliency = np.random.default_rng(0).random((2, 10, 10))
    masks = binarize(saliency, "top_percent", 30)
    assert masks.shape == (2, 10, 10)
    for s, m in zip(saliency, masks, strict=True):
        assert m.sum() == 30
        assert s[m].min() > s[~m].max()
    # Ties (a constant map) still give the exact count.
    assert binarize(np.full((10, 10), 0.5), "top_percent", 30).sum() == 30
    assert binarize(saliency[0], "top_percent", 0).sum() == 0
    np.testing.assert_array_equal(binarize(saliency, "fixed", 0.5), saliency >= 0.5)


def test_binarize_rejects_bad_options() -> None:
    saliency = np.zeros((4, 4))
    with pytest.raises(ValueError, match="otsu"):
        binarize(saliency, "triangle", 0.5)
    with pytest.raises(ValueError, match="value"):
        binarize(saliency, "fixed")
    with pytest.raises(ValueError, match="percentage"):
        binarize(saliency, "top_percent", 0.3 * 1000)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize(saliency + 2, "fixed", 0.5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("otsu", ("otsu", None)),
        ("top_percent:30", ("top_percent", 30.0)),
        ("top_percent:12.5", ("top_percent", 12.5)),
        ("fixed:0.5", ("fixed", 0.5)),
        ("fixed:0", ("fixed", 0.0)),
        ("fixed:1", ("fixed", 1.0)),
    ],
)
def test_parse_binarization(text: str, expected: tuple) -> None:
    assert parse_binarization(text) == expected
    assert format_binarization(expected) == text
    assert parse_binarization("fixed:.25") == ("fixed", 0.25)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("otsu:3", "use otsu"),  # otsu takes no value
        ("otsu:", "use otsu"),
        ("fixed", "use otsu"),  # the others need one
        ("fixed:1.5", "lies in [0, 1]"),
        ("top_percent:101", "percentage"),
        ("top_percent:x", "use otsu"),
        ("top_percent:-5", "use otsu"),
        ("top_percent:1e1", "use otsu"),  # plain decimals only, as params.yaml is written
        ("top_percent: 5", "use otsu"),
        ("median", "use otsu"),
        ("", "use otsu"),
    ],
)
def test_parse_binarization_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_binarization(text)


def test_choose_binarization_picks_the_best_candidate() -> None:
    # Maps are a diagonal ramp; the object is exactly the brightest quarter of each map, so
    # top_percent 25 scores IoU 1 while the fixed thresholds cut too much or too little.
    ramp = np.add.outer(np.arange(20), np.arange(20)) / 38.0
    saliencies = np.stack([ramp, ramp.T])
    gt = np.stack([binarize(s, "top_percent", 25) for s in saliencies])
    candidates = [("fixed", 0.5), ("otsu", 0.0), ("top_percent", 25.0), ("fixed", 0.9)]
    assert choose_binarization(saliencies, gt, candidates) == ("top_percent", 25.0)
    with pytest.raises(ValueError, match="candidates"):
        choose_binarization(saliencies, gt, [])


# --- baselines and summary --------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(48, 64), (101, 37), (32, 32)])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_centered_ellipse_covers_the_fraction(h: int, w: int, fraction: float) -> None:
    mask = centered_ellipse_mask(h, w, fraction)
    assert mask.shape == (h, w) and mask.dtype == bool
    assert abs(mask.mean() - fraction) < 0.01
    # Centred: symmetric about both axes, up to one incomplete group of 4 mirror images
    # (each such pixel differs from its flip twice).
    assert (mask != mask[::-1]).sum() <= 6
    assert (mask != mask[:, ::-1]).sum() <= 6


def test_centered_ellipse_has_the_image_aspect() -> None:
    mask = centered_ellipse_mask(40, 80, 0.5)
    rows, cols = np.nonzero(mask)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert width / height == pytest.approx(2.0, rel=0.1)
    assert not centered_ellipse_mask(40, 80, 0).any()
    assert full_mask(3, 5).all() and full_mask(3, 5).shape == (3, 5)


def test_summarize() -> None:
    summary = summarize(np.array([0.1, 0.2, 0.9, 0.5]), ["cat", "dog", "cat", "cat"])
    assert summary["mean"] == pytest.approx(0.425)
    assert summary["median"] == pytest.approx(0.35)
    assert summary["count"] == 4
    assert summary["per_class"]["cat"] == pytest.approx({"mean": 0.5, "median": 0.5, "count": 3})
    assert summary["per_class"]["dog"] == pytest.approx({"mean": 0.2, "median": 0.2, "count": 1})
    assert set(summarize(np.ones(2), np.array([3, 7]))["per_class"]) == {"3", "7"}


def test_class_prototypes_are_normalised_class_means() -> None:
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, -3.0]])
    prototypes = class_prototypes(embeddings, [0, 0, 1, 1])
    np.testing.assert_allclose(prototypes[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(prototypes[1], [0.0, -1.0])


# --- targets ----------------------------------------------------------------------------------


def test_similarity_target_is_the_cosine_and_its_gradient_increases_it() -> None:
    model = TinyEmbedder().eval()
    prototype = np.array([3.0, -1.0, 0.5, 2.0])  # not normalised: the target must do it
    target = SimilarityToPrototype(prototype)

    x = images(1).requires_grad_(True)
    embedding = model(x)[0]
    by_hand = embedding.detach().numpy() @ prototype / np.linalg.norm(prototype)
    similarity = target(embedding)
    assert similarity.item() == pytest.approx(by_hand, abs=1e-6)
    # Batched outputs give one similarity per row.
    assert target(model(images(3))).shape == (3,)

    # A small step along the gradient raises the similarity.
    (grad,) = torch.autograd.grad(similarity, x)
    stepped = x.detach() + 1e-2 * grad / grad.norm()
    assert target(model(stepped)[0]).item() > similarity.item()


def test_class_logit_target() -> None:
    logits = torch.tensor([[1.0, 5.0, -2.0], [0.0, 3.0, 4.0]])
    assert ClassLogit(1)(logits[0]).item() == 5.0
    assert ClassLogit(2)(logits).tolist() == [-2.0, 4.0]


# --- saliency -------------------------------------------------------------------------------


# Smoothed CAMs answer another question: aug_smooth averages flipped copies (QuadrantNet is not
# flip-invariant), eigen_smooth's principal component has an arbitrary sign. They are checked
# against the package instead.
SMOOTHED = {"gradcam_eigen": {"eigen_smooth": True}, "layercam_aug": {"aug_smooth": True}}


@pytest.mark.parametrize("method", [m for m in SALIENCY_METHODS if m not in SMOOTHED])
def test_saliency_lies_where_the_model_looks(method: str) -> None:
    model = QuadrantNet()
    x = images(2, 64, 64)
    maps = saliency_maps(model, x, [ClassLogit(0), ClassLogit(2)], method)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0.5
    top_left_mass = maps[:, :32, :32].sum(axis=(1, 2)) / maps.sum(axis=(1, 2))
    assert (top_left_mass > 0.9).all(), top_left_mass


def test_saliency_of_an_embedding_model_with_a_prototype_target() -> None:
    model = TinyEmbedder().eval()
    x = images(3)
    with torch.no_grad():  # callers often hold no_grad around inference; saliency still works
        prototypes = model(images(2, 32, 32))
        maps = saliency_maps(
            model, x, [SimilarityToPrototype(p) for p in prototypes[[0, 1, 0]]], "gradcam"
        )
    assert maps.shape == (3, 48, 64) and np.isfinite(maps).all()
    assert not x.requires_grad  # the caller's tensor is untouched


@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_saliency_of_a_frozen_model_restores_mode_and_flags(method: str) -> None:
    model = TinyEmbedder().train()
    for p in model.stem.parameters():  # frozen backbone, trainable head
        p.requires_grad_(False)
    sentinel = torch.full_like(model.head[1].weight, 7.0)
    model.head[1].weight.grad = sentinel
    flags = [p.requires_grad for p in model.parameters()]

    prototype = torch.tensor([1.0, 0.0, 0.0, 0.0])
    maps = saliency_maps(model, images(2), [SimilarityToPrototype(prototype)] * 2, method)

    assert maps.max() > 0  # gradients did flow
    assert model.training and model.stem[1].training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.head[1].weight.grad is sentinel
    assert all(p.grad is None for p in model.stem.parameters())

    # Entirely frozen, and with forward hooks left behind by nobody.
    for p in model.parameters():
        p.requires_grad_(False)
    assert saliency_maps(model.eval(), images(1), [ClassLogit(0)], method).max() > 0
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_saliency_rejects_bad_arguments() -> None:
    model = QuadrantNet()
    with pytest.raises(ValueError, match="gradcam.*input_gradient"):
        saliency_maps(model, images(1), [ClassLogit(0)], "scorecam")
    with pytest.raises(ValueError, match="one entry per image"):
        saliency_maps(model, images(2), [ClassLogit(0)], "gradcam")
    with pytest.raises(ValueError, match="nn.ReLU"):
        saliency_maps(
            nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()),
            images(1),
            [ClassLogit(0)],
            "guided_backprop",
        )


def test_guided_backprop_matches_pytorch_grad_cam_on_a_classifier() -> None:
    # torchvision's ResNet: in-place ReLUs, one ReLU module reused twice per block, residual adds.
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    model.target_layer = model.layer4
    x = images(1, 32, 32)

    # The package swaps the model's ReLUs (and back to fresh ones), so give it a copy.
    reference = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")(
        x.clone(), target_category=3
    )  # (H, W, 3)

    ours = x.clone().requires_grad_(True)
    with guided_relus(model):
        model(ours)[0, 3].backward()
    np.testing.assert_allclose(
        ours.grad[0].permute(1, 2, 0).numpy(), reference, rtol=1e-4, atol=1e-6
    )
    assert np.abs(reference).max() > 0

    saliency = saliency_maps(model, x, [ClassLogit(3)], "guided_backprop")[0]
    expected = np.abs(reference).max(axis=2)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(saliency, expected, atol=1e-5)


def test_guided_backprop_follows_relu6_as_in_efficientnet_lite0() -> None:
    # The backward of ReLU6 masks by 0 < x < 6; guided backprop also drops negative gradients.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 3), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = images(1, 16, 16)
    plain = x.clone().requires_grad_(True)
    model(plain)[0, 1].backward()
    guided = x.clone().requires_grad_(True)
    with guided_relus(model):
        model(guided)[0, 1].backward()
    assert not torch.allclose(plain.grad, guided.grad)
    # By hand: the same chain rule with each ReLU6's incoming gradient clamped at 0.
    by_hand = x.clone().requires_grad_(True)
    first = model[0](by_hand)
    a = first.clamp(0, 6)
    second = model[2](a)
    b = second.clamp(0, 6)
    out = model[6](b.mean(dim=(2, 3)))[0, 1]
    (g_b,) = torch.autograd.grad(out, b, retain_graph=True)
    g_second = g_b.clamp(min=0) * ((second > 0) & (second < 6))
    (g_a,) = torch.autograd.grad(second, a, g_second, retain_graph=True)
    g_first = g_a.clamp(min=0) * ((first > 0) & (first < 6))
    (g_x,) = torch.autograd.grad(first, by_hand, g_first)
    torch.testing.assert_close(guided.grad, g_x)


def test_check_params_names_the_key_for_an_unknown_method_or_binarisation():
    from retrieval.config import ParamsError

    cam.check_params(list(cam.SALIENCY_METHODS), ["otsu", "fixed:0.5", "top_percent:20"])
    with pytest.raises(ParamsError, match=r"gradcam_segment.methods has unknown 'lime'"):
        cam.check_params(["gradcam", "lime"], ["otsu"])
    with pytest.raises(ParamsError, match=r"gradcam_segment.binarize has 'half'"):
        cam.check_params(["gradcam"], ["half"])


class FineQuadrantNet(QuadrantNet):
    """QuadrantNet with its stem as a finer layer for multi-layer CAMs (stride 1 against 2)."""

    @property
    def fine_layers(self) -> list[nn.Module]:
        return [self.stem]


def test_layercam_fuses_the_fine_layers_as_pytorch_grad_cam_does() -> None:
    from pytorch_grad_cam import LayerCAM

    model = FineQuadrantNet().eval()
    x = images(2, 32, 32)
    targets = [ClassLogit(0), ClassLogit(1)]
    ours = saliency_maps(model, x, targets, "layercam")
    reference = LayerCAM(model=model, target_layers=[model.stem, model.target_layer])(
        input_tensor=x.clone().requires_grad_(True), targets=targets)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    coarse = saliency_maps(QuadrantNet().eval(), x, targets, "layercam")  # target layer only
    assert not np.allclose(ours, coarse)


def test_guided_gradcam_is_the_normalised_product() -> None:
    model = QuadrantNet().eval()
    x = images(2, 32, 32)
    targets = [ClassLogit(0), ClassLogit(2)]
    product = (saliency_maps(model, x, targets, "gradcam")
               * saliency_maps(model, x, targets, "guided_backprop"))
    low = product.min(axis=(1, 2), keepdims=True)
    expected = (product - low) / (product.max(axis=(1, 2), keepdims=True) - low)
    np.testing.assert_allclose(saliency_maps(model, x, targets, "guided_gradcam"), expected,
                               atol=1e-6)


@pytest.mark.parametrize("h, w, fraction", [(32, 32, 0.25), (40, 64, 0.5), (10, 10, 0.0)])
def test_centered_box_covers_the_fraction_with_the_image_aspect(h, w, fraction) -> None:
    mask = cam.centered_box_mask(h, w, fraction)
    assert mask.mean() == pytest.approx(fraction, abs=2 * (h + w) / (h * w))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if fraction:
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one solid box
        assert abs(rows[0] - (h - 1 - rows[-1])) <= 1 and abs(cols[0] - (w - 1 - cols[-1])) <= 1
    with pytest.raises(ValueError, match="fraction"):
        cam.centered_box_mask(4, 4, 1.5)


@pytest.mark.parametrize("method", SMOOTHED)
def test_smoothed_cams_are_pytorch_grad_cams_own(method: str) -> None:
    from pytorch_grad_cam import GradCAM, LayerCAM

    model = FineQuadrantNet().eval()
    x = images(2, 32, 32)
    targets = [ClassLogit(0), ClassLogit(1)]
    cam_class, layers = ((GradCAM, [model.target_layer]) if method == "gradcam_eigen" else
                         (LayerCAM, [model.stem, model.target_layer]))
    reference = cam_class(model=model, target_layers=layers)(
        input_tensor=x.clone().requires_grad_(True), targets=targets, **SMOOTHED[method])
    np.testing.assert_allclose(saliency_maps(model, x, targets, method), reference, atol=1e-5)


def test_computed_methods_expand_combined_ones() -> None:
    assert cam.computed_methods(["guided_gradcam"]) == {"gradcam", "guided_backprop"}
    assert cam.computed_methods(["gradcam", "layercam", "guided_gradcam"]) == {
        "gradcam", "layercam", "guided_backprop"}
