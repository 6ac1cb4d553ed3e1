"""The pipeline's report: every stage's metrics and figures, with observations from the numbers.

Three steps, each usable on its own:
  `load_inputs`     reads what the stages left (a stage that has not run is recorded as missing,
                    never an error) into `Inputs`;
  `build_sections`  turns them into `Section`s of blocks (text, bullets, tables, figures, notices);
                    the sentences come from `observations`, computed from the numbers only;
  `render_markdown`, `render_html`, `render_pdf` draw the same sections (HTML with the images
                    embedded; the PDF with reportlab, so no browser is needed).

Numbers are printed with 3 decimals (`fmt`), the same everywhere, so a test can find each metric of
the JSON files in the report. Nothing here reads the clock: the output is a function of the inputs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

TITLE = "Image retrieval with contrastive learning: pipeline report"
MODELS = ("baseline", "frozen", "unfrozen")
TRAIN_STAGES = ("train_frozen", "train_unfrozen")
STAGES = ("prepare", "split", "verify_normalization", *TRAIN_STAGES, "evaluate", "embed_viz",
          "gradcam_segment")
LR_FIGURE = "report/lr_schedule"  # the one figure the report draws itself (from history.csv)

# What each known figure shows (a description, not a finding: findings are observations).
CAPTIONS = {
    "verify_normalization/histograms": "Pixel values of a training sample per channel, before "
    "(0..1) and after normalisation (the model's input).",
    "train_frozen/curves": "train_frozen (backbone frozen, head trained): loss, pair accuracy, "
    "precision, recall, F1 and learning rate per epoch, train vs validation. Epoch 0 is before "
    "training.",
    "train_unfrozen/curves": "train_unfrozen (whole network fine-tuned): loss, pair accuracy, "
    "precision, recall, F1 and learning rate per epoch, train vs validation. Epoch 0 is the "
    "starting point.",
    LR_FIGURE: "Learning rate per epoch (log scale, top) and the losses it acted on (bottom); "
    "dashed lines mark the epochs where ReduceLROnPlateau lowered it.",
    "evaluate/confusion_matrix": "Pair verification on the test pairs: confusion matrices at the "
    "distance threshold chosen on validation pairs.",
    "evaluate/roc": "ROC curves of pair verification (test pairs): true vs false positive rate "
    "as the distance threshold varies.",
    "evaluate/distance_histograms": "Distances between the embeddings of same-class and "
    "different-class test pairs, with the chosen threshold.",
    "evaluate/retrieval_examples": "Example test queries and their nearest gallery images "
    "(correct class framed green, wrong red).",
    "evaluate/worst_queries": "The test queries with the lowest average precision and their "
    "nearest gallery images.",
    "embed_viz/tsne": "t-SNE of the test embeddings: before training (baseline) and after "
    "(frozen, unfrozen).",
    "embed_viz/pca": "PCA (first two components) of the test embeddings: baseline, frozen, "
    "unfrozen.",
    "embed_viz/direct": "The 2-D embeddings plotted directly.",
    "gradcam_segment/overlays_baseline": "Saliency masks of the untrained backbone (baseline) "
    "on test images: prediction yellow, ground truth green.",
    "gradcam_segment/overlays_frozen": "Saliency masks of the frozen model on test images: "
    "prediction yellow, ground truth green.",
    "gradcam_segment/overlays_unfrozen": "Saliency masks of the fine-tuned (unfrozen) model on "
    "test images: prediction yellow, ground truth green.",
    "gradcam_segment/iou_histogram": "IoU of the saliency masks with the ground truth per test "
    "image, against the trivial baselines.",
}

# Section id -> (title, stages whose figures it shows, figures in order of appearance).
SECTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "summary": ("Summary", (), ()),
    "data": ("Data", ("prepare", "split"), ()),
    "normalization": ("Normalisation check", ("verify_normalization",),
                      ("verify_normalization/histograms",)),
    "training": ("Training curves: frozen vs unfrozen", TRAIN_STAGES,
                 ("train_frozen/curves", "train_unfrozen/curves")),
    "lr_schedule": ("Learning-rate schedule", ("report",), (LR_FIGURE,)),
    "comparison": ("Baseline vs frozen vs unfrozen (test set)", (), ()),
    "verification": ("Pair verification: confusion matrix, ROC, distances", (),
                     ("evaluate/confusion_matrix", "evaluate/roc",
                      "evaluate/distance_histograms")),
    "retrieval": ("Retrieval examples", ("evaluate",),
                  ("evaluate/retrieval_examples", "evaluate/worst_queries")),
    "embeddings": ("Embeddings before and after training", ("embed_viz",),
                   ("embed_viz/tsne", "embed_viz/pca", "embed_viz/direct")),
    "gradcam": ("Grad-CAM segmentation", ("gradcam_segment",),
                ("gradcam_segment/overlays_baseline", "gradcam_segment/overlays_frozen",
                 "gradcam_segment/overlays_unfrozen", "gradcam_segment/iou_histogram")),
    "experiments": ("Experiments compared", (), ()),
    "other": ("Other figures", (), ()),
    "configuration": ("Configuration of this run", (), ()),
}
OPTIONAL_FIGURES = {"embed_viz/direct"}  # drawn only for 2-D embeddings

VERIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "eer",
                        "fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "threshold", "tp", "tn", "fp",
                        "fn")
RETRIEVAL_METRICS = ("precision_at_1", "precision_at_5", "recall_at_1", "recall_at_5",
                     "recall_at_10", "map", "map_at_r")
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
EXPERIMENT_METRICS = {"evaluate.frozen.map": "frozen mAP", "evaluate.unfrozen.map": "unfrozen mAP",
                      "evaluate.unfrozen.precision_at_1": "unfrozen P@1",
                      "evaluate.unfrozen.roc_auc": "unfrozen ROC AUC"}


# --- blocks and sections ----------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    text: str  # `code` spans are rendered as code


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    title: str = ""


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    key: str  # "stage/name", e.g. "evaluate/roc"
    path: Path
    caption: str


@dataclass(frozen=True)
class Missing:
    text: str  # what is missing and how to produce it


Block = Text | Bullets | Table | Figure | Missing


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True)
class RunInfo:
    git_commit: str
    dvc_experiment: str
    run_ids: Mapping[str, str]  # stage -> MLflow run id ("pipeline": the parent run)


@dataclass
class Inputs:
    """Everything the report is built from. A stage that has not run has no key anywhere."""

    metrics: dict[str, dict]  # stage -> its metrics JSON
    figures: dict[str, Path]  # "stage/name" -> PNG
    histories: dict[str, pd.DataFrame]  # training stage -> its history.csv
    class_counts: pd.DataFrame | None = None  # label, train, val, test
    excluded: pd.DataFrame | None = None  # path, reason
    params: dict[str, Any] = field(default_factory=dict)  # flattened: "train.lr_factor" -> 0.5
    run: RunInfo = field(default_factory=lambda: RunInfo("unknown", "workspace", {}))
    experiments: pd.DataFrame | None = None  # `experiments_table`


# --- reading the stages' outputs --------------------------------------------------------------


def load_inputs(metrics_dir: str | Path, plots_dir: str | Path, params: dict[str, Any],
                run: RunInfo, experiments: pd.DataFrame | None = None,
                excluded_csv: str | Path | None = None) -> Inputs:
    """Read `<metrics_dir>/<stage>.json`, every PNG under `<plots_dir>/<stage>/`, the training
    histories and the class counts; whatever does not exist is simply absent."""
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    metrics = {stage: json.loads((metrics_dir / f"{stage}.json").read_text())
               for stage in STAGES if (metrics_dir / f"{stage}.json").is_file()}
    figures = {path.relative_to(plots_dir).with_suffix("").as_posix(): path
               for path in sorted(plots_dir.glob("*/**/*.png"))}
    histories = {stage: pd.read_csv(plots_dir / stage / "history.csv")
                 for stage in TRAIN_STAGES if (plots_dir / stage / "history.csv").is_file()}
    counts_csv = plots_dir / "split" / "class_counts.csv"
    counts = pd.read_csv(counts_csv, keep_default_na=False) if counts_csv.is_file() else None
    excluded = None
    if excluded_csv is not None and Path(excluded_csv).is_file():
        excluded = pd.read_csv(excluded_csv, keep_default_na=False, dtype=str)
    return Inputs(metrics, figures, histories, counts, excluded, dict(params), run, experiments)


# --- number formatting ------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A metric as printed everywhere in the report: 3 decimals, integers as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def fmt_param(value: Any) -> str:
    """A parameter value (learning rates stay 0.0005, not 0.001)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt_param(v) for v in value) or "(none)"
    return "(empty)" if value == "" else str(value)


