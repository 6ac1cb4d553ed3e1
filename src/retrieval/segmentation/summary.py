"""The tables and the metrics JSON of a segmentation result: test IoU/Dice per (model, method),
per class and for the trivial baselines (priors), and each model's test accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retrieval import outputs
from retrieval.segmentation.experiment import SegmentationResult


def _stats(frame: pd.DataFrame) -> dict[str, float]:
    return {"mean_iou": float(frame["iou"].mean()), "median_iou": float(frame["iou"].median()),
            "mean_dice": float(frame["dice"].mean()),
            "median_dice": float(frame["dice"].median()), "images": int(len(frame))}


def summary_table(result: SegmentationResult) -> pd.DataFrame:
    """One row per (model, method) and per trivial baseline: test IoU/Dice, mean and median;
    mean_iou_unrefined is the test IoU before the refinement chosen on val; flat_maps is the
    fraction of test maps that point at nothing (empty masks)."""
    rows = []
    for choice in result.choices.to_dict("records"):
        frame = result.scores[(result.scores["model"] == choice["model"])
                              & (result.scores["method"] == choice["method"])]
        stats = ({**_stats(frame), "mean_iou_unrefined": float(frame["iou_unrefined"].mean())}
                 if len(frame) else {})
        rows.append({**choice, "test_accuracy": result.accuracy.get(choice["model"]), **stats})
    for name, frame in result.baselines.groupby("baseline", sort=False):
        setting = (f"fraction {result.foreground_fraction:.3f}" if name in ("ellipse", "square")
                   else "")
        rows.append({"model": "trivial", "method": name, "binarization": setting,
                     **_stats(frame)})
    columns = ["model", "method", "target", "test_accuracy", "binarization", "refinement",
               "flat_maps", "val_mean_iou_unrefined", "val_mean_iou", "mean_iou_unrefined",
               "mean_iou", "median_iou", "mean_dice", "median_dice", "images"]
    return pd.DataFrame(rows).reindex(columns=columns)


def per_class_table(result: SegmentationResult) -> pd.DataFrame:
    """Mean and median IoU/Dice per (model, method, class) and per (baseline, class)."""
    trivial = result.baselines.rename(columns={"baseline": "method"}).assign(model="trivial")
    frames = pd.concat([result.scores, trivial]) if len(trivial) else result.scores
    columns = ["model", "method", "label", "mean_iou", "median_iou", "mean_dice", "median_dice",
               "images"]
    if frames.empty:
        return pd.DataFrame(columns=columns)
    grouped = frames.groupby(["model", "method", "label"], sort=False)
    table = grouped.agg(mean_iou=("iou", "mean"), median_iou=("iou", "median"),
                        mean_dice=("dice", "mean"), median_dice=("dice", "median"),
                        images=("iou", "size")).reset_index()
    return table[columns]


def metrics(result: SegmentationResult) -> dict:
    """The metrics JSON: {"iou_computed", "<model>": {"<method>": {...}}, "baselines": {...}}."""
    summary: dict = {"iou_computed": result.iou_computed, "images": result.images,
                     "foreground_fraction": result.foreground_fraction,
                     "prototype_classes_from_split": result.prototype_classes_from_split}
    if not result.iou_computed:
        summary["reason"] = ("no ground-truth masks for the test images: IoU was not computed "
                             "(set data.masks to a masks folder parallel to data.root)")
    table = summary_table(result)
    summary["test_accuracy"] = {name: value for name, value in result.accuracy.items()}
    for row in table[table["model"] != "trivial"].to_dict("records"):
        entry = {"binarization": row["binarization"], "refinement": row["refinement"],
                 "target": row["target"], "flat_maps": row["flat_maps"]}
        if result.iou_computed:
            entry.update({k: row[k] for k in ("mean_iou", "median_iou", "mean_dice",
                                              "median_dice", "mean_iou_unrefined",
                                              "val_mean_iou_unrefined", "val_mean_iou")})
        summary.setdefault(row["model"], {})[row["method"]] = entry
    if result.iou_computed:
        summary["baselines"] = {
            row["method"]: {k: row[k] for k in ("mean_iou", "median_iou", "mean_dice",
                                                "median_dice")}
            for row in table[table["model"] == "trivial"].to_dict("records")}
        chosen = best_methods(result)
        if chosen:
            summary["best_method"] = chosen
    return summary


def best_methods(result: SegmentationResult) -> dict[str, str]:
    """model -> its method with the best validation IoU (chosen without test labels)."""
    chosen = result.choices.dropna(subset=["val_mean_iou"]) if len(result.choices) else \
        result.choices
    if not len(chosen):
        return {}
    best = chosen.loc[chosen.groupby("model", sort=False)["val_mean_iou"].idxmax()]
    return dict(zip(best["model"], best["method"], strict=True))


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; floats with 3 decimals, missing values empty."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.3f}"
        return "" if value is None else str(value)

    return outputs.markdown_table(list(table.columns), ([cell(v) for v in row]
                                                        for row in table.itertuples(index=False)))
