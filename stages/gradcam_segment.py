"""gradcam_segment: segmentation for free, from the saliency of the trained models (issue #5).

Models: baseline (train_frozen's trunk, the backbone before training: its pooled descriptor),
frozen and unfrozen; methods, binarisation and refinement candidates from params. The
binarisation, then the refinement, is chosen per (model, method) on val and applied to test; a
centred ellipse and a centred square (training foreground fraction) and the full mask are the
trivial baselines. Each model's test accuracy is reported beside its IoU. IoU and Dice are
computed on the model's input view (data.image_size px, masks through the images' resize +
centre crops); the PNG masks are written at each image's own size, background outside the
centre crop.

Reads:  params seed, device, precision, data.image_size, gradcam_segment; data/split.csv,
        data/prepared, models/train_frozen/best.pt, models/train_unfrozen/best.pt
Writes: data/gradcam/masks/<model>/<method>/<class>/<stem>.png (every explained test image),
        data/gradcam/prototypes/<model>.npz (for `retrieval segment`), data/gradcam/per_image.csv,
        plots/gradcam_segment/{overlays_<model>.png, extremes_<model>.png (a notice without
        masks), iou_histogram.png,
        iou_table.csv, iou_table.md, per_class.csv}, metrics/details/gradcam_segment.json,
        metrics/gradcam_segment/<model>.json (the headline: test mean IoU per method),
        metrics/timing/gradcam_segment.json
"""

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval import (
    cache,
    cam,
    compared,
    config,
    data,
    headline,
    models,
    outputs,
    paths,
    runtime,
    tracking,
)
from retrieval.plots import segmentation as figures
from retrieval.segmentation import experiment, explainers, geometry, refine, summary

STAGE = "gradcam_segment"
OUT, PLOTS = paths.GRADCAM, paths.plots(STAGE)


def main() -> None:
    started = time.perf_counter()
    params = config.load_params()
    cam.check_params(params.gradcam_segment.methods, params.gradcam_segment.binarize)
    refine.check_refinements(params.gradcam_segment.refine)
    size = params.data.image_size
    table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
    device = runtime.resolve_device(params.device)
    nets, classes = {}, {}
    for stage in compared.checkpoints():
        net, checkpoint = models.load_model(paths.checkpoint(stage), expected=params.model,
                                            image_size=size, writer=stage)
        classes[stage] = checkpoint.get("classes", [])
        nets[stage] = net.to(device)
    explained = [explainers.backbone_explainer(model.name, nets[model.checkpoint])
                 if model.view == "backbone" else
                 explainers.model_explainer(model.name, nets[model.checkpoint],
                                            classes[model.checkpoint])
                 for model in compared.COMPARED_MODELS]
    checkpoint_of = {model.name: paths.checkpoint(model.checkpoint)
                     for model in compared.COMPARED_MODELS}
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run, \
            _replaced(OUT) as out:
        images = cache.images_for(table["file"].tolist(), size)
        result = experiment.evaluate(
            explained, images, table, params.gradcam_segment, params.seed, size,
            params.precision, write_mask=lambda model, method, row, mask:
            geometry.write_mask_png(out / "masks" / model / method /
                                    Path(row["path"]).with_suffix(".png"), mask))
        best = summary.best_methods(result)
        for explainer in result.explainers:
            chosen = result.choices[result.choices["model"] == explainer.name]
            explainers.save_explainer(out / paths.prototypes(explainer.name).relative_to(OUT),
                                      explainer, checkpoint_of[explainer.name],
                                      dict(zip(chosen["method"], chosen["binarization"],
                                               strict=True)),
                                      dict(zip(chosen["method"], chosen["refinement"],
                                               strict=True)),
                                      best.get(explainer.name))
        outputs.write_csv(out / "per_image.csv", result.scores)

        iou_table = summary.summary_table(result)
        outputs.write_csv(PLOTS / "iou_table.csv", iou_table)
        with outputs.atomic_path(PLOTS / "iou_table.md") as temp:
            temp.write_text(summary.markdown_table(iou_table))
        outputs.write_csv(PLOTS / "per_class.csv", summary.per_class_table(result))
        shown = result.overlays
        for name in checkpoint_of:
            outputs.save_figure(figures.overlays(
                shown.views, shown.labels, shown.truth, shown.has_truth, *shown.of_model(name),
                f"{STAGE}: {name} model, test images (yellow: predicted, green: ground truth)"),
                PLOTS / f"overlays_{name}.png")
        for name in checkpoint_of:  # without masks (no IoU, no best method): a notice
            outputs.save_figure(figures.extremes(
                result.test_views, result.test_labels, result.test_truth,
                result.extremes[(name, best[name])],
                f"{STAGE}: {name} model, {best[name]}: the best and the worst test images by "
                "IoU") if name in best else figures.no_iou(
                    "no method chosen: the val images have no ground-truth masks"
                    if result.iou_computed else "IoU not computed: the test images have no "
                    "ground-truth masks"), PLOTS / f"extremes_{name}.png")
        trivial = iou_table[iou_table["model"] == "trivial"]
        outputs.save_figure(figures.iou_histogram(
            result.scores, dict(zip(trivial["method"], trivial["mean_iou"], strict=True))),
            PLOTS / "iou_histogram.png")

        metrics = summary.metrics(result)
        headline.write(STAGE, metrics)
        timing = {"seconds": time.perf_counter() - started,
                  **{f"seconds_{part.replace(' ', '_')}": value
                     for part, value in result.seconds.items()},
                  "images_explained": (result.images["val"] + result.images["test"])
                  * len(explained) * len(cam.computed_methods(params.gradcam_segment.methods))}
        outputs.write_json(paths.timing(STAGE), timing)
        run.log_metrics(config.flatten(metrics))
        run.log_headline(headline.flat(STAGE, metrics))
        run.log_metrics(timing)
        run.set_tags({"iou_computed": result.iou_computed})
        run.log_artifact(PLOTS)


@contextmanager
def _replaced(folder: Path) -> Iterator[Path]:
    """A fresh temporary folder that replaces ``folder`` when the block succeeds, so masks of
    an earlier run (other methods, images) never linger and a failed run leaves the old ones."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    temp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        yield temp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp, folder)
    finally:
        if temp.exists():
            shutil.rmtree(temp)


if __name__ == "__main__":
    outputs.run_main(main)