def _with_ci(scores: Mapping[str, Any], name: str) -> str:
    low, high = scores.get(f"{name}_ci_low"), scores.get(f"{name}_ci_high")
    if low is None or high is None:
        return fmt(scores.get(name))
    return f"{fmt(scores.get(name))} [{fmt(low)}, {fmt(high)}]"


def _times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def _change(old: float, new: float, noun: str) -> str:
    """'raised mAP from 0.410 to 0.580' (as printed: equal at 3 decimals reads 'left')."""
    if fmt(old) == fmt(new):
        return f"left {noun} unchanged at {fmt(new)}"
    return f"{'raised' if new > old else 'lowered'} {noun} from {fmt(old)} to {fmt(new)}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# --- observations: sentences computed from the numbers ----------------------------------------


def data_observations(prepare: Mapping | None, split: Mapping | None,
                      excluded: pd.DataFrame | None) -> list[str]:
    notes: list[str] = []
    if prepare:
        low, high = prepare.get("min_class_size"), prepare.get("max_class_size")
        balance = (f"; class sizes range from {low} to {high} images"
                   + (f" (the largest is {high / low:.1f}x the smallest)" if low and high != low
                      else " (balanced)") if low is not None and high is not None else "")
        notes.append(f"The dataset has {prepare.get('images')} images in "
                     f"{prepare.get('classes')} classes{balance}.")
        count = prepare.get("excluded", 0)
        if count and excluded is not None and len(excluded):
            reasons = excluded["reason"].value_counts()
            notes.append(f"{count} files were excluded: " + ", ".join(
                f"{n} {reason}" for reason, n in reasons.items()) + ".")
        elif count:
            notes.append(f"{count} files were excluded (listed below).")
        else:
            notes.append("No file was excluded: every file decoded as an image.")
        with_mask = prepare.get("images_with_mask")
        if with_mask is not None:
            notes.append(f"{with_mask} of {prepare.get('images')} images have a ground-truth "
                         "mask" + (" (needed for the Grad-CAM IoU)." if with_mask else
                                   ": the Grad-CAM IoU cannot be computed."))
    if split:
        sizes = [split.get(f"{name}_images", 0) for name in ("train", "val", "test")]
        total = sum(sizes) or 1
        notes.append(f"The {split.get('mode')} split puts {sizes[0]} / {sizes[1]} / {sizes[2]} "
                     f"images in train / val / test ({100 * sizes[0] / total:.1f} / "
                     f"{100 * sizes[1] / total:.1f} / {100 * sizes[2] / total:.1f} %), with "
                     f"{split.get('train_classes')} / {split.get('val_classes')} / "
                     f"{split.get('test_classes')} classes.")
        if split.get("small_classes"):
            notes.append(f"{split['small_classes']} classes had fewer than 3 images "
                         f"(rule: {split.get('small_class_rule')}).")
    return notes


def normalization_observations(metrics: Mapping | None) -> list[str]:
    if not metrics:
        return []
    means = {c: metrics.get(f"normalized_mean_{c}") for c in "rgb"}
    stds = {c: metrics.get(f"normalized_std_{c}") for c in "rgb"}
    if any(v is None for v in (*means.values(), *stds.values())):
        return []
    worst = max(means, key=lambda c: abs(means[c]))
    mean_tol, std_tol = metrics.get("mean_tolerance", math.inf), metrics.get("std_tolerance",
                                                                             math.inf)
    ok = abs(means[worst]) <= mean_tol and all(abs(s - 1) <= std_tol for s in stds.values())
    return [f"After normalisation the channel means are {fmt(means['r'])}, {fmt(means['g'])}, "
            f"{fmt(means['b'])} (R, G, B; largest |mean| {fmt(abs(means[worst]))} in "
            f"{worst.upper()}, tolerance {fmt(mean_tol)}) and the standard deviations "
            f"{fmt(min(stds.values()))} to {fmt(max(stds.values()))} (tolerance 1 +/- "
            f"{fmt(std_tol)}): the check " + ("passed." if ok else "FAILED."),
            f"Before normalisation the pixel means were {fmt(metrics.get('raw_mean_r'))}, "
            f"{fmt(metrics.get('raw_mean_g'))}, {fmt(metrics.get('raw_mean_b'))} on the 0..1 "
            f"scale ({metrics.get('images')} training images)."]


