"""The sections' tables (and the few fixed paragraphs), built from the inputs.

Every public function is `(Inputs) -> list[Block]` and returns nothing for inputs that are absent:
sections.py reports a stage that has not run, so these never have to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from retrieval import compared
from retrieval.report.document import Block, Bullets, Missing, Table, Text
from retrieval.report.formatting import fmt, fmt_param, number, with_ci
from retrieval.report.inputs import (
    MODELS,
    STAGES,
    TRAIN_STAGES,
    Inputs,
    lr_changes,
    stage_order,
)

VERIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "eer",
                        "fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "threshold", "tp", "tn", "fp",
                        "fn")
RETRIEVAL_METRICS = ("precision_at_1", "precision_at_5", "recall_at_1", "recall_at_5",
                     "recall_at_10", "map", "map_at_r")
# evaluate.json's cosine similarity of the test pairs (metrics.cosine_separation): own table.
SIMILARITY_METRICS = ("cosine_same_mean", "cosine_different_mean", "cosine_gap",
                      "cosine_same_std", "cosine_different_std")
LOWER_IS_BETTER = {"eer", "fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "fp", "fn"}
NOT_COMPARED = {"threshold", "embedding_dim", "n_queries", "n_queries_without_relevant", "ranks",
                "map_exact"}
LABELS = {"accuracy": "pair accuracy", "precision": "pair precision", "recall": "pair recall",
          "f1": "pair F1", "roc_auc": "ROC AUC", "eer": "equal error rate",
          "fnmr_at_fmr_1e-2": "FNMR at FMR 1e-2", "fnmr_at_fmr_1e-3": "FNMR at FMR 1e-3",
          "threshold": "distance threshold", "tp": "true positives", "tn": "true negatives",
          "fp": "false positives", "fn": "false negatives", "precision_at_1": "P@1",
          "precision_at_5": "P@5", "recall_at_1": "R@1", "recall_at_5": "R@5",
          "recall_at_10": "R@10", "map": "mAP", "map_at_r": "MAP@R"}


def frame_table(frame: pd.DataFrame, caption: str = "") -> Table:
    """A DataFrame as a table, every cell printed by `fmt`."""
    rows = tuple(tuple(fmt(v.item() if hasattr(v, "item") else v) for v in row)
                 for row in frame.itertuples(index=False))
    return Table(tuple(map(str, frame.columns)), rows, caption)


def model_table(scores: Mapping[str, Mapping], names: Sequence[str], caption: str = "") -> Table:
    """Rows: metrics; columns: baseline, frozen, unfrozen (with 95% CIs) and the best model."""
    models = [m for m in MODELS if m in scores]
    rows = []
    for name in names:
        values = {m: number(scores[m].get(name)) for m in models}
        if all(v is None for v in values.values()):
            continue
        printed = {m: fmt(v) for m, v in values.items() if v is not None}
        best = ""
        if name not in NOT_COMPARED and len(set(printed.values())) > 1:
            pick = min if name in LOWER_IS_BETTER else max
            top = fmt(pick(v for v in values.values() if v is not None))
            best = ", ".join(m for m, v in printed.items() if v == top)  # ties as printed
        direction = "" if name in NOT_COMPARED else "lower" if name in LOWER_IS_BETTER \
            else "higher"
        rows.append((LABELS.get(name, name), direction,
                     *(with_ci(scores[m], name) for m in models), best))
    return Table(("metric", "better", *models, "best"), tuple(rows), caption)


def _other_metrics(scores: Mapping[str, Mapping]) -> list[str]:
    """Numeric metrics evaluate.json has that neither table names (a new metric is shown)."""
    known = set(VERIFICATION_METRICS) | set(RETRIEVAL_METRICS) | set(SIMILARITY_METRICS) \
        | NOT_COMPARED
    names: set[str] = set()
    for values in scores.values():
        if isinstance(values, dict):
            names |= {k for k, v in values.items() if number(v) is not None and k not in known
                      and not re.search(r"_ci_(low|high)$", k)}
    return sorted(names)


def data(inputs: Inputs) -> list[Block]:
    """The dataset, the split counts, images per class and split, the excluded files."""
    prepare, split = inputs.metrics.get("prepare"), inputs.metrics.get("split")
    blocks: list[Block] = []
    if prepare is not None:
        blocks.append(Table(("images", "classes", "smallest class", "largest class",
                             "excluded files", "images with mask"),
                            ((fmt(prepare.get("images")), fmt(prepare.get("classes")),
                              fmt(prepare.get("min_class_size")),
                              fmt(prepare.get("max_class_size")), fmt(prepare.get("excluded")),
                              fmt(prepare.get("images_with_mask"))),), "The dataset"))
    if split is not None:
        blocks.append(Table(("split", "images", "classes"), tuple(
            (name, fmt(split.get(f"{name}_images")), fmt(split.get(f"{name}_classes")))
            for name in ("train", "val", "test")), f"Split counts ({split.get('mode')})"))
    counts = inputs.class_counts
    if counts is not None and len(counts):
        shown = counts
        caption = "Images per class and split"
        if len(counts) > 40:
            total = counts[["train", "val", "test"]].sum(axis=1)
            shown = counts.loc[total.sort_values(kind="stable").index[:20]]
            caption += f" (the 20 smallest of {len(counts)} classes)"
        blocks.append(frame_table(shown, caption))
    excluded = inputs.excluded
    if excluded is not None and len(excluded):
        blocks.append(frame_table(excluded.head(50), "Excluded files" + (
            f" (first 50 of {len(excluded)})" if len(excluded) > 50 else "")))
    elif prepare and prepare.get("excluded_files"):
        files = prepare["excluded_files"]
        blocks.append(Bullets(tuple(map(str, files[:50])), "Excluded files"))
    return blocks


def normalization(inputs: Inputs) -> list[Block]:
    """Per-channel mean and std before and after normalisation."""
    metrics = inputs.metrics.get("verify_normalization")
    if metrics is None:
        return []
    rows = tuple((channel, *(fmt(metrics.get(f"{kind}_{channel.lower()}")) for kind in
                             ("raw_mean", "raw_std", "normalized_mean", "normalized_std")))
                 for channel in ("R", "G", "B"))
    return [Table(("channel", "mean before", "std before", "mean after", "std after"), rows,
                  f"Per-channel statistics of {metrics.get('images')} training images at "
                  f"{metrics.get('image_size')} px (after: the model's input)")]


def training(inputs: Inputs) -> list[Block]:
    """The training stages' summary metrics side by side."""
    stages = [s for s in TRAIN_STAGES if s in inputs.metrics]
    if not stages:
        return []
    names = ("best_epoch", "best_val_loss", "epochs_run", "stopped", "lr_reductions",
             "val_accuracy_before", "val_accuracy", "val_precision", "val_recall",
             "val_f1_before", "val_f1", "threshold")
    rows = tuple((name, *(fmt(inputs.metrics[s].get(name)) for s in stages)) for name in names
                 if any(name in inputs.metrics[s] for s in stages))
    return [Table(("metric (validation)", *stages), rows,
                  "Training summary (the best epoch is the one with the lowest validation loss; "
                  "its weights are kept)")]


