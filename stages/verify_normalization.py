"""verify_normalization: measure the normalised tensors the model will see (mean ~0, std ~1).

Reads:  params seed, data.image_size, verify_normalization.*; data/split.csv,
        data/prepared/dataset.json
Writes: metrics/verify_normalization.json, plots/verify_normalization/histograms.png
        (fails with the offending channels if a mean or std is out of tolerance)
"""

import numpy as np

from retrieval import cache, config, data, outputs, tracking, transforms
from retrieval.plots import training as training_plots


def main() -> None:
    params = config.load_params()
    v = params.verify_normalization
    table = data.load_split_table("data/split.csv", "data/prepared/dataset.json")
    with tracking.stage_run("verify_normalization",
                            config.select(params, ("seed", "verify_normalization")),
                            config.flatten(config.to_dict(params))) as run:
        # Decodes every image of the split once; later stages reuse this cache.
        images = cache.images_for(table["file"].tolist(), params.data.image_size)
        train = np.flatnonzero(table["split"].to_numpy() == "train")
        rng = np.random.default_rng(params.seed)
        sample = np.sort(rng.choice(train, size=min(v.sample_size, len(train)), replace=False))
        crops = transforms.eval_crop(params.data.image_size)(images.batch(sample))
        normalized = transforms.normalize(crops)
        raw_stats = transforms.channel_stats(crops.float() / 255.0)
        stats = transforms.channel_stats(normalized)
        problems = transforms.normalization_problems(stats, v.mean_tolerance, v.std_tolerance)
        if problems:
            raise outputs.UserError("normalisation check failed: " + "; ".join(problems)
                                    + " (check transforms.normalize and the image decoding)")
        metrics = {"images": len(sample), "image_size": params.data.image_size,
                   **{f"normalized_mean_{c}": m for c, m in zip("rgb", stats["mean"], strict=True)},
                   **{f"normalized_std_{c}": s for c, s in zip("rgb", stats["std"], strict=True)},
                   **{f"raw_mean_{c}": m for c, m in zip("rgb", raw_stats["mean"], strict=True)},
                   **{f"raw_std_{c}": s for c, s in zip("rgb", raw_stats["std"], strict=True)},
                   "mean_tolerance": v.mean_tolerance, "std_tolerance": v.std_tolerance}
        figure = training_plots.normalization_histograms((crops.float() / 255.0).numpy(),
                                                normalized.numpy())
        outputs.save_figure(figure, "plots/verify_normalization/histograms.png")
        outputs.write_json("metrics/verify_normalization.json", metrics)
        run.log_metrics(metrics, to_parent=True)
        run.log_artifact("plots/verify_normalization/histograms.png")


if __name__ == "__main__":
    outputs.run_main(main)