def training_observations(stage: str, history: pd.DataFrame | None,
                          metrics: Mapping | None) -> list[str]:
    """Where validation loss stopped improving, why training stopped, what the curves did."""
    if history is None or "val_loss" not in history or history["val_loss"].isna().all():
        return []
    metrics = metrics or {}
    epochs = history["epoch"].astype(int)
    best = metrics.get("best_epoch")
    if best not in set(epochs):  # the history is the source of truth for the curves
        best = int(epochs[history["val_loss"].idxmin()])
    best_loss = float(history.loc[epochs == best, "val_loss"].iloc[0])
    last = int(epochs.max())
    notes = []
    if best == last:
        notes.append(f"{stage}: validation loss was still improving at the last epoch ({last}, "
                     f"{fmt(best_loss)}): more epochs may help.")
    elif best == int(epochs.min()):
        notes.append(f"{stage}: validation loss never went below its starting value "
                     f"{fmt(best_loss)} (epoch {best}, before any update) in {last} epochs: "
                     "training did not improve on the starting weights, which are kept.")
    else:
        why = (f"early stopping ended training at epoch {last}" if
               metrics.get("stopped") == "early_stopping" else f"training ran to epoch {last}")
        notes.append(f"{stage}: validation loss stopped improving at epoch {best} "
                     f"({fmt(best_loss)}); {why}, {last - best} epochs later.")
    trained = history.dropna(subset=["train_loss"]) if "train_loss" in history else history[:0]
    if len(trained) >= 2:
        first_loss, last_loss = trained["train_loss"].iloc[0], trained["train_loss"].iloc[-1]
        sentence = (f"{stage}: training loss went from {fmt(first_loss)} (epoch "
                    f"{int(trained['epoch'].iloc[0])}) to {fmt(last_loss)} (epoch "
                    f"{int(trained['epoch'].iloc[-1])})")
        final_val = float(history["val_loss"].iloc[-1])
        if last_loss < first_loss and final_val > best_loss * 1.02:
            sentence += (f" while validation loss rose from {fmt(best_loss)} to {fmt(final_val)}"
                         f" after epoch {best}: the model over-fits the training pairs")
        notes.append(sentence + ".")
    if "val_accuracy_before" in metrics and "val_accuracy" in metrics:
        change = _change(metrics["val_accuracy_before"], metrics["val_accuracy"],
                         "validation pair accuracy")
        notes.append(f"{stage}: training {change} (epoch 0 to the best epoch); at the best "
                     f"epoch precision is {fmt(metrics.get('val_precision'))}, recall "
                     f"{fmt(metrics.get('val_recall'))}, F1 {fmt(metrics.get('val_f1'))}.")
    if {"train_accuracy", "val_accuracy"} <= set(history):
        row = history.loc[epochs == best].iloc[0]
        gap = float(row["train_accuracy"] - row["val_accuracy"])
        if abs(gap) >= 0.05:
            notes.append(f"{stage}: at epoch {best} train accuracy ({fmt(row['train_accuracy'])})"
                         f" is {fmt(abs(gap))} {'above' if gap > 0 else 'below'} validation "
                         f"accuracy ({fmt(row['val_accuracy'])}).")
    if "collapse_alarm" in history:
        alarms = history.loc[history["collapse_alarm"].fillna(0) > 0, "epoch"].astype(int)
        if len(alarms):
            notes.append(f"{stage}: the embedding-collapse alarm was raised at epoch(s) "
                         f"{', '.join(map(str, alarms))} (embeddings nearly identical).")
    return notes


def frozen_vs_unfrozen_observations(frozen: Mapping | None, unfrozen: Mapping | None
                                    ) -> list[str]:
    if not frozen or not unfrozen:
        return []
    notes = []
    if "best_val_loss" in frozen and "best_val_loss" in unfrozen:
        notes.append("Fine-tuning the backbone " + _change(
            frozen["best_val_loss"], unfrozen["best_val_loss"], "the best validation loss")
            + " (frozen to unfrozen).")
    if "val_f1" in frozen and "val_f1" in unfrozen:
        notes.append("Fine-tuning " + _change(frozen["val_f1"], unfrozen["val_f1"],
                                              "validation pair F1") + ".")
    return notes


def lr_changes(history: pd.DataFrame) -> list[tuple[int, float, float]]:
    """(epoch, lr before, lr after) for every epoch whose learning rate differs from the last."""
    if "lr" not in history or history.empty:
        return []
    lr = history["lr"].astype(float).to_numpy()
    epochs = history["epoch"].astype(int).to_numpy()
    return [(int(epochs[i]), float(lr[i - 1]), float(lr[i])) for i in range(1, len(lr))
            if lr[i] != lr[i - 1]]


def lr_observations(stage: str, history: pd.DataFrame | None) -> list[str]:
    """How often the learning rate was reduced, and what validation loss did after each cut."""
    if history is None or "lr" not in history or history.empty:
        return []
    changes = lr_changes(history)
    reductions = [c for c in changes if c[2] < c[1]]
    start = float(history["lr"].iloc[0])
    if not changes:
        return [f"{stage}: the learning rate stayed at {fmt_param(start)} for all "
                f"{int(history['epoch'].max())} epochs (validation loss never stalled long "
                "enough to reduce it)."]
    steps = "; ".join(f"{fmt_param(old)} to {fmt_param(new)} at epoch {epoch}"
                      for epoch, old, new in changes)
    kind = "reduced" if len(reductions) == len(changes) else "changed"
    notes = [f"{stage}: the learning rate was {kind} {_times(len(changes))} ({steps})."]
    epochs = history["epoch"].astype(int)
    loss = history["val_loss"] if "val_loss" in history else None
    for index, (epoch, _, new) in enumerate(changes):
        if loss is None:
            break
        end = changes[index + 1][0] if index + 1 < len(changes) else int(epochs.max()) + 1
        before = loss[epochs < epoch].min()
        after = loss[(epochs >= epoch) & (epochs < end)]
        if after.empty or pd.isna(before):
            continue
        best_after = float(after.min())
        at = int(epochs[after.idxmin()])
        if best_after < before:
            notes.append(f"{stage}: after the change to {fmt_param(new)} at epoch {epoch}, "
                         f"validation loss improved on its previous best {fmt(before)}, reaching "
                         f"{fmt(best_after)} at epoch {at}.")
        else:
            notes.append(f"{stage}: after the change to {fmt_param(new)} at epoch {epoch}, "
                         f"validation loss did not go below its previous best {fmt(before)} "
                         f"(best afterwards {fmt(best_after)}).")
    return notes


def _ci_overlap(a: Mapping, b: Mapping, name: str) -> bool | None:
    keys = (f"{name}_ci_low", f"{name}_ci_high")
    if not all(k in a and k in b for k in keys) or None in (a[keys[0]], b[keys[0]]):
        return None
    return a[keys[0]] <= b[keys[1]] and b[keys[0]] <= a[keys[1]]