def lr_schedule(inputs: Inputs) -> list[Block]:
    """Initial lr, its changes and the final lr per training stage (or that none ran)."""
    rows = []
    for stage, history in inputs.histories.items():
        changes = lr_changes(history)
        if "lr" in history and len(history):
            rows.append((stage, fmt_param(float(history["lr"].iloc[0])),
                         "; ".join(f"epoch {e}: {fmt_param(old)} to {fmt_param(new)}"
                                   for e, old, new in changes) or "none",
                         fmt_param(float(history["lr"].iloc[-1]))))
    if not rows:
        return [Missing("No training history found (plots/train_*/history.csv): run "
                        "`dvc repro train_unfrozen`.")]
    factor = inputs.params.get("train.lr_factor")
    patience = inputs.params.get("train.lr_patience")
    caption = "Learning rate per training stage"
    if factor is not None:
        caption += (f" (ReduceLROnPlateau: x{fmt_param(factor)} after {patience} "
                    f"epoch{'' if patience == 1 else 's'} without a lower validation loss)")
    return [Table(("stage", "initial lr", "changes", "final lr"), tuple(rows), caption)]


def comparison(inputs: Inputs) -> list[Block]:
    """Pair verification and retrieval metrics of the three models, with 95% CIs."""
    scores = inputs.metrics.get("evaluate")
    if scores is None:
        return []
    scores = {m: v for m, v in scores.items() if m in MODELS and isinstance(v, dict)}
    blocks: list[Block] = [
        Text("Baseline: the backbone before any training (its pooled descriptor); frozen: the "
             "head trained on the frozen backbone; unfrozen: the whole network fine-tuned. "
             "Square brackets give 95% bootstrap confidence intervals."),
        model_table(scores, VERIFICATION_METRICS, "Pair verification on the test pairs "
                    "(threshold chosen on validation pairs)"),
        model_table(scores, RETRIEVAL_METRICS + tuple(_other_metrics(scores)),
                    "Retrieval: test queries against the gallery")]
    any_model = next(iter(scores.values()), {})
    if "n_queries" in any_model:
        blocks.append(Text(f"{any_model['n_queries']} queries, ranked against "
                           f"{any_model.get('ranks')} gallery images each; "
                           + ", ".join(f"{m}: {scores[m].get('embedding_dim')}-d"
                                       for m in scores) + " embeddings."))
    return blocks


