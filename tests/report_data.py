"""Hand-made stage outputs for the report tests: metrics as the stages write them, training
histories with known learning-rate cuts, and tiny PNGs for every figure."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot
import pandas as pd

from retrieval import report

matplotlib.use("Agg")

RUN = report.RunInfo("0123456789abcdef0123456789abcdef01234567", "exp-lr3",
                     {"pipeline": "parent0001", "evaluate": "evalrun0002", "report": "rep0003"})
PARAMS = {"lr": 0.001, "train.lr_factor": 0.5, "train.lr_patience": 2,
          "gradcam_segment.methods": ("gradcam",)}

EVALUATE = {
    model: {"map": m, "map_ci_low": m - 0.02, "map_ci_high": m + 0.02, "precision_at_1": p1,
            "roc_auc": auc, "eer": 0.3, "accuracy": 0.7, "precision": 0.71, "recall": 0.69,
            "f1": 0.7, "tp": 700, "tn": 690, "fp": 310, "fn": 300, "threshold": 0.8,
            "recall_at_5": 0.9, "n_queries": 60, "ranks": 59, "embedding_dim": 16,
            "worst_classes": ["b", "a"], "cosine_same_mean": same, "cosine_same_std": 0.1,
            "cosine_different_mean": different, "cosine_different_std": 0.2,
            "cosine_gap": same - different}
    for model, m, p1, auc, same, different in (
        ("baseline", 0.212, 0.301, 0.612, 0.812, 0.7), ("frozen", 0.41, 0.52, 0.744, 0.75, 0.4),
        ("unfrozen", 0.58, 0.66, 0.861, 0.7, 0.09))}
METRICS = {
    "prepare": {"images": 120, "classes": 3, "excluded": 1, "excluded_files": ["a/bad.jpg"],
                "images_with_mask": 120, "min_class_size": 30, "max_class_size": 50},
    "split": {"mode": "stratified", "train_images": 84, "val_images": 18, "test_images": 18,
              "train_classes": 3, "val_classes": 3, "test_classes": 3, "small_classes": 0},
    "verify_normalization": {"images": 32, "image_size": 32, "mean_tolerance": 0.5,
                             "std_tolerance": 0.5, "normalized_mean_r": -0.123,
                             "normalized_mean_g": 0.045, "normalized_mean_b": 0.267,
                             "normalized_std_r": 0.987, "normalized_std_g": 1.021,
                             "normalized_std_b": 1.043, "raw_mean_r": 0.456,
                             "raw_mean_g": 0.432, "raw_mean_b": 0.398, "raw_std_r": 0.221,
                             "raw_std_g": 0.215, "raw_std_b": 0.231},
    "train_frozen": {"best_epoch": 7, "best_val_loss": 0.1234, "epochs_run": 10,
                     "stopped": "early_stopping", "val_accuracy": 0.71,
                     "val_accuracy_before": 0.52, "val_f1": 0.69, "val_precision": 0.7,
                     "val_recall": 0.68, "lr_reductions": 2, "threshold": 0.9},
    "train_unfrozen": {"best_epoch": 3, "best_val_loss": 0.1011, "epochs_run": 4,
                       "stopped": "epochs", "val_accuracy": 0.77, "val_accuracy_before": 0.71,
                       "val_f1": 0.75, "val_precision": 0.76, "val_recall": 0.74,
                       "lr_reductions": 0, "threshold": 0.8},
    "evaluate": EVALUATE,
    "embed_viz": {m: {"silhouette": s, "embedding_dim": 16}
                  for m, s in (("baseline", -0.052), ("frozen", 0.137), ("unfrozen", 0.291))}
    | {"points": 18, "classes": 3, "perplexity_used": 5.0},
    "gradcam_segment": {
        "iou_computed": True, "images": {"val": 18, "test": 18}, "foreground_fraction": 0.3,
        **{model: {"gradcam": {"binarization": "otsu", "refinement": "grabcut:10/30",
                               "target": "prototype", "mean_iou": iou,
                               "mean_iou_unrefined": iou - 0.1, "median_iou": iou + 0.01,
                               "mean_dice": 0.5, "median_dice": 0.5, "val_mean_iou": iou - 0.01}}
           for model, iou in (("baseline", 0.311), ("frozen", 0.422), ("unfrozen", 0.533))},
        "test_accuracy": {"baseline": 0.611, "frozen": 0.722, "unfrozen": 0.833},
        "baselines": {"ellipse": {"mean_iou": 0.384, "median_iou": 0.39, "mean_dice": 0.55,
                                  "median_dice": 0.56},
                      "full": {"mean_iou": 0.255, "median_iou": 0.25, "mean_dice": 0.4,
                               "median_dice": 0.4}},
        "best_method": {"baseline": "gradcam", "frozen": "gradcam", "unfrozen": "gradcam"}},
}
FIGURES = ["verify_normalization/histograms", "train_frozen/curves", "train_unfrozen/curves",
           "evaluate/confusion_matrix", "evaluate/roc", "evaluate/distance_histograms",
           "evaluate/similarity", "evaluate/retrieval_examples", "evaluate/worst_queries",
           "evaluate/brand_new",
           "embed_viz/tsne", "embed_viz/pca", "gradcam_segment/overlays_baseline",
           "gradcam_segment/overlays_frozen", "gradcam_segment/overlays_unfrozen",
           "gradcam_segment/iou_histogram", "future_stage/something"]


def history(lrs: list[float], val_loss: list[float]) -> pd.DataFrame:
    n = len(lrs)
    return pd.DataFrame({
        "epoch": range(n), "lr": lrs, "val_loss": val_loss,
        "train_loss": [None] + [0.3 - 0.01 * i for i in range(1, n)],
        "train_accuracy": [0.5 + 0.03 * i for i in range(n)],
        "val_accuracy": [0.5 + 0.02 * i for i in range(n)]})


FROZEN_HISTORY = history([1e-3] * 4 + [5e-4] * 4 + [2.5e-4] * 3,
                         [0.3, 0.2, 0.18, 0.16, 0.15, 0.14, 0.13, 0.1234, 0.125, 0.13, 0.14])
UNFROZEN_HISTORY = history([1e-3] * 5, [0.13, 0.12, 0.11, 0.1011, 0.104])


def tiny_png(path: Path, colour: str) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, ax = plt.subplots(figsize=(1.2, 0.8))
    ax.set_facecolor(colour)
    ax.set(title=path.stem, xlabel="x")
    figure.savefig(path, dpi=40)
    plt.close(figure)


def make_project(root: Path) -> Path:
    """A fake project under `root`: metrics/details/*.json and plots/<stage>/ as the stages write
    them, and excluded.csv."""
    (root / "metrics" / "details").mkdir(parents=True, exist_ok=True)
    for stage, values in METRICS.items():
        (root / "metrics" / "details" / f"{stage}.json").write_text(json.dumps(values))
    colours = matplotlib.colormaps["tab20"]
    for i, key in enumerate(FIGURES):
        tiny_png(root / "plots" / f"{key}.png", colours(i))
    FROZEN_HISTORY.to_csv(root / "plots/train_frozen/history.csv", index=False)
    UNFROZEN_HISTORY.to_csv(root / "plots/train_unfrozen/history.csv", index=False)
    (root / "plots/split").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"label": ["a", "b", "c"], "train": [21, 35, 28], "val": [4, 8, 6],
                  "test": [5, 7, 6]}).to_csv(root / "plots/split/class_counts.csv", index=False)
    pd.DataFrame({"path": ["a/bad.jpg"], "reason": ["not an image"]}).to_csv(
        root / "excluded.csv", index=False)
    return root


def load(root: Path, experiments: pd.DataFrame | None = None) -> report.Inputs:
    """The project's inputs, with the figures the report draws itself saved under `root`."""
    inputs = report.load_inputs(root / "metrics" / "details", root / "plots", PARAMS, RUN,
                                experiments, root / "excluded.csv")
    for key, figure in list(report.drawn_figures(inputs)):
        png = root / "report_figures" / f"{key}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(png, dpi=40)
        matplotlib.pyplot.close(figure)
        inputs.figures[key] = png
    return inputs


def mlflow_runs(lrs_and_maps: tuple[tuple[str, float], ...] = (("0.001", 0.41), ("0.0001", 0.58),
                                                               ("0.01", 0.2))) -> list[dict]:
    """Pipeline runs as `tracking.pipeline_runs` returns them, differing only in lr."""
    return [{"run_id": f"r{i}", "name": f"run {i}", "dvc_experiment": f"exp-{i}",
             "git_commit": "abcdef0123", "params": {"lr": lr, "seed": "42"},
             "metrics": {"evaluate.unfrozen.map": m, "evaluate.frozen.map": m - 0.1}}
            for i, (lr, m) in enumerate(lrs_and_maps)]