def evaluation_observations(scores: Mapping[str, Mapping] | None) -> list[str]:
    """Baseline vs frozen vs unfrozen, from metrics/evaluate.json."""
    if not scores:
        return []
    notes = []
    steps = (("baseline", "frozen", "training the head on the frozen backbone"),
             ("frozen", "unfrozen", "fine-tuning the backbone"))
    for name, label in (("map", "test mAP"), ("precision_at_1", "test P@1")):
        for old, new, what in steps:
            a, b = scores.get(old, {}), scores.get(new, {})
            if _number(a.get(name)) is None or _number(b.get(name)) is None:
                continue
            same = fmt(a[name]) == fmt(b[name])
            sentence = (f"{what[0].upper()}{what[1:]} {_change(a[name], b[name], label)} "
                        f"({old} to {new}" + ("" if same else f", {b[name] - a[name]:+.3f}") + ")")
            overlap = _ci_overlap(a, b, name) if fmt(a[name]) != fmt(b[name]) else None
            if overlap is not None:
                sentence += ("; the 95% confidence intervals overlap, so the test set cannot "
                             "tell them apart" if overlap else
                             "; the 95% confidence intervals do not overlap")
            notes.append(sentence + ".")
    aucs = {m: scores[m]["roc_auc"] for m in MODELS if _number(scores.get(m, {}).get("roc_auc"))
            is not None}
    if aucs:
        top = fmt(max(aucs.values()))
        best = [m for m, v in aucs.items() if fmt(v) == top]
        sentence = "ROC AUC of pair verification: " + ", ".join(
            f"{m} {fmt(v)}" for m, v in aucs.items()) + (
            "; all equal" if len(best) == len(aucs) > 1 else f"; the best is {' and '.join(best)}")
        if max(aucs.values()) < 0.6:
            sentence += (", within 0.1 of chance (0.5): same-class test pairs are hardly closer "
                         "than different-class pairs")
        notes.append(sentence + ".")
    for model in MODELS:
        s = scores.get(model, {})
        counts = [s.get(k) for k in ("tp", "tn", "fp", "fn")]
        if any(_number(c) is None for c in counts) or not sum(counts):
            continue
        said_same = (counts[0] + counts[2]) / sum(counts)
        if said_same > 0.9 or said_same < 0.1:
            notes.append(f"At its validation-chosen threshold ({fmt(s.get('threshold'))}) the "
                         f"{model} model calls {100 * said_same:.1f}% of test pairs 'same class', "
                         f"so its pair accuracy ({fmt(s.get('accuracy'))}) is close to that of "
                         "a constant answer.")
    maps = {m: scores[m]["map"] for m in MODELS if _number(scores.get(m, {}).get("map"))
            is not None}
    if maps:
        best = max(maps, key=maps.get)
        worst = scores[best].get("worst_classes") or []
        if worst:
            notes.append(f"The best model by test mAP is {best} ({fmt(maps[best])}); its "
                         f"hardest classes (lowest P@1) are {', '.join(map(str, worst[:5]))}.")
    return notes


def embedding_observations(metrics: Mapping | None) -> list[str]:
    if not metrics:
        return []
    scores = {m: metrics[m].get("silhouette") for m in MODELS if isinstance(metrics.get(m), dict)}
    scores = {m: v for m, v in scores.items() if _number(v) is not None}
    if not scores:
        return []
    notes = ["Silhouette score of the test embeddings (-1..1, higher: classes better separated; "
             "computed in the full embedding space): " + ", ".join(
                 f"{m} {fmt(v)}" for m, v in scores.items()) + "."]
    if "baseline" in scores:
        for model in ("frozen", "unfrozen"):
            if model in scores:
                change = _change(scores["baseline"], scores[model], "the silhouette")
                notes.append(f"Training {change} (baseline to {model}).")
    if max(scores.values()) < 0.1:
        notes.append(f"All silhouettes are below 0.1 (best {fmt(max(scores.values()))}): the "
                     "classes still overlap in the embedding space.")
    return notes


def gradcam_observations(metrics: Mapping | None) -> list[str]:
    if not metrics:
        return []
    if not metrics.get("iou_computed", False):
        return [metrics.get("reason", "IoU was not computed (no ground-truth masks).")]
    baselines = {name: v.get("mean_iou") for name, v in (metrics.get("baselines") or {}).items()}
    baselines = {k: v for k, v in baselines.items() if _number(v) is not None}
    strongest = max(baselines, key=baselines.get) if baselines else None
    notes = []
    best_iou: dict[str, float] = {}
    for model in MODELS:
        methods = metrics.get(model)
        if not isinstance(methods, dict) or not methods:
            continue
        chosen = (metrics.get("best_method") or {}).get(model)
        if chosen not in methods:
            chosen = max(methods, key=lambda m: methods[m].get("val_mean_iou") or -1)
        iou = _number(methods[chosen].get("mean_iou"))
        if iou is None:
            continue
        best_iou[model] = iou
        sentence = (f"{model}: {chosen} (chosen on validation, binarised by "
                    f"{methods[chosen].get('binarization')}) reaches a test mean IoU of "
                    f"{fmt(iou)}")
        if strongest is not None:
            margin = iou - baselines[strongest]
            sentence += (f", {'above' if margin > 0 else 'below'} the {strongest} baseline "
                         f"({fmt(baselines[strongest])}) by {fmt(abs(margin))}")
        notes.append(sentence + ".")
    if "frozen" in best_iou and "unfrozen" in best_iou:
        notes.append("Fine-tuning " + _change(best_iou["frozen"], best_iou["unfrozen"],
                                              "the best saliency IoU") + ".")
    if "baseline" in best_iou and "unfrozen" in best_iou:
        notes.append("Training end to end (baseline to unfrozen) " + _change(
            best_iou["baseline"], best_iou["unfrozen"], "the best saliency IoU") + ".")
    return notes