def decision_threshold(inputs: Inputs) -> list[Block]:
    """The one threshold the searched model decides with, outside this report too: evaluate's,
    saved beside the checkpoint, which `retrieval compare`, the search page and the export read
    (or a notice saying why they would not find it)."""
    found = inputs.threshold
    if found is None:
        return []
    model = compared.SEARCHED
    if found.value is None:
        return [Missing(f"No evaluate threshold for the {model} model's checkpoint: "
                        f"{found.source}. `retrieval compare` and the search page then decide "
                        "at the threshold stored in the checkpoint at training time.")]
    # 4 decimals, as `retrieval compare` and the search page print it.
    blocks: list[Block] = [Text(
        f"Decision threshold of the {model} model: distance <= {found.value:.4f} is \"same "
        f"class\" ({found.source}). `retrieval compare`, `retrieval serve` and the export's "
        "preprocessing.json decide with this same threshold; the accuracy above is measured "
        "at it.")]
    reported = number((inputs.metrics.get("evaluate") or {}).get(model, {}).get("threshold"))
    # evaluate.json rounds to 6 decimals.
    if reported is not None and abs(reported - found.value) > 1e-6:
        blocks.append(Missing(f"The evaluate metrics give the {model} model the threshold "
                              f"{reported:.4f}, not {found.value:.4f}: the metrics come from "
                              "another evaluate run; run `dvc repro evaluate`."))
    return blocks


def similarity(inputs: Inputs) -> list[Block]:
    """Mean cosine similarity of same-class and of different-class test pairs per model, and the
    gap between them (or a notice when evaluate.json predates them)."""
    scores = inputs.metrics.get("evaluate")
    if scores is None:
        return []
    found = {m: scores[m] for m in MODELS if isinstance(scores.get(m), dict)
             and any(number(scores[m].get(k)) is not None for k in SIMILARITY_METRICS)}
    if not found:
        return [Missing("The evaluate metrics have no cosine similarities of the test pairs (they "
                        "predate them): run `dvc repro evaluate` to add them.")]
    rows = tuple((m, *(fmt(found[m].get(k)) for k in SIMILARITY_METRICS)) for m in found)
    return [Table(("model", "same-class mean", "different-class mean", "gap (same - different)",
                   "same-class std", "different-class std"), rows,
                  "Cosine similarity of the embeddings of the test pairs (vectors L2-normalised "
                  "first)")]


def embeddings(inputs: Inputs) -> list[Block]:
    """Per model: dimensions, silhouette (Euclidean and cosine), leave-one-out kNN accuracy and
    P@1 in the embedding space, and the shape of the classes of a raw embedding."""
    metrics = inputs.metrics.get("embed_viz")
    if metrics is None:
        return []
    models = [m for m in MODELS if isinstance(metrics.get(m), dict)]
    rows = tuple((m, fmt(metrics[m].get("embedding_dim")), fmt(metrics[m].get("silhouette")),
                  fmt(metrics[m].get("silhouette_cosine")), fmt(metrics[m].get("knn_accuracy")),
                  fmt(metrics[m].get("p_at_1")),
                  metrics[m].get("class_shape")
                  or ("unit vectors" if metrics[m].get("unit_length") else "too few points")
                  if "class_shape" in metrics[m] else "")
                 for m in models)
    perplexity = metrics.get("perplexity_used", metrics.get("perplexity"))
    return [Table(("model", "dimensions", "silhouette", "silhouette (cosine)",
                   f"{metrics.get('knn_k', 'k')}-NN accuracy", "P@1", "classes lie as"), rows,
                  f"{metrics.get('points')} test embeddings ({metrics.get('classes')} classes), "
                  "scored in the full embedding space, kNN and P@1 leaving each point out; "
                  f"t-SNE perplexity {fmt_param(perplexity)}")]


