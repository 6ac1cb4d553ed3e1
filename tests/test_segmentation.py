"""Segmentation from saliency: mask geometry, explainers, the experiment and its summaries.

Tiny from-scratch models (cifar_resnet, n=1) on Pillow-made images of one bright ellipse over a
dark, noisy background; the ellipse is the mask. The models are untrained, so the tests check
plumbing and known answers (geometry, trivial baselines, file layout), not segmentation quality.
The `retrieval segment` command is tested in test_cli.py, on the same images.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from retrieval import cam, models, transforms
from retrieval.cache import ImageCache
from retrieval.config import GradcamConfig, ModelConfig, ParamsError, params_from_dict
from retrieval.outputs import UserError
from retrieval.plots import segmentation as figures
from retrieval.segmentation import experiment, explainers, geometry, summary

SIZE = 32  # model input side: the cifar trunk's last block is 8 x 8
CLASSES = ("alpha", "beta", "gamma")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def tiny_net(num_classes: int = 0) -> models.EmbeddingNet:
    config = ModelConfig(weights="none",
                         backbone="cifar_resnet", cifar_n=1, hidden_dim=16, embedding_dim=8)
    return models.EmbeddingNet(config, num_classes).eval()


def save_net(path, num_classes: int = 0) -> models.EmbeddingNet:
    net = tiny_net(num_classes)
    models.save_checkpoint(path, net, {"image_size": SIZE, "classes": list(CLASSES)})
    return net


def draw(height: int, width: int, box: tuple[int, int, int, int], seed: int
         ) -> tuple[Image.Image, np.ndarray]:
    """An RGB image with a bright ellipse in ``box`` (left, top, right, bottom) and its mask."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    truth = np.asarray(mask) > 127
    pixels[truth] = rng.integers(180, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels), truth