def experiments_observations(table: pd.DataFrame | None) -> list[str]:
    if table is None or len(table) < 2 or "unfrozen mAP" not in table:
        return []
    ranked = table.dropna(subset=["unfrozen mAP"])
    if len(ranked) < 2:
        return []
    fixed = {"run", "commit", *EXPERIMENT_METRICS.values()}
    varying = [c for c in table.columns if c not in fixed]
    top = ranked.iloc[0]
    setting = ", ".join(f"{c}={top[c]}" for c in varying)
    notes = [f"Across {len(ranked)} pipeline runs recorded in MLflow, the highest unfrozen test "
             f"mAP, {fmt(float(top['unfrozen mAP']))}, came from the run {top['run']}"
             + (f" with {setting}" if setting else "") + "; the lowest was "
             f"{fmt(float(ranked['unfrozen mAP'].min()))}."]
    if len(varying) == 1:
        column = varying[0]
        by_value = ranked.groupby(column, sort=False)["unfrozen mAP"].max()
        ordered = sorted(by_value.items(), key=lambda kv: _sort_key(kv[0]))
        notes.append(f"Unfrozen test mAP by {column}: " + "; ".join(
            f"{column}={value}: {fmt(float(m))}" for value, m in ordered) + ".")
    return notes


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _sort_key(value: Any) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def observations(inputs: Inputs) -> dict[str, list[str]]:
    """Section id -> its observations, every one computed from the numbers."""
    m, h = inputs.metrics, inputs.histories
    training = [note for stage in TRAIN_STAGES
                for note in training_observations(stage, h.get(stage), m.get(stage))]
    training += frozen_vs_unfrozen_observations(m.get("train_frozen"), m.get("train_unfrozen"))
    found = {
        "data": data_observations(m.get("prepare"), m.get("split"), inputs.excluded),
        "normalization": normalization_observations(m.get("verify_normalization")),
        "training": training,
        "lr_schedule": [note for stage in TRAIN_STAGES
                        for note in lr_observations(stage, h.get(stage))],
        "comparison": evaluation_observations(m.get("evaluate")),
        "embeddings": embedding_observations(m.get("embed_viz")),
        "gradcam": gradcam_observations(m.get("gradcam_segment")),
        "experiments": experiments_observations(inputs.experiments),
    }
    summary = []
    for section, count in (("comparison", 2), ("training", 1), ("lr_schedule", 1),
                           ("embeddings", 2), ("gradcam", 1), ("experiments", 1)):
        notes = found[section]
        if section == "training":  # where validation loss stopped improving; frozen vs unfrozen
            notes = [n for n in notes if "improving" in n or "never went below" in n
                     or n.startswith("Fine-tuning")]
        elif section == "lr_schedule":
            notes = [n for n in notes if "learning rate" in n]
        else:
            notes = notes[:count]
        summary += notes
    found["summary"] = summary
    return found


# --- tables -----------------------------------------------------------------------------------


def model_table(scores: Mapping[str, Mapping], names: Sequence[str]) -> Table:
    """Rows: metrics; columns: baseline, frozen, unfrozen (with 95% CIs) and the best model."""
    models = [m for m in MODELS if m in scores]
    rows = []
    for name in names:
        values = {m: _number(scores[m].get(name)) for m in models}
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
                     *(_with_ci(scores[m], name) for m in models), best))
    return Table(("metric", "better", *models, "best"), tuple(rows))


def _other_metrics(scores: Mapping[str, Mapping]) -> list[str]:
    known = set(VERIFICATION_METRICS) | set(RETRIEVAL_METRICS) | NOT_COMPARED
    names: set[str] = set()
    for values in scores.values():
        if isinstance(values, dict):
            names |= {k for k, v in values.items() if _number(v) is not None and k not in known
                      and not re.search(r"_ci_(low|high)$", k)}
    return sorted(names)


def experiments_table(runs: Sequence[Mapping[str, Any]], current_run_id: str | None = None,
                      max_rows: int = 20, max_params: int = 6) -> pd.DataFrame:
    """One row per pipeline run with test metrics (from MLflow parent runs, newest first), the
    params that differ between them and the headline metrics, best unfrozen mAP first."""
    runs = [r for r in runs if "evaluate.unfrozen.map" in (r.get("metrics") or {})][:max_rows]
    if not runs:
        return pd.DataFrame(columns=["run", "commit", *EXPERIMENT_METRICS.values()])
    keys = sorted({k for r in runs for k in (r.get("params") or {})})
    varying = [k for k in keys if len({str((r.get("params") or {}).get(k)) for r in runs}) > 1]
    varying = sorted(varying, key=lambda k: (k != "lr", k))[:max_params]
    rows = []
    for r in runs:
        name = r.get("dvc_experiment") or r.get("name") or r.get("run_id", "")
        if r.get("run_id") == current_run_id:
            name = f"{name} (this report)"
        rows.append({"run": name, "commit": str(r.get("git_commit", ""))[:8],
                     **{k: _short(str((r.get("params") or {}).get(k, ""))) for k in varying},
                     **{label: r["metrics"].get(key) for key, label in EXPERIMENT_METRICS.items()}})
    table = pd.DataFrame(rows)
    return table.sort_values("unfrozen mAP", ascending=False, kind="stable").reset_index(drop=True)


# --- sections ---------------------------------------------------------------------------------


def _missing_stage(stage: str) -> Missing:
    return Missing(f"The {stage} stage has not produced its outputs yet (metrics/{stage}.json "
                   f"is missing): run `dvc repro {stage}`.")


def _table_from_frame(frame: pd.DataFrame, caption: str = "") -> Table:
    rows = tuple(tuple(fmt(v.item() if hasattr(v, "item") else v) for v in row)
                 for row in frame.itertuples(index=False))
    return Table(tuple(map(str, frame.columns)), rows, caption)


def _data_blocks(inputs: Inputs) -> list[Block]:
    prepare, split = inputs.metrics.get("prepare"), inputs.metrics.get("split")
    blocks: list[Block] = []
    if prepare is None:
        blocks.append(_missing_stage("prepare"))
    else:
        blocks.append(Table(("images", "classes", "smallest class", "largest class",
                             "excluded files", "images with mask"),
                            ((fmt(prepare.get("images")), fmt(prepare.get("classes")),
                              fmt(prepare.get("min_class_size")),
                              fmt(prepare.get("max_class_size")), fmt(prepare.get("excluded")),
                              fmt(prepare.get("images_with_mask"))),), "The dataset"))
    if split is None:
        blocks.append(_missing_stage("split"))
    else:
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
        blocks.append(_table_from_frame(shown, caption))
    excluded = inputs.excluded
    if excluded is not None and len(excluded):
        blocks.append(_table_from_frame(excluded.head(50), "Excluded files" + (
            f" (first 50 of {len(excluded)})" if len(excluded) > 50 else "")))
    elif prepare and prepare.get("excluded_files"):
        files = prepare["excluded_files"]
        blocks.append(Bullets(tuple(map(str, files[:50])), "Excluded files"))
    return blocks


def _normalization_blocks(inputs: Inputs) -> list[Block]:
    metrics = inputs.metrics.get("verify_normalization")
    if metrics is None:
        return [_missing_stage("verify_normalization")]
    rows = tuple((channel, *(fmt(metrics.get(f"{kind}_{channel.lower()}")) for kind in
                             ("raw_mean", "raw_std", "normalized_mean", "normalized_std")))
                 for channel in ("R", "G", "B"))
    return [Table(("channel", "mean before", "std before", "mean after", "std after"), rows,
                  f"Per-channel statistics of {metrics.get('images')} training images at "
                  f"{metrics.get('image_size')} px (after: the model's input)")]