def saliency(inputs: Inputs) -> list[Block]:
    """One table per model: its saliency methods (binarisation and refinement chosen on val)
    beside the trivial baselines, best test IoU first, with the model's test accuracy."""
    metrics = inputs.metrics.get("gradcam_segment")
    if metrics is None:
        return []
    if not metrics.get("iou_computed", False):
        return [Missing(metrics.get("reason", "IoU was not computed (no ground-truth masks)."))]
    images = metrics.get("images") or {}
    counted = (f"{images.get('val')} val, {images.get('test')} test images"
               if isinstance(images, dict) and images else "")
    priors = [(f"prior: {name}", "", "", "", fmt(v.get("mean_iou")), fmt(v.get("median_iou")),
               fmt(v.get("mean_dice")), v.get("mean_iou"))
              for name, v in (metrics.get("baselines") or {}).items()]
    accuracy = metrics.get("test_accuracy") or {}
    blocks: list[Block] = []
    for model in MODELS:
        methods = metrics.get(model) or {}
        if not methods:
            continue
        chosen = (metrics.get("best_method") or {}).get(model)
        rows = [(f"{method} (chosen on val)" if method == chosen else method,
                 f"{v.get('binarization', '')}, {v.get('refinement', 'none')}",
                 fmt(v.get("val_mean_iou")), fmt(v.get("mean_iou_unrefined")),
                 fmt(v.get("mean_iou")), fmt(v.get("median_iou")), fmt(v.get("mean_dice")),
                 v.get("mean_iou")) for method, v in methods.items()]
        rows = sorted(rows + priors, key=lambda row: -(row[-1] if row[-1] is not None else -1))
        caption = f"{model} model: saliency masks against the ground truth"
        if accuracy.get(model) is not None:
            caption += f"; test accuracy {fmt(accuracy[model])}"
        blocks.append(Table(("method", "binarisation, refinement (chosen on val)", "val IoU",
                             "test IoU unrefined", "test mean IoU", "test median IoU",
                             "test mean Dice"), tuple(row[:-1] for row in rows),
                            caption + (f" ({counted})" if counted else "")))
    return blocks


def experiments(inputs: Inputs) -> list[Block]:
    """The pipeline runs recorded in MLflow, side by side (or how to make some)."""
    table = inputs.experiments
    if table is None:
        return [Missing("MLflow was not searched for other experiments.")]
    if len(table) < 2:
        return [Text("Only one pipeline run with test metrics is recorded in MLflow. Run "
                     "experiments (e.g. `dvc exp run -S lr=0.0003`) and `dvc repro report` "
                     "to compare them here.")]
    return [frame_table(table, "Pipeline runs recorded in MLflow (parameters that differ "
                        "between them; test metrics), best unfrozen mAP first")]


def wall_time(inputs: Inputs) -> list[Block]:
    """Minutes each stage's MLflow run took, in pipeline order, and their sum."""
    durations = inputs.run.durations
    stages = sorted(durations, key=stage_order)
    if not stages:
        return [Text("No stage of this pipeline execution has a finished MLflow run (stages "
                     "restored from DVC's run cache keep the time of the run that made them).")]
    rows = tuple((stage, f"{durations[stage] / 60:.1f}") for stage in stages)
    total = sum(durations.values())
    return [Table(("stage", "minutes"), (*rows, ("all of them", f"{total / 60:.1f}")),
                  "Wall time of each stage in this pipeline execution (start to end of its "
                  "MLflow run; the report's own run is still open)")]


def configuration(inputs: Inputs) -> list[Block]:
    """This run's commit, experiment and MLflow runs, and every parameter."""
    run = inputs.run
    blocks: list[Block] = [Table(("item", "value"), (
        ("git commit", run.git_commit), ("DVC experiment", run.dvc_experiment),
        ("MLflow experiment", "retrieval"),
        ("MLflow parent run", run.run_ids.get("pipeline", "n/a"))), "This run")]
    order = {stage: i for i, stage in enumerate((*STAGES, "report"))}
    stage_ids = tuple(sorted(((s, i) for s, i in run.run_ids.items() if s != "pipeline"),
                             key=lambda item: (order.get(item[0], len(order)), item[0])))
    reused = tuple((s, "not re-run in this execution (see an earlier run in MLflow)")
                   for s in inputs.metrics if s not in run.run_ids)
    if stage_ids or reused:
        blocks.append(Table(("stage", "MLflow run id"), stage_ids + reused,
                            "MLflow runs of the stages"))
    if inputs.params:
        blocks.append(Table(("parameter", "value"), tuple(
            (k, fmt_param(v)) for k, v in sorted(inputs.params.items())),
            "All parameters (params.yaml)"))
    return blocks