def make_folder(root, masks_root=None, per_class: int = 4, shape=(40, 52)) -> list[dict]:
    """root/<class>/<i>.png (+ masks_root/<class>/<i>.png): rows of a split table."""
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            h, w = shape
            left, top = 4 + 3 * i, 5 + 2 * c
            image, truth = draw(h, w, (left, top, left + w // 2, top + h // 2), 10 * c + i)
            (root / label).mkdir(parents=True, exist_ok=True)
            image.save(root / label / f"{i}.png")
            mask_file = ""
            if masks_root is not None:
                (masks_root / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(truth.astype(np.uint8) * 255).save(masks_root / label / f"{i}.png")
                mask_file = str(masks_root / label / f"{i}.png")
            split = ("train", "train", "val", "test")[i % 4]
            rows.append({"path": f"{label}/{i}.png", "label": label, "split": split,
                         "mask_path": f"{label}/{i}.png" if mask_file else "",
                         "file": str(root / label / f"{i}.png"), "mask_file": mask_file})
    return rows


# --- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 52), (53, 37), (36, 36)])
def test_align_mask_follows_the_images_own_transforms(shape):
    # An image that is white exactly on the mask, through the image pipeline (cache decode +
    # eval crop), must give the same pixels as the aligned mask.
    image, truth = draw(*shape, (6, 7, 30, 29), seed=1)
    white = Image.fromarray(np.where(truth[..., None], 255, 0).astype(np.uint8).repeat(3, 2))
    view = transforms.eval_crop(SIZE)(transforms.decode_transform(SIZE)(white))
    aligned = geometry.align_mask(truth, SIZE)
    assert aligned.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(aligned, view[0].numpy() >= 128)


@pytest.mark.parametrize("shape", [(40, 60), (61, 33), (48, 48)])
def test_restore_mask_inverts_align_mask(shape):
    h, w = shape
    _, truth = draw(h, w, (w // 4, h // 4, 3 * w // 4, 3 * h // 4), seed=2)
    view = geometry.align_mask(truth, SIZE)
    restored = geometry.restore_mask(view, h, w)
    assert restored.shape == (h, w)
    assert cam.iou(geometry.align_mask(restored, SIZE), view) > 0.9
    assert cam.iou(restored, truth) > 0.85  # the centred object lies inside the crop


def test_restored_full_view_is_the_centre_crop_window():
    # 40 x 60 with image_size 32: resized to 37 x 55 (cache side 37), the view is rows 2..34 and
    # columns 11..43 of that, i.e. about rows 2..37 and columns 18..71*60/55 of the original.
    restored = geometry.restore_mask(np.ones((SIZE, SIZE), bool), 40, 60)
    assert restored[20, 30] and not restored[20, 0] and not restored[20, 59]
    columns = np.flatnonzero(restored[20])
    rows = np.flatnonzero(restored[:, 30])
    assert abs(columns[0] - 11 * 60 / 55) <= 1 and abs(columns[-1] + 1 - 43 * 60 / 55) <= 1
    assert abs(rows[0] - 2 * 40 / 37) <= 1 and abs(rows[-1] + 1 - 34 * 40 / 37) <= 1


# --- explainers -----------------------------------------------------------------------------


def test_pooled_descriptor_is_the_normalised_backbone_feature():
    net = tiny_net()
    explainer = explainers.backbone_explainer("baseline", net)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = F.normalize(net.features(x), dim=1)
        np.testing.assert_allclose(explainer.model(x), expected, atol=1e-6)
    assert explainer.model.target_layer is net.target_layer
    assert (explainer.target, explainer.view) == ("prototype", "backbone")


def test_prototype_targets_use_the_label_or_the_nearest_prototype():
    net = tiny_net()
    explainer = explainers.model_explainer("m", net)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        z = net(x)  # (4, 8), unit norm
    # Prototype "near" is image 0's own embedding, "far" its opposite.
    explainer.prototypes = {"near": z[0].numpy(), "far": (-z[0]).numpy()}
    targets = explainer.targets(x, ["far", "near", "near", "far"])
    assert float(targets[1](z[0])) == pytest.approx(1.0, abs=1e-5)
    assert float(targets[0](z[0])) == pytest.approx(-1.0, abs=1e-5)
    assert explainer.predict(x[:1]) == ["near"]
    with pytest.raises(ValueError, match="no prototype for class"):
        explainer.targets(x[:1], ["unknown"])


def test_classifier_target_is_the_predicted_logit():
    net = tiny_net(num_classes=3)
    explainer = explainers.model_explainer("ce", net)
    assert (explainer.target, explainer.view) == ("logit", "classifier")
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = net.classifier(net(x, normalize=False))
    assert [t.index for t in explainer.targets(x)] == logits.argmax(1).tolist()
    maps = explainers.explain(explainer, "gradcam", (torch.rand(5, 3, SIZE, SIZE) * 255)
                                .to(torch.uint8))
    assert maps.shape == (5, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1


# --- the experiment on a split table --------------------------------------------------------


def run_evaluate(tmp_path, masks: bool, methods=("gradcam", "input_gradient"),
                 invert_test_masks: bool = False, classifier: bool = False):
    rows = make_folder(tmp_path / "images", tmp_path / "masks" if masks else None)
    table = pd.DataFrame(rows)
    if invert_test_masks:
        for mask_file in table.loc[table["split"] == "test", "mask_file"]:
            inverted = 255 - np.asarray(Image.open(mask_file))
            Image.fromarray(inverted).save(mask_file)
    images = ImageCache.build([tmp_path / "images" / p for p in table["path"]], SIZE,
                              tmp_path / "cache", workers=0, progress=False)
    torch.manual_seed(0)  # the same untrained net on every call
    net = tiny_net()
    explained = [explainers.backbone_explainer("baseline", net),
                 explainers.model_explainer("frozen", net)]
    if classifier:
        explained.append(explainers.model_explainer("classifier", tiny_net(len(CLASSES)),
                                                    CLASSES))
    written = {}

    def write_mask(model, method, row, mask):
        written[(model, method, row["path"])] = mask

    settings = GradcamConfig(methods=methods, binarize=("otsu", "top_percent:30"), overlays=2,
                             max_images=100, batch_size=2)
    result = experiment.evaluate(explained, images, table, settings, seed=0, image_size=SIZE,
                                 precision="fp32", write_mask=write_mask)
    return table, result, written


def test_evaluate_scores_every_model_method_and_the_trivial_baselines(tmp_path):
    table, result, written = run_evaluate(tmp_path, masks=True)
    test = table[table["split"] == "test"]
    assert result.iou_computed
    assert result.images == {"val": 3, "val_scored": 3, "test": 3, "test_scored": 3}
    assert len(result.scores) == 2 * 2 * len(test)  # models x methods x images
    assert set(result.choices["binarization"]) <= {"otsu", "top_percent:30"}
    assert result.scores["iou"].between(0, 1).all()
    # Every test image gets a mask per model and method, at its own size (40 x 52).
    assert len(written) == 2 * 2 * len(test)
    assert all(mask.shape == (40, 52) and mask.dtype == bool for mask in written.values())
    # The full mask's IoU is the foreground fraction of each test mask in the model view.
    views = [geometry.align_mask(np.asarray(Image.open(f)) > 127, SIZE)
             for f in test["mask_file"]]
    full = result.baselines[result.baselines["baseline"] == "full"]["iou"].to_numpy()
    np.testing.assert_allclose(full, [v.mean() for v in views])
    train = table[table["split"] == "train"]["mask_file"]
    assert result.foreground_fraction == pytest.approx(
        experiment.foreground_fraction(train.tolist(), SIZE))
    # Prototypes come from the training images, one per class, unit norm.
    prototypes = result.explainers[1].prototypes
    assert sorted(prototypes) == list(CLASSES)
    assert all(np.linalg.norm(p) == pytest.approx(1, abs=1e-5) for p in prototypes.values())

    metrics = summary.metrics(result)
    assert metrics["iou_computed"] is True
    assert set(metrics["baselines"]) == {"ellipse", "square", "full"}
    assert set(metrics["frozen"]) == {"gradcam", "input_gradient"}
    assert {"mean_iou", "median_iou", "mean_dice", "binarization"} <= set(
        metrics["baseline"]["gradcam"])
    assert set(metrics["best_method"]) == {"baseline", "frozen"}
    json.dumps(metrics)  # plain types only
    iou_table = summary.summary_table(result)
    assert list(iou_table["model"]) == ["baseline"] * 2 + ["frozen"] * 2 + ["trivial"] * 3
    per_class = summary.per_class_table(result)
    assert set(per_class["label"]) == set(CLASSES)
    assert per_class["images"].sum() == 7 * len(test)  # 4 explained + 3 trivial, per image
    assert summary.markdown_table(iou_table).count("\n") == len(iou_table) + 2


def test_evaluate_without_masks_explains_only_the_overlay_images(tmp_path):
    _, result, written = run_evaluate(tmp_path, masks=False, methods=("gradcam",))
    assert not result.iou_computed and result.scores.empty and result.baselines.empty
    # Nothing to score: no val image is explained, and of the 3 test images only the 2 that the
    # overlay figures show (each still gets its mask written).
    assert result.images == {"val": 0, "val_scored": 0, "test": 2, "test_scored": 0}
    assert len(written) == 2 * 2
    assert result.overlays.views.shape[0] == 2
    assert list(result.choices["binarization"]) == ["otsu", "otsu"]  # the first candidate
    metrics = summary.metrics(result)
    assert metrics["iou_computed"] is False and "not computed" in metrics["reason"]
    assert "mean_iou" not in metrics["frozen"]["gradcam"]
    assert summary.per_class_table(result).empty
    figure = figures.iou_histogram(result.scores, {})
    assert figure is not None


def test_overlay_and_histogram_figures(tmp_path):
    _, result, _ = run_evaluate(tmp_path, masks=True, methods=("gradcam",))
    shown = result.overlays
    assert shown.views.shape == (2, 3, SIZE, SIZE)
    figure = figures.overlays(shown.views, shown.labels, shown.truth, shown.has_truth,
                              *shown.of_model("frozen"), "title")
    assert len(figure.axes) == 2 * (2 + 2)
    figure = figures.iou_histogram(result.scores, {"ellipse": 0.5, "full": 0.3})
    assert len(figure.axes) == 2
    # The best and worst test images: 3 scored, so one of each (overlays // 2 = 1), best first.
    chosen = result.extremes[("frozen", "gradcam")]
    assert len(chosen.positions) == 2 and chosen.ious[0] >= chosen.ious[1]
    frozen = result.scores[result.scores["model"] == "frozen"]["iou"]
    assert (chosen.ious[0], chosen.ious[1]) == pytest.approx((frozen.max(), frozen.min()))
    figure = figures.extremes(result.test_views, result.test_labels, result.test_truth, chosen,
                              "title")
    assert len(figure.axes) == 2 * 4


# --- explainer files -------------------------------------------------------------------------


def prototypes_file(tmp_path, model_file, net):
    explainer = explainers.model_explainer("unfrozen", net)
    rng = np.random.default_rng(0)
    explainer.prototypes = {c: (v / np.linalg.norm(v)).astype(np.float32)
                            for c, v in zip(CLASSES, rng.normal(size=(3, 8)), strict=True)}
    path = tmp_path / "unfrozen.npz"
    explainers.save_explainer(path, explainer, model_file, {"gradcam": "top_percent:30"},
                              {"gradcam": "grabcut:10/30"}, "gradcam")
    return path


def test_explainer_file_round_trip_and_model_check(tmp_path):
    net = save_net(tmp_path / "model.pt")
    path = prototypes_file(tmp_path, tmp_path / "model.pt", net)
    explainer, checkpoint, chosen = explainers.load_explainer(tmp_path / "model.pt", path)
    assert sorted(explainer.prototypes) == list(CLASSES)
    assert chosen == {"binarization": {"gradcam": "top_percent:30"},
                      "refinement": {"gradcam": "grabcut:10/30"}, "best_method": "gradcam"}
    assert checkpoint["image_size"] == SIZE
    save_net(tmp_path / "other.pt")
    with pytest.raises(UserError, match="another model file"):
        explainers.load_explainer(tmp_path / "other.pt", path)
    with pytest.raises(UserError, match="needs class prototypes"):
        explainers.load_explainer(tmp_path / "model.pt", None)



@pytest.mark.parametrize("section, message", [
    ({"batch_size": 0}, r"gradcam_segment.batch_size \(0\) must be in \[1, 4096\]"),
    ({"methods": []}, "gradcam_segment.methods is empty"),
    ({"methods": ["gradcam", "gradcam"]}, "names a method twice"),
    ({"binarize": []}, "gradcam_segment.binarize is empty"),
    ({"overlays": -1}, "gradcam_segment.overlays must be >= 0"),
])
def test_gradcam_params_are_validated(section, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict({"gradcam_segment": section})


def test_a_percentage_over_100_is_refused_by_the_stages_check():
    with pytest.raises(ParamsError, match="top_percent takes a percentage"):
        cam.check_params(["gradcam"], ["top_percent:150"])


def test_a_saliency_method_is_one_registry_entry(monkeypatch):
    """The stage's check reads cam's registry: an entry added there is a valid method at once."""
    with pytest.raises(ParamsError, match="has unknown 'blur'"):
        cam.check_params(["blur"], ["otsu"])
    flat = cam.SaliencyMethod(lambda model, images, targets: np.zeros((len(images), 4, 4)))
    monkeypatch.setitem(cam.SALIENCY_METHODS, "blur", flat)
    cam.check_params(["gradcam", "blur"], ["otsu", "top_percent:20"])
    maps = cam.saliency_maps(tiny_net(), torch.zeros(2, 3, 4, 4), [cam.ClassLogit(0)] * 2, "blur")
    assert maps.shape == (2, 4, 4)


def test_a_flat_map_gives_an_empty_mask_whatever_the_setting():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, 0, 0] = 1.0  # one informative map, one flat
    for setting in [("top_percent", 25.0), ("otsu", None), ("fixed", 0.0)]:
        masks = experiment.binarize_maps(maps, setting)
        assert not masks[0].any() and masks[1, 0, 0]
    np.testing.assert_array_equal(experiment.constant_maps(maps), [True, False])


def test_choose_setting_takes_the_best_validation_iou_first_on_ties():
    truth = np.zeros((1, 4, 4), bool)
    truth[0, :2] = True  # the top half
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, :2] = 1.0
    maps[0, 2, 0] = 0.5
    split = experiment.SplitImages(pd.DataFrame({"label": ["a"]}), np.arange(1), truth,
                                     np.array([True]), np.array([[4, 4]]),
                                     np.zeros((1, 3, 4, 4), np.uint8))
    # top 25% is a quarter of the half (IoU 0.5); top 50% and fixed:0.75 find it exactly.
    candidates = [("top_percent", 25.0), ("top_percent", 50.0), ("fixed", 0.75)]
    assert experiment.choose_setting(maps, split, candidates) == (("top_percent", 50.0), 1.0)


def test_binarisation_and_refinement_are_chosen_on_val_only(tmp_path):
    # Inverting every test mask changes every test score but none of the choices.
    _, plain, _ = run_evaluate(tmp_path / "plain", masks=True)
    _, inverted, _ = run_evaluate(tmp_path / "inverted", masks=True, invert_test_masks=True)
    columns = ["model", "method", "binarization", "refinement", "val_mean_iou"]
    pd.testing.assert_frame_equal(plain.choices[columns], inverted.choices[columns])
    assert set(plain.choices["refinement"]) <= set(GradcamConfig().refine)
    assert not np.allclose(plain.scores["iou"], inverted.scores["iou"])
    # The refinement chosen is the best of the candidates on val, after the chosen binarisation.
    for choice in plain.choices.to_dict("records"):
        assert choice["val_mean_iou"] >= choice["val_mean_iou_unrefined"] - 1e-12


def test_each_model_reports_its_test_accuracy(tmp_path):
    table, result, _ = run_evaluate(tmp_path, masks=True, classifier=True)
    test = table[table["split"] == "test"]
    assert set(result.accuracy) == {"baseline", "frozen", "classifier"}
    views = result.test_views
    for explainer in result.explainers:
        predicted = experiment.predicted_labels(explainer, views, batch_size=2)
        assert set(predicted) <= set(CLASSES)
        assert result.accuracy[explainer.name] == pytest.approx(
            np.mean(np.array(predicted) == test["label"].to_numpy()))
    metrics = summary.metrics(result)
    assert metrics["test_accuracy"] == result.accuracy
    assert metrics["classifier"]["gradcam"]["target"] == "logit"


def test_a_method_made_of_others_reuses_their_maps(tmp_path, monkeypatch):
    calls = []
    for name in ("gradcam", "guided_backprop"):
        entry = cam.SALIENCY_METHODS[name]

        def counted(model, images, targets, compute=entry.compute, name=name):
            calls.append(name)
            return compute(model, images, targets)
        monkeypatch.setitem(cam.SALIENCY_METHODS, name,
                            cam.SaliencyMethod(counted, entry.needs_target_layer))
    run_evaluate(tmp_path / "a", masks=True, methods=("gradcam", "guided_backprop"))
    alone = len(calls)
    _, result, _ = run_evaluate(tmp_path / "b", masks=True,
                                methods=("gradcam", "guided_backprop", "guided_gradcam"))
    assert len(calls) == 2 * alone  # guided_gradcam added no backward pass
    for model in ("baseline", "frozen"):
        maps = result.overlays.maps
        np.testing.assert_allclose(
            maps[(model, "guided_gradcam")],
            cam._product([maps[(model, "gradcam")], maps[(model, "guided_backprop")]]),
            atol=1e-6)


def test_accuracy_counts_only_classes_with_training_images(tmp_path):
    _, result, _ = run_evaluate(tmp_path, masks=True, classifier=True)
    explainer = next(e for e in result.explainers if e.name == "classifier")
    split = experiment.SplitImages(pd.DataFrame({"label": ["alpha", "unseen"]}), np.arange(2),
                                   np.zeros((2, SIZE, SIZE), bool), np.ones(2, bool),
                                   np.full((2, 2), SIZE), result.test_views[:2], "test")
    predicted = experiment.predicted_labels(explainer, result.test_views[:1], 1)
    assert experiment.split_accuracy(explainer, split, 2, {"alpha"}) == float(
        predicted[0] == "alpha")  # the unseen class is left out
    assert np.isnan(experiment.split_accuracy(explainer, split, 2, {"gamma"}))
    nameless = explainers.model_explainer("nameless", explainer.model.net)  # no class names
    assert np.isnan(experiment.split_accuracy(nameless, split, 2, {"alpha"}))
