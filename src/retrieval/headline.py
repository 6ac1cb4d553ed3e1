"""The headline metrics: the few numbers a user compares across experiments, apart from the rest.

`dvc metrics show`, `dvc metrics diff` and `dvc exp show` print every key of every file dvc.yaml
declares under `metrics:`, and the MLflow UI lists every metric of the parent run. So each stage
writes everything it measured to ``paths.details(stage)`` (a plain output: the report reads it;
the stage's MLflow run logs it) and only its headline numbers to its DVC metrics files:

    evaluate         metrics/evaluate/<model>.json         precision_at_1, map, accuracy (pair
                                                           verification), roc_auc; test split
    gradcam_segment  metrics/gradcam_segment/<model>.json  iou.<method>: test mean IoU
    train_frozen     metrics/train_frozen.json             val_accuracy (pair accuracy on the
    train_unfrozen   metrics/train_unfrozen.json           training-time val pairs), best_epoch

One file per compared model makes `dvc metrics show` a table of models (rows) by metrics
(columns). The MLflow parent run carries the same numbers as ``<stage>.<key>`` with the model
first in the key (``evaluate.unfrozen.map``, ``gradcam_segment.frozen.iou.layercam``). The other
stages (prepare, split, verify_normalization, export, embed_viz) write details only: counts,
checks and diagnostics, nothing an experiment is judged by.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrieval import compared, config, outputs, paths

# evaluate's per-model headline: P@1, mAP, pair accuracy (at the val-chosen threshold), ROC AUC.
EVALUATE_KEYS = ("precision_at_1", "map", "accuracy", "roc_auc")
# A training stage's headline: the best epoch's val pair accuracy, and which epoch that was
# (0: training never beat the model it started from).
TRAINING_KEYS = ("val_accuracy", "best_epoch")
TRAINING_STAGES = ("train_frozen", "train_unfrozen")
PER_MODEL_STAGES = ("evaluate", "gradcam_segment")


def files(stage: str, details: Mapping[str, Any]) -> dict[Path, dict[str, Any]]:
    """The headline metrics files of ``stage`` (path -> content) from its details; {} for a
    stage without headline numbers. A per-model stage writes every compared model's file, empty
    when it has no headline number for that model (gradcam_segment without ground-truth masks),
    so the files dvc.yaml declares always exist."""
    if stage == "evaluate":
        return {paths.model_metrics(stage, model): {k: details[model][k] for k in EVALUATE_KEYS
                                                    if k in details.get(model, {})}
                for model in compared.MODELS}
    if stage == "gradcam_segment":
        return {paths.model_metrics(stage, model): _iou(details.get(model))
                for model in compared.MODELS}
    if stage in TRAINING_STAGES:
        return {paths.metrics(stage): {k: details[k] for k in TRAINING_KEYS if k in details}}
    return {}


def _iou(methods: Any) -> dict[str, Any]:
    iou = {method: entry["mean_iou"] for method, entry in (methods or {}).items()
           if isinstance(entry, dict) and entry.get("mean_iou") is not None}
    return {"iou": iou} if iou else {}


def flat(stage: str, details: Mapping[str, Any]) -> dict[str, float]:
    """The stage's headline numbers for the MLflow parent run: ``model.key`` for a per-model
    stage (``unfrozen.map``), ``key`` otherwise; tracking prefixes them with the stage."""
    found: dict[str, float] = {}
    for path, content in files(stage, details).items():
        prefix = f"{path.stem}." if stage in PER_MODEL_STAGES else ""
        found.update({f"{prefix}{key}": value for key, value in config.flatten(content).items()})
    return found


def write(stage: str, details: Mapping[str, Any]) -> None:
    """Everything ``stage`` measured to its details JSON, and its headline metrics files."""
    outputs.write_json(paths.details(stage), dict(details))
    for path, content in files(stage, details).items():
        outputs.write_json(path, content)