def _training_blocks(inputs: Inputs) -> list[Block]:
    stages = [s for s in TRAIN_STAGES if s in inputs.metrics]
    blocks: list[Block] = [_missing_stage(s) for s in TRAIN_STAGES if s not in inputs.metrics]
    if not stages:
        return blocks
    names = ("best_epoch", "best_val_loss", "epochs_run", "stopped", "lr_reductions",
             "val_accuracy_before", "val_accuracy", "val_precision", "val_recall",
             "val_f1_before", "val_f1", "threshold")
    rows = tuple((name, *(fmt(inputs.metrics[s].get(name)) for s in stages)) for name in names
                 if any(name in inputs.metrics[s] for s in stages))
    blocks.insert(0, Table(("metric (validation)", *stages), rows,
                           "Training summary (the best epoch is the one with the lowest "
                           "validation loss; its weights are kept)"))
    return blocks


def _lr_blocks(inputs: Inputs) -> list[Block]:
    rows = []
    for stage, history in inputs.histories.items():
        changes = lr_changes(history)
        if "lr" in history and len(history):
            rows.append((stage, fmt_param(float(history["lr"].iloc[0])),
                         "; ".join(f"epoch {e}: {fmt_param(old)} to {fmt_param(new)}"
                                   for e, old, new in changes) or "none",
                         fmt_param(float(history["lr"].iloc[-1]))))
    blocks: list[Block] = []
    if rows:
        factor, patience = inputs.params.get("train.lr_factor"), inputs.params.get(
            "train.lr_patience")
        caption = "Learning rate per training stage"
        if factor is not None:
            caption += (f" (ReduceLROnPlateau: x{fmt_param(factor)} after {patience} "
                        f"epoch{'' if patience == 1 else 's'} without a lower validation loss)")
        blocks.append(Table(("stage", "initial lr", "changes", "final lr"), tuple(rows),
                            caption))
    else:
        blocks.append(Missing("No training history found (plots/train_*/history.csv): run "
                              "`dvc repro train_unfrozen`."))
    return blocks


def _comparison_blocks(inputs: Inputs) -> list[Block]:
    scores = inputs.metrics.get("evaluate")
    if scores is None:
        return [_missing_stage("evaluate")]
    scores = {m: v for m, v in scores.items() if m in MODELS and isinstance(v, dict)}
    blocks: list[Block] = [
        Text("Baseline: the backbone before any training (its pooled descriptor); frozen: the "
             "head trained on the frozen backbone; unfrozen: the whole network fine-tuned. "
             "Square brackets give 95% bootstrap confidence intervals."),
        _caption(model_table(scores, VERIFICATION_METRICS), "Pair verification on the test "
                 "pairs (threshold chosen on validation pairs)"),
        _caption(model_table(scores, RETRIEVAL_METRICS + tuple(_other_metrics(scores))),
                 "Retrieval: test queries against the gallery")]
    any_model = next(iter(scores.values()), {})
    if "n_queries" in any_model:
        blocks.append(Text(f"{any_model['n_queries']} queries, ranked against "
                           f"{any_model.get('ranks')} gallery images each; "
                           + ", ".join(f"{m}: {scores[m].get('embedding_dim')}-d"
                                       for m in scores) + " embeddings."))
    return blocks


def _caption(table: Table, caption: str) -> Table:
    return Table(table.header, table.rows, caption)


def _embedding_blocks(inputs: Inputs) -> list[Block]:
    metrics = inputs.metrics.get("embed_viz")
    if metrics is None:
        return [_missing_stage("embed_viz")]
    rows = tuple((m, fmt(metrics[m].get("embedding_dim")), fmt(metrics[m].get("silhouette")))
                 for m in MODELS if isinstance(metrics.get(m), dict))
    perplexity = metrics.get("perplexity_used", metrics.get("perplexity"))
    return [Table(("model", "dimensions", "silhouette"), rows,
                  f"Silhouette scores of {metrics.get('points')} test embeddings "
                  f"({metrics.get('classes')} classes); t-SNE perplexity {fmt_param(perplexity)}")]


def _gradcam_blocks(inputs: Inputs) -> list[Block]:
    metrics = inputs.metrics.get("gradcam_segment")
    if metrics is None:
        return [_missing_stage("gradcam_segment")]
    if not metrics.get("iou_computed", False):
        return [Missing(metrics.get("reason", "IoU was not computed (no ground-truth masks)."))]
    rows = []
    for model in MODELS:
        for method, v in (metrics.get(model) or {}).items():
            rows.append((model, method, str(v.get("binarization", "")),
                         fmt(v.get("val_mean_iou")), fmt(v.get("mean_iou")),
                         fmt(v.get("median_iou")), fmt(v.get("mean_dice"))))
    for name, v in (metrics.get("baselines") or {}).items():
        rows.append(("trivial baseline", name, "", "", fmt(v.get("mean_iou")),
                     fmt(v.get("median_iou")), fmt(v.get("mean_dice"))))
    images = metrics.get("images") or {}
    return [Table(("model", "method", "binarisation (chosen on val)", "val mean IoU",
                   "test mean IoU", "test median IoU", "test mean Dice"), tuple(rows),
                  "Saliency masks against the ground-truth masks" + (
                      f" ({images.get('val')} val, {images.get('test')} test images)"
                      if isinstance(images, dict) and images else ""))]


def _experiment_blocks(inputs: Inputs) -> list[Block]:
    table = inputs.experiments
    if table is None:
        return [Missing("MLflow was not searched for other experiments.")]
    if len(table) < 2:
        return [Text("Only one pipeline run with test metrics is recorded in MLflow. Run "
                     "experiments (e.g. `dvc exp run -S lr=0.0003`) and `dvc repro report` "
                     "to compare them here.")]
    return [_table_from_frame(table, "Pipeline runs recorded in MLflow (parameters that differ "
                              "between them; test metrics), best unfrozen mAP first")]


def _configuration_blocks(inputs: Inputs) -> list[Block]:
    run = inputs.run
    blocks: list[Block] = [Table(("item", "value"), (
        ("git commit", run.git_commit), ("DVC experiment", run.dvc_experiment),
        ("MLflow experiment", "retrieval"),
        ("MLflow parent run", run.run_ids.get("pipeline", "n/a"))), "This run")]
    order = {stage: i for i, stage in enumerate((*STAGES, "report"))}
    stage_ids = tuple(sorted(((s, i) for s, i in run.run_ids.items() if s != "pipeline"),
                             key=lambda item: (order.get(item[0], len(order)), item[0])))
    reused = tuple((s, "not re-run in this execution (see an earlier run in MLflow)")
                   for s in STAGES if s in inputs.metrics and s not in run.run_ids)
    if stage_ids or reused:
        blocks.append(Table(("stage", "MLflow run id"), stage_ids + reused,
                            "MLflow runs of the stages"))
    if inputs.params:
        blocks.append(Table(("parameter", "value"), tuple(
            (k, fmt_param(v)) for k, v in sorted(inputs.params.items())),
            "All parameters (params.yaml)"))
    return blocks


