"""verify_normalization: measure the normalised tensors the model will see against what the
backbone's declared normalisation implies (ImageNet mean/std: mean ~0, std ~1).

Reads:  params seed, data.image_size, model.backbone, verify_normalization.*; data/split.csv,
        data/prepared/dataset.json
Writes: metrics/details/verify_normalization.json, plots/verify_normalization/histograms.png
        (fails with the offending channels if a mean or std is out of tolerance)
"""

import numpy as np

from retrieval import cache, config, data, models, outputs, paths, rng, tracking, transforms
from retrieval.plots import training as training_plots

STAGE = "verify_normalization"


def main() -> None:
    params = config.load_params()
    v = params.verify_normalization
    normalization = transforms.NORMALIZATIONS[models.backbone(params.model.backbone).normalization]
    expected = normalization.expected_stats()
    table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run:
        # Decodes every image of the split once; later stages reuse this cache.
        images = cache.images_for(table["file"].tolist(), params.data.image_size)
        train = np.flatnonzero(table["split"].to_numpy() == "train")
        sample = train[rng.subsample(len(train), v.sample_size, params.seed,
                                     rng.Subsample.VERIFY_NORMALIZATION)]
        crops = transforms.eval_crop(params.data.image_size)(images.batch(sample))
        normalized = transforms.normalize(crops, normalization)
        raw_stats = transforms.channel_stats(crops.float() / 255.0)
        stats = transforms.channel_stats(normalized)
        problems = transforms.normalization_problems(stats, expected, v.mean_tolerance,
                                                     v.std_tolerance)
        if problems:
            raise outputs.UserError(
                f"normalisation check failed ({normalization.name} normalisation of "
                f"{params.model.backbone}): " + "; ".join(problems)
                + " (check transforms.NORMALIZATIONS and the image decoding)")
        print(f"verify_normalization: {normalization.name} normalisation "
              f"({params.model.backbone}) within tolerance on {len(sample)} images")
        metrics = {"images": len(sample), "image_size": params.data.image_size,
                   "normalization": normalization.name,
                   **{f"expected_mean_{c}": m
                      for c, m in zip("rgb", expected["mean"], strict=True)},
                   **{f"expected_std_{c}": s for c, s in zip("rgb", expected["std"], strict=True)},
                   **{f"normalized_mean_{c}": m for c, m in zip("rgb", stats["mean"], strict=True)},
                   **{f"normalized_std_{c}": s for c, s in zip("rgb", stats["std"], strict=True)},
                   **{f"raw_mean_{c}": m for c, m in zip("rgb", raw_stats["mean"], strict=True)},
                   **{f"raw_std_{c}": s for c, s in zip("rgb", raw_stats["std"], strict=True)},
                   "mean_tolerance": v.mean_tolerance, "std_tolerance": v.std_tolerance}
        figure = training_plots.normalization_histograms((crops.float() / 255.0).numpy(),
                                                normalized.numpy())
        outputs.save_figure(figure, paths.plots(STAGE) / "histograms.png")
        outputs.write_json(paths.details(STAGE), metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.plots(STAGE) / "histograms.png")


if __name__ == "__main__":
    outputs.run_main(main)
