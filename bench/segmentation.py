"""Rows 13-15: segmentation for free on Leeds Butterfly (issue 14), whole pipeline each.

13: the default pipeline (pretrained EfficientNet-Lite0, triplet embedding, whole trunk
    fine-tuned): its best saliency method's test IoU, and what gradcam_segment costs against
    train_unfrozen;
14: the same backbone fine-tuned as a classifier (cross entropy);
15: the course brief's 6n+2 CIFAR ResNet (n = 2) trained from scratch as a classifier.
Each model's method is the one with the best IoU on val (``best_method``); its binarisation and
refinement were chosen on val too, and test is scored once.
"""

from __future__ import annotations

from pathlib import Path

import common
from full_pipeline import result

MODELS = ("baseline", "frozen", "unfrozen")


def best(segment: dict, model: str) -> tuple[str, dict]:
    method = segment["best_method"][model]
    return method, segment[model][method]


def summary(segment: dict) -> str:
    ellipse = segment["baselines"]["ellipse"]["mean_iou"]
    parts = []
    for model in MODELS:
        method, chosen = best(segment, model)
        accuracy = segment.get("test_accuracy", {}).get(model)
        parts.append(f"{model} {chosen['mean_iou']:.3f} ({method}, {chosen['refinement']}"
                     + (f"; acc. {accuracy:.3f}" if accuracy is not None else "") + ")")
    return f"test IoU {', '.join(parts)}; ellipse prior {ellipse:.3f}"


def iou_check(minimum: float):
    def check(evaluate: dict, run: dict) -> tuple[bool, str]:
        segment = run["metrics"]["gradcam_segment"]
        ellipse = segment["baselines"]["ellipse"]["mean_iou"]
        iou = best(segment, "unfrozen")[1]["mean_iou"]
        return iou >= minimum and iou >= ellipse + 0.10, summary(segment)
    return check


def run_13(quick: bool, workdir: Path) -> common.Result:
    def check(evaluate: dict, run: dict) -> tuple[bool, str]:
        passed, figure = iou_check(0.70)(evaluate, run)
        seconds = {row["stage"]: row["seconds"] for row in run["stages"]}
        cost = seconds["gradcam_segment"] / seconds["train_unfrozen"]
        return passed and cost <= 1.0, (
            f"{figure}; gradcam_segment {seconds['gradcam_segment']:.0f} s = {cost:.2f}× "
            f"train_unfrozen ({seconds['train_unfrozen']:.0f} s)")
    return result(13, "leeds_segment", quick, workdir,
                  "Leeds segmentation from saliency, pretrained embedding model (defaults)",
                  "fine-tuned IoU ≥ 0.70 and ≥ ellipse + 0.10; gradcam_segment ≤ "
                  "train_unfrozen time", check)


def run_14(quick: bool, workdir: Path) -> common.Result:
    return result(14, "leeds_ce", quick, workdir,
                  "Leeds segmentation from saliency, pretrained classifier (cross entropy)",
                  "fine-tuned IoU ≥ 0.70 and ≥ ellipse + 0.10", iou_check(0.70))


def run_15(quick: bool, workdir: Path) -> common.Result:
    return result(15, "leeds_scratch", quick, workdir,
                  "Leeds segmentation from saliency, 6n+2 ResNet (n = 2) classifier from "
                  "scratch, 128 px", "trained IoU ≥ 0.55 and ≥ ellipse + 0.10",
                  iou_check(0.55))