def build_sections(inputs: Inputs) -> list[Section]:
    """The report's sections in order, each with its tables, figures and observations.
    Every PNG of `inputs.figures` appears exactly once (unknown ones under their stage's
    section, or under 'Other figures')."""
    notes = observations(inputs)
    content: dict[str, Callable[[Inputs], list[Block]]] = {
        "data": _data_blocks, "normalization": _normalization_blocks,
        "training": _training_blocks, "lr_schedule": _lr_blocks,
        "comparison": _comparison_blocks, "experiments": _experiment_blocks,
        "embeddings": _embedding_blocks, "gradcam": _gradcam_blocks,
        "configuration": _configuration_blocks}
    placed: set[str] = set()
    owner = {stage: sid for sid, (_, stages, _) in SECTIONS.items() for stage in stages}
    leftovers: dict[str, list[str]] = {}
    named = {key for _, _, keys in SECTIONS.values() for key in keys}
    for key in inputs.figures:
        if key not in named:
            leftovers.setdefault(owner.get(key.split("/")[0], "other"), []).append(key)
    sections = []
    for sid, (title, _, keys) in SECTIONS.items():
        blocks: list[Block] = []
        if notes.get(sid):
            blocks.append(Bullets(tuple(notes[sid]),
                                  "Key observations" if sid == "summary" else "Observations"))
        blocks += content.get(sid, lambda _: [])(inputs)
        for key in (*keys, *leftovers.get(sid, [])):
            if key in inputs.figures:
                blocks.append(Figure(key, inputs.figures[key], CAPTIONS.get(
                    key, f"{key.split('/')[0]}: {key.split('/', 1)[1].replace('_', ' ')}")))
                placed.add(key)
            elif key not in OPTIONAL_FIGURES and key.split("/")[0] in inputs.metrics:
                blocks.append(Missing(f"Figure {key}.png was not found in the plots folder."))
        if sid == "other" and not blocks:
            continue
        if sid == "summary" and not blocks:
            blocks.append(Missing("No stage has produced metrics yet: run `dvc repro`."))
        sections.append(Section(sid, title, blocks))
    return sections


def lr_schedule_figure(histories: Mapping[str, pd.DataFrame]) -> Any | None:
    """Learning rate (log) over the train and val losses, per training stage, with the epochs
    where it changed marked; None when no history has a learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s, h in histories.items() if "lr" in h and len(h)]
    if not stages:
        return None
    figure, axes = plt.subplots(2, len(stages), figsize=(6.5 * len(stages), 6), squeeze=False,
                                sharex="col")
    for column, stage in enumerate(stages):
        history = histories[stage]
        top, bottom = axes[0, column], axes[1, column]
        top.step(history["epoch"], history["lr"], where="post", color="tab:purple", marker="o",
                 ms=3)
        top.set(yscale="log", title=f"{stage}: learning rate", ylabel="learning rate")
        for split, style in (("train", "-o"), ("val", "-s")):
            if f"{split}_loss" in history:
                bottom.plot(history["epoch"], history[f"{split}_loss"], style, ms=3,
                            label=f"{split} loss")
        bottom.set(title=f"{stage}: loss", xlabel="epoch", ylabel="loss")
        for epoch, _, _ in lr_changes(history):
            for ax in (top, bottom):
                ax.axvline(epoch, color="grey", linestyle="--", linewidth=1)
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend()
    figure.suptitle("Learning-rate schedule and the losses")
    figure.tight_layout()
    return figure


# --- rendering --------------------------------------------------------------------------------


def _header_lines(run: RunInfo) -> list[str]:
    return [f"DVC experiment: {run.dvc_experiment}", f"git commit: {run.git_commit}"]


def render_markdown(sections: Sequence[Section], run: RunInfo,
                    figure_path: Callable[[Figure], str]) -> str:
    """GitHub-flavoured markdown; `figure_path` gives each figure's relative image path."""
    def inline(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# {TITLE}", "", *[f"{line}  " for line in _header_lines(run)], "", "## Contents",
             ""]
    lines += [f"{i}. [{s.title}](#{s.id})" for i, s in enumerate(sections, 1)]
    figure_number = 0
    for i, section in enumerate(sections, 1):
        lines += ["", f'<a id="{section.id}"></a>', "", f"## {i}. {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [block.text, ""]
            elif isinstance(block, Missing):
                lines += [f"> **Missing:** {block.text}", ""]
            elif isinstance(block, Bullets):
                lines += ([f"**{block.title}**", ""] if block.title else [])
                lines += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
                lines.append("| " + " | ".join(map(inline, block.header)) + " |")
                lines.append("|" + "|".join("---" for _ in block.header) + "|")
                lines += ["| " + " | ".join(map(inline, row)) + " |" for row in block.rows]
                lines.append("")
            elif isinstance(block, Figure):
                figure_number += 1
                lines += [f"![{block.caption}]({figure_path(block)})", "",
                          f"*Figure {figure_number} ({block.key}): {block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.meta { color: #555; }
.table { overflow-x: auto; margin: .5em 0 1.2em; }
table { border-collapse: collapse; font-size: .9em; }
.caption { font-style: italic; margin: 0 0 .3em; }
th, td { border: 1px solid #bbb; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef1f5; overflow-wrap: anywhere; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; color: #444; margin-top: .3em; }
.missing { background: #fff4e0; border-left: 4px solid #e69500; padding: .5em 1em; }
.observations { background: #f2f7ff; border-left: 4px solid #3b78c2; padding: .3em 1em; }
code { background: #f2f2f2; padding: 0 .2em; }
"""


def embedded_image(path: Path, max_png_bytes: int = 400_000, opaque: bool = False
                   ) -> tuple[str, bytes]:
    """(MIME type, bytes) to embed: PNGs over `max_png_bytes` (image grids) become JPEG
    (quality 90), which keeps the HTML and PDF a few MB instead of tens; `opaque` flattens
    transparency onto white (the PDF would otherwise carry a second, mask image per figure)."""
    data = path.read_bytes()
    large = len(data) > max_png_bytes
    if not large and not opaque:
        return "image/png", data
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    buffer = io.BytesIO()
    if large:
        flat.save(buffer, format="JPEG", quality=90)
        return "image/jpeg", buffer.getvalue()
    flat.save(buffer, format="PNG")
    return "image/png", buffer.getvalue()


def _html_inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(sections: Sequence[Section], run: RunInfo) -> str:
    """One self-contained HTML file: the PNGs are embedded as data URIs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(TITLE)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(TITLE)}</h1>",
           '<p class="meta">' + "<br>".join(map(html.escape, _header_lines(run))) + "</p>",
           '<nav><h2>Contents</h2><ol>']
    out += [f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in sections]
    out.append("</ol></nav>")
    figure_number = 0
    for i, section in enumerate(sections, 1):
        out.append(f'<section id="{section.id}"><h2>{i}. {html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                out.append(f"<p>{_html_inline(block.text)}</p>")
            elif isinstance(block, Missing):
                out.append(f'<p class="missing"><b>Missing:</b> {_html_inline(block.text)}</p>')
            elif isinstance(block, Bullets):
                out.append('<div class="observations">' + (
                    f"<h3>{html.escape(block.title)}</h3>" if block.title else "") + "<ul>"
                    + "".join(f"<li>{_html_inline(item)}</li>" for item in block.items)
                    + "</ul></div>")
            elif isinstance(block, Table):
                caption = (f'<p class="caption">{html.escape(block.caption)}</p>'
                           if block.caption else "")
                out.append(f'<div class="table">{caption}<table>'
                           + "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                           + "</tr>" + "".join(
                               "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                               + "</tr>" for row in block.rows) + "</table></div>")
            elif isinstance(block, Figure):
                figure_number += 1
                mime, raw = embedded_image(block.path)
                data = base64.b64encode(raw).decode("ascii")
                out.append(f'<figure data-key="{html.escape(block.key)}">'
                           f'<img src="data:{mime};base64,{data}" '
                           f'alt="{html.escape(block.caption)}">'
                           f"<figcaption>Figure {figure_number} ({html.escape(block.key)}): "
                           f"{html.escape(block.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _pdf_inline(text: str) -> str:
    from xml.sax.saxutils import escape

    return re.sub(r"`([^`]+)`", r'<font face="Courier">\1</font>', escape(text))


def render_pdf(sections: Sequence[Section], run: RunInfo, path: str | Path) -> None:
    """A4 PDF with reportlab: headings (also as PDF bookmarks), tables, figures scaled to the
    page width. `invariant` makes the bytes a function of the content (no creation date)."""
    import io

    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import (
        Image,
        KeepTogether,
        Paragraph,
        SimpleDocTemplate,
        Spacer,
        TableStyle,
    )
    from reportlab.platypus import Table as PdfTable

    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=9.5, leading=12.5)
    small = ParagraphStyle("small", parent=body, fontSize=7.5, leading=9)
    caption = ParagraphStyle("caption", parent=body, fontName="Helvetica-Oblique", fontSize=8.5,
                             leading=11, textColor=colors.HexColor("#444444"))
    h1 = ParagraphStyle("h1", parent=styles["Heading1"], spaceBefore=14, keepWithNext=1)
    missing = ParagraphStyle("missing", parent=body, backColor=colors.HexColor("#fff4e0"),
                             borderPadding=4, textColor=colors.HexColor("#7a4b00"))

    class Document(SimpleDocTemplate):
        def afterFlowable(self, flowable: Any) -> None:  # PDF outline from the headings
            key = getattr(flowable, "_bookmark", None)
            if key:
                self.canv.bookmarkPage(key)
                self.canv.addOutlineEntry(flowable.getPlainText(), key, level=0)

    def page_number(canvas: Any, doc: Any) -> None:
        canvas.setFont("Helvetica", 8)
        canvas.drawRightString(A4[0] - 1.5 * cm, 1 * cm, f"page {doc.page}")

    doc = Document(str(path), pagesize=A4, leftMargin=1.5 * cm, rightMargin=1.5 * cm,
                   topMargin=1.5 * cm, bottomMargin=1.6 * cm, title=TITLE, author="retrieval",
                   invariant=1)
    width, height = doc.width, doc.height
    story: list[Any] = [Paragraph(TITLE, styles["Title"])]
    story += [Paragraph(_pdf_inline(line), body) for line in _header_lines(run)]
    story.append(Spacer(1, 0.4 * cm))
    figure_number = 0
    for i, section in enumerate(sections, 1):
        heading = Paragraph(f"{i}. {_pdf_inline(section.title)}", h1)
        heading._bookmark = section.id
        story.append(heading)
        for block in section.blocks:
            if isinstance(block, Text):
                story.append(Paragraph(_pdf_inline(block.text), body))
            elif isinstance(block, Missing):
                story += [Paragraph("<b>Missing:</b> " + _pdf_inline(block.text), missing),
                          Spacer(1, 0.2 * cm)]
            elif isinstance(block, Bullets):
                if block.title:
                    story.append(Paragraph(f"<b>{_pdf_inline(block.title)}</b>", body))
                story += [Paragraph(_pdf_inline(item), body, bulletText="\u2022")
                          for item in block.items]
                story.append(Spacer(1, 0.2 * cm))
            elif isinstance(block, Table):
                style = small if len(block.header) > 4 else body
                cells = [[Paragraph(f"<b>{_pdf_inline(h)}</b>", style) for h in block.header]]
                cells += [[Paragraph(_pdf_inline(c), style) for c in row] for row in block.rows]
                # Column widths follow the longest cell; headers may wrap between words.
                lengths = [max([max(map(len, block.header[j].split() or [""]))]
                               + [len(r[j]) for r in block.rows]) + 2
                           for j in range(len(block.header))]
                widths = [width * n / sum(lengths) for n in lengths] if sum(lengths) > 90 \
                    else [n * 0.19 * cm * (0.8 if style is small else 1) + 0.3 * cm
                          for n in lengths]
                table = PdfTable(cells, colWidths=widths, repeatRows=1, hAlign="LEFT")
                table.setStyle(TableStyle([
                    ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
                    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eef1f5")),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5)]))
                parts = [Paragraph(_pdf_inline(block.caption), caption)] if block.caption else []
                story += [*parts, table, Spacer(1, 0.35 * cm)]
            elif isinstance(block, Figure):
                figure_number += 1
                image = Image(io.BytesIO(embedded_image(block.path, opaque=True)[1]))
                scale = min(width / image.imageWidth, 0.78 * height / image.imageHeight)
                image.drawWidth, image.drawHeight = (image.imageWidth * scale,
                                                     image.imageHeight * scale)
                story.append(KeepTogether([image, Paragraph(
                    f"Figure {figure_number} ({_pdf_inline(block.key)}): "
                    f"{_pdf_inline(block.caption)}", caption), Spacer(1, 0.4 * cm)]))
    doc.build(story, onFirstPage=page_number, onLaterPages=page_number)
