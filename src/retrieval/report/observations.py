"""The report's sentences, each computed from the numbers (never written by hand).

Every public function here is one *kind* of observation: `(Inputs) -> list[str]`, an empty list
when its inputs are absent. sections.py says which section shows each kind and whether the
summary repeats it, so rewording a sentence here never moves or drops it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from retrieval.report.formatting import change, fmt, fmt_param, number, times
from retrieval.report.inputs import (
    EXPERIMENT_FIXED_COLUMNS,
    HEADLINE,
    HEADLINE_NAME,
    MODELS,
    PARAMETERS_NOT_SHOWN,
    TRAIN_STAGES,
    TRAINED,
    UNTRAINED,
    Inputs,
    lr_changes,
)

# --- data -------------------------------------------------------------------------------------


def dataset(inputs: Inputs) -> list[str]:
    """Size and balance of the dataset, what was excluded, how many images have a mask."""
    prepare = inputs.metrics.get("prepare")
    if not prepare:
        return []
    notes = []
    low, high = prepare.get("min_class_size"), prepare.get("max_class_size")
    balance = (f"; class sizes range from {low} to {high} images"
               + (f" (the largest is {high / low:.1f}x the smallest)" if low and high != low
                  else " (balanced)") if low is not None and high is not None else "")
    notes.append(f"The dataset has {prepare.get('images')} images in "
                 f"{prepare.get('classes')} classes{balance}.")
    count, excluded = prepare.get("excluded", 0), inputs.excluded
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
    return notes


def split(inputs: Inputs) -> list[str]:
    """How the split divided images and classes."""
    split = inputs.metrics.get("split")
    if not split:
        return []
    sizes = [split.get(f"{name}_images", 0) for name in ("train", "val", "test")]
    total = sum(sizes) or 1
    notes = [f"The {split.get('mode')} split puts {sizes[0]} / {sizes[1]} / {sizes[2]} "
             f"images in train / val / test ({100 * sizes[0] / total:.1f} / "
             f"{100 * sizes[1] / total:.1f} / {100 * sizes[2] / total:.1f} %), with "
             f"{split.get('train_classes')} / {split.get('val_classes')} / "
             f"{split.get('test_classes')} classes."]
    if split.get("small_classes"):
        notes.append(f"{split['small_classes']} classes had fewer than 3 images "
                     f"(rule: {split.get('small_class_rule')}).")
    return notes


def normalization(inputs: Inputs) -> list[str]:
    """Whether the normalised channels have mean ~0 and std ~1, and the raw means."""
    metrics = inputs.metrics.get("verify_normalization")
    if not metrics:
        return []
    means = {c: metrics.get(f"normalized_mean_{c}") for c in "rgb"}
    stds = {c: metrics.get(f"normalized_std_{c}") for c in "rgb"}
    if any(v is None for v in (*means.values(), *stds.values())):
        return []
    worst = max(means, key=lambda c: abs(means[c]))
    mean_tol = metrics.get("mean_tolerance", math.inf)
    std_tol = metrics.get("std_tolerance", math.inf)
    ok = abs(means[worst]) <= mean_tol and all(abs(s - 1) <= std_tol for s in stds.values())
    return [f"After normalisation the channel means are {fmt(means['r'])}, {fmt(means['g'])}, "
            f"{fmt(means['b'])} (R, G, B; largest |mean| {fmt(abs(means[worst]))} in "
            f"{worst.upper()}, tolerance {fmt(mean_tol)}) and the standard deviations "
            f"{fmt(min(stds.values()))} to {fmt(max(stds.values()))} (tolerance 1 +/- "
            f"{fmt(std_tol)}): the check " + ("passed." if ok else "FAILED."),
            f"Before normalisation the pixel means were {fmt(metrics.get('raw_mean_r'))}, "
            f"{fmt(metrics.get('raw_mean_g'))}, {fmt(metrics.get('raw_mean_b'))} on the 0..1 "
            f"scale ({metrics.get('images')} training images)."]


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curve:
    """One training stage's history with its best epoch (lowest validation loss)."""

    stage: str
    history: pd.DataFrame
    metrics: Mapping[str, Any]
    epochs: pd.Series  # (E,) int
    best: int
    best_loss: float
    last: int


def _curves(inputs: Inputs) -> Iterator[_Curve]:
    for stage in TRAIN_STAGES:
        history = inputs.histories.get(stage)
        if history is None or "val_loss" not in history or history["val_loss"].isna().all():
            continue
        metrics = inputs.metrics.get(stage) or {}
        epochs = history["epoch"].astype(int)
        best = metrics.get("best_epoch")
        if best not in set(epochs):  # the history is the source of truth for the curves
            best = int(epochs[history["val_loss"].idxmin()])
        best_loss = float(history.loc[epochs == best, "val_loss"].iloc[0])
        yield _Curve(stage, history, metrics, epochs, best, best_loss, int(epochs.max()))


def stopping(inputs: Inputs) -> list[str]:
    """Where validation loss stopped improving, and why training stopped."""
    notes = []
    for c in _curves(inputs):
        if c.best == c.last:
            notes.append(f"{c.stage}: validation loss was still improving at the last epoch "
                         f"({c.last}, {fmt(c.best_loss)}): more epochs may help.")
        elif c.best == int(c.epochs.min()):
            notes.append(f"{c.stage}: validation loss never went below its starting value "
                         f"{fmt(c.best_loss)} (epoch {c.best}, before any update) in {c.last} "
                         "epochs: training did not improve on the starting weights, which are "
                         "kept.")
        else:
            why = (f"early stopping ended training at epoch {c.last}"
                   if c.metrics.get("stopped") == "early_stopping"
                   else f"training ran to epoch {c.last}")
            notes.append(f"{c.stage}: validation loss stopped improving at epoch {c.best} "
                         f"({fmt(c.best_loss)}); {why}, {c.last - c.best} epochs later.")
    return notes


def loss_trend(inputs: Inputs) -> list[str]:
    """What the training loss did, and whether validation loss rose meanwhile (over-fitting)."""
    notes = []
    for c in _curves(inputs):
        history = c.history
        trained = (history.dropna(subset=["train_loss"]) if "train_loss" in history
                   else history[:0])
        if len(trained) < 2:
            continue
        first_loss, last_loss = trained["train_loss"].iloc[0], trained["train_loss"].iloc[-1]
        sentence = (f"{c.stage}: training loss went from {fmt(first_loss)} (epoch "
                    f"{int(trained['epoch'].iloc[0])}) to {fmt(last_loss)} (epoch "
                    f"{int(trained['epoch'].iloc[-1])})")
        final_val = float(history["val_loss"].iloc[-1])
        if last_loss < first_loss and final_val > c.best_loss * 1.02:
            sentence += (f" while validation loss rose from {fmt(c.best_loss)} to "
                         f"{fmt(final_val)} after epoch {c.best}: the model over-fits the "
                         "training pairs")
        notes.append(sentence + ".")
    return notes


def accuracy_change(inputs: Inputs) -> list[str]:
    """Validation pair accuracy before and after training, and the best epoch's P/R/F1."""
    notes = []
    for c in _curves(inputs):
        m = c.metrics
        if "val_accuracy_before" in m and "val_accuracy" in m:
            what = change(m["val_accuracy_before"], m["val_accuracy"], "validation pair accuracy")
            notes.append(f"{c.stage}: training {what} (epoch 0 to the best epoch); at the best "
                         f"epoch precision is {fmt(m.get('val_precision'))}, recall "
                         f"{fmt(m.get('val_recall'))}, F1 {fmt(m.get('val_f1'))}.")
    return notes


def accuracy_gap(inputs: Inputs) -> list[str]:
    """A train/validation accuracy gap of 0.05 or more at the best epoch."""
    notes = []
    for c in _curves(inputs):
        if not {"train_accuracy", "val_accuracy"} <= set(c.history):
            continue
        row = c.history.loc[c.epochs == c.best].iloc[0]
        gap = float(row["train_accuracy"] - row["val_accuracy"])
        if abs(gap) >= 0.05:
            notes.append(f"{c.stage}: at epoch {c.best} train accuracy "
                         f"({fmt(row['train_accuracy'])}) is {fmt(abs(gap))} "
                         f"{'above' if gap > 0 else 'below'} validation accuracy "
                         f"({fmt(row['val_accuracy'])}).")
    return notes


def collapse(inputs: Inputs) -> list[str]:
    """The epochs where the embedding-collapse alarm went off."""
    notes = []
    for c in _curves(inputs):
        if "collapse_alarm" not in c.history:
            continue
        alarms = c.history.loc[c.history["collapse_alarm"].fillna(0) > 0, "epoch"].astype(int)
        if len(alarms):
            notes.append(f"{c.stage}: the embedding-collapse alarm was raised at epoch(s) "
                         f"{', '.join(map(str, alarms))} (embeddings nearly identical).")
    return notes


def frozen_vs_unfrozen(inputs: Inputs) -> list[str]:
    """What fine-tuning the backbone did to the best validation loss and F1."""
    frozen, unfrozen = inputs.metrics.get("train_frozen"), inputs.metrics.get("train_unfrozen")
    if not frozen or not unfrozen:
        return []
    notes = []
    if "best_val_loss" in frozen and "best_val_loss" in unfrozen:
        notes.append("Fine-tuning the backbone " + change(
            frozen["best_val_loss"], unfrozen["best_val_loss"], "the best validation loss")
            + " (frozen to unfrozen).")
    if "val_f1" in frozen and "val_f1" in unfrozen:
        notes.append("Fine-tuning " + change(frozen["val_f1"], unfrozen["val_f1"],
                                             "validation pair F1") + ".")
    return notes


# --- learning rate ----------------------------------------------------------------------------


def _histories_with_lr(inputs: Inputs) -> Iterator[tuple[str, pd.DataFrame]]:
    for stage in TRAIN_STAGES:
        history = inputs.histories.get(stage)
        if history is not None and "lr" in history and not history.empty:
            yield stage, history


def lr_schedule(inputs: Inputs) -> list[str]:
    """How often each stage's learning rate was changed, from what to what."""
    notes = []
    for stage, history in _histories_with_lr(inputs):
        changes = lr_changes(history)
        if not changes:
            notes.append(f"{stage}: the learning rate stayed at "
                         f"{fmt_param(float(history['lr'].iloc[0]))} for all "
                         f"{int(history['epoch'].max())} epochs (validation loss never stalled "
                         "long enough to reduce it).")
            continue
        steps = "; ".join(f"{fmt_param(old)} to {fmt_param(new)} at epoch {epoch}"
                          for epoch, old, new in changes)
        kind = "reduced" if all(new < old for _, old, new in changes) else "changed"
        notes.append(f"{stage}: the learning rate was {kind} {times(len(changes))} ({steps}).")
    return notes


def lr_effects(inputs: Inputs) -> list[str]:
    """After each change of the learning rate: did validation loss beat its previous best?"""
    notes = []
    for stage, history in _histories_with_lr(inputs):
        if "val_loss" not in history:
            continue
        changes, epochs, loss = lr_changes(history), history["epoch"].astype(int), \
            history["val_loss"]
        for index, (epoch, _, new) in enumerate(changes):
            end = changes[index + 1][0] if index + 1 < len(changes) else int(epochs.max()) + 1
            before = loss[epochs < epoch].min()
            after = loss[(epochs >= epoch) & (epochs < end)]
            if after.empty or pd.isna(before):
                continue
            best_after, at = float(after.min()), int(epochs[after.idxmin()])
            if best_after < before:
                notes.append(f"{stage}: after the change to {fmt_param(new)} at epoch {epoch}, "
                             f"validation loss improved on its previous best {fmt(before)}, "
                             f"reaching {fmt(best_after)} at epoch {at}.")
            else:
                notes.append(f"{stage}: after the change to {fmt_param(new)} at epoch {epoch}, "
                             f"validation loss did not go below its previous best "
                             f"{fmt(before)} (best afterwards {fmt(best_after)}).")
    return notes


# --- test set: baseline vs frozen vs unfrozen -------------------------------------------------


def _scores(inputs: Inputs) -> dict[str, Mapping]:
    return inputs.metrics.get("evaluate") or {}


def _ci_overlap(a: Mapping, b: Mapping, name: str) -> bool | None:
    keys = (f"{name}_ci_low", f"{name}_ci_high")
    if not all(k in a and k in b for k in keys) or None in (a[keys[0]], b[keys[0]]):
        return None
    return a[keys[0]] <= b[keys[1]] and b[keys[0]] <= a[keys[1]]


def _steps(scores: Mapping[str, Mapping], name: str, label: str) -> list[str]:
    """Baseline -> frozen -> unfrozen on one metric, with whether the 95% CIs overlap."""
    notes = []
    for old, new, what in (("baseline", "frozen", "training the head on the frozen backbone"),
                           ("frozen", "unfrozen", "fine-tuning the backbone")):
        a, b = scores.get(old, {}), scores.get(new, {})
        if number(a.get(name)) is None or number(b.get(name)) is None:
            continue
        same = fmt(a[name]) == fmt(b[name])
        sentence = (f"{what[0].upper()}{what[1:]} {change(a[name], b[name], label)} "
                    f"({old} to {new}" + ("" if same else f", {b[name] - a[name]:+.3f}") + ")")
        overlap = _ci_overlap(a, b, name) if not same else None
        if overlap is not None:
            sentence += ("; the 95% confidence intervals overlap, so the test set cannot "
                         "tell them apart" if overlap else
                         "; the 95% confidence intervals do not overlap")
        notes.append(sentence + ".")
    return notes


def map_steps(inputs: Inputs) -> list[str]:
    """What each training step did to test mAP."""
    return _steps(_scores(inputs), "map", "test mAP")


def precision_at_1_steps(inputs: Inputs) -> list[str]:
    """What each training step did to test P@1."""
    return _steps(_scores(inputs), "precision_at_1", "test P@1")


def roc_auc(inputs: Inputs) -> list[str]:
    """The models' ROC AUC of pair verification, the best, and whether it is near chance."""
    scores = _scores(inputs)
    aucs = {m: scores[m]["roc_auc"] for m in MODELS
            if number(scores.get(m, {}).get("roc_auc")) is not None}
    if not aucs:
        return []
    top = fmt(max(aucs.values()))
    best = [m for m, v in aucs.items() if fmt(v) == top]
    sentence = "ROC AUC of pair verification: " + ", ".join(
        f"{m} {fmt(v)}" for m, v in aucs.items()) + (
        "; all equal" if len(best) == len(aucs) > 1 else f"; the best is {' and '.join(best)}")
    if max(aucs.values()) < 0.6:
        sentence += (", within 0.1 of chance (0.5): same-class test pairs are hardly closer "
                     "than different-class pairs")
    return [sentence + "."]


def constant_answer(inputs: Inputs) -> list[str]:
    """A model whose threshold calls over 90% (or under 10%) of test pairs 'same class'."""
    scores, notes = _scores(inputs), []
    for model in MODELS:
        s = scores.get(model, {})
        counts = [s.get(k) for k in ("tp", "tn", "fp", "fn")]
        if any(number(c) is None for c in counts) or not sum(counts):
            continue
        said_same = (counts[0] + counts[2]) / sum(counts)
        if said_same > 0.9 or said_same < 0.1:
            notes.append(f"At its validation-chosen threshold ({fmt(s.get('threshold'))}) the "
                         f"{model} model calls {100 * said_same:.1f}% of test pairs 'same class', "
                         f"so its pair accuracy ({fmt(s.get('accuracy'))}) is close to that of "
                         "a constant answer.")
    return notes


def hardest_classes(inputs: Inputs) -> list[str]:
    """The best model by test mAP and its classes with the lowest P@1."""
    scores = _scores(inputs)
    maps = {m: scores[m]["map"] for m in MODELS
            if number(scores.get(m, {}).get("map")) is not None}
    if not maps:
        return []
    best = max(maps, key=maps.get)
    worst = scores[best].get("worst_classes") or []
    if not worst:
        return []
    return [f"The best model by test mAP is {best} ({fmt(maps[best])}); its hardest classes "
            f"(lowest P@1) are {', '.join(map(str, worst[:5]))}."]


def _cosine(inputs: Inputs) -> dict[str, Mapping]:
    """model -> its evaluate.json entry, for the models with a cosine gap (in MODELS order)."""
    scores = _scores(inputs)
    return {m: scores[m] for m in MODELS if isinstance(scores.get(m), dict)
            and number(scores[m].get("cosine_gap")) is not None}


def similarity_gap(inputs: Inputs) -> list[str]:
    """What training did to the gap between same-class and different-class cosine similarity
    of the test pairs (the untrained reference to each trained model), and every model whose
    gap is not positive."""
    found = _cosine(inputs)
    if not found:
        return []
    what = "the gap between same-class and different-class cosine similarity"
    reference = next((m for m in UNTRAINED if m in found), None)
    trained = [m for m in TRAINED if m in found]
    notes = []
    if reference is not None and trained:
        old = found[reference]
        for model in trained:
            new = found[model]
            if fmt(old["cosine_gap"]) == fmt(new["cosine_gap"]):
                verb = f"left {what} unchanged at {fmt(new['cosine_gap'])}"
            else:
                verb = (f"{'widened' if new['cosine_gap'] > old['cosine_gap'] else 'narrowed'} "
                        f"{what} from {fmt(old['cosine_gap'])} ({reference}) to "
                        f"{fmt(new['cosine_gap'])} ({model})")
            notes.append(f"Training {verb}: same-class mean "
                         f"{fmt(old.get('cosine_same_mean'))} to "
                         f"{fmt(new.get('cosine_same_mean'))}, different-class mean "
                         f"{fmt(old.get('cosine_different_mean'))} to "
                         f"{fmt(new.get('cosine_different_mean'))}.")
    else:
        absent = "no trained model" if reference is not None else \
            f"no untrained {' or '.join(UNTRAINED) or 'reference'} model"
        notes.append(f"{what[0].upper()}{what[1:]} of the test pairs: " + ", ".join(
            f"{m} {fmt(v['cosine_gap'])}" for m, v in found.items())
            + f" ({absent} to compare with).")
    for model, values in found.items():
        if values["cosine_gap"] <= 0:
            notes.append(f"The {model} model's different-class test pairs are on average at "
                         f"least as similar as its same-class pairs (gap "
                         f"{fmt(values['cosine_gap'])}): its cosine similarity does not "
                         "separate the classes.")
    return notes


# --- embeddings -------------------------------------------------------------------------------


def _silhouettes(inputs: Inputs) -> dict[str, float]:
    metrics = inputs.metrics.get("embed_viz") or {}
    scores = {m: metrics[m].get("silhouette") for m in MODELS if isinstance(metrics.get(m), dict)}
    return {m: v for m, v in scores.items() if number(v) is not None}


def silhouettes(inputs: Inputs) -> list[str]:
    """The models' silhouette scores."""
    scores = _silhouettes(inputs)
    if not scores:
        return []
    return ["Silhouette score of the test embeddings (-1..1, higher: classes better separated; "
            "computed in the full embedding space): " + ", ".join(
                f"{m} {fmt(v)}" for m, v in scores.items()) + "."]


def silhouette_changes(inputs: Inputs) -> list[str]:
    """What training did to the silhouette (baseline to each trained model)."""
    scores = _silhouettes(inputs)
    if "baseline" not in scores:
        return []
    return [f"Training {change(scores['baseline'], scores[model], 'the silhouette')} (baseline "
            f"to {model})." for model in ("frozen", "unfrozen") if model in scores]


# Losses on Euclidean distances, which pull same-class points to one place.
DISTANCE_LOSSES = ("contrastive", "inbatch_contrastive", "triplet")


def class_shapes(inputs: Inputs) -> list[str]:
    """Radial spokes or compact clusters: the shape of the classes of each raw (un-normalised)
    embedding, from the numbers (spread along against across each class's direction, and the
    cosine against the Euclidean silhouette)."""
    metrics = inputs.metrics.get("embed_viz") or {}
    found = []
    for model in MODELS:
        scores = metrics.get(model)
        elongation = number((scores or {}).get("radial_elongation"))
        shape = (scores or {}).get("class_shape")
        if elongation is None or not shape:
            continue
        euclidean = number(scores.get("silhouette"))
        cosine = number(scores.get("silhouette_cosine"))
        silhouettes = ""
        if shape == "overlapping classes":
            found.append(f"The {scores.get('embedding_dim')}-d {model} embedding (raw head "
                         f"output) does not separate its classes (silhouette {fmt(euclidean)}, "
                         f"cosine {fmt(cosine)}), so their shape says nothing.")
            continue
        if euclidean is not None and cosine is not None:
            by = "by direction more than by position" if cosine > euclidean else "by position"
            silhouettes = (f"; its classes separate {by} (cosine silhouette {fmt(cosine)}, "
                           f"Euclidean {fmt(euclidean)})")
        loss = inputs.params.get("train.loss")
        why = ""  # the usual cause, said only when this run's loss is that cause
        if shape == "radial spokes" and loss == "cross_entropy":
            why = (", as cross entropy makes them: a logit grows with the length of the "
                   "embedding, so a class is a direction")
        elif shape == "compact clusters" and loss in DISTANCE_LOSSES:
            why = (f", as a distance loss ({loss}) makes them: same-class points are pulled to "
                   "one place")
        found.append(f"The {scores.get('embedding_dim')}-d {model} embedding (raw head output) "
                     f"puts its classes in {shape}: each class spreads {elongation:.1f}× more "
                     f"along its mean direction than across it{silhouettes}{why}.")
    return found


def overlapping_classes(inputs: Inputs) -> list[str]:
    """Every silhouette below 0.1: the classes still overlap."""
    scores = _silhouettes(inputs)
    if not scores or max(scores.values()) >= 0.1:
        return []
    return [f"All silhouettes are below 0.1 (best {fmt(max(scores.values()))}): the classes "
            "still overlap in the embedding space."]


# --- saliency ---------------------------------------------------------------------------------


def _saliency(inputs: Inputs) -> tuple[dict[str, tuple[str, float]], dict[str, float]]:
    """(model -> (method chosen on validation, its test mean IoU), trivial baseline -> IoU)."""
    metrics = inputs.metrics.get("gradcam_segment") or {}
    baselines = {name: v.get("mean_iou") for name, v in (metrics.get("baselines") or {}).items()}
    baselines = {k: v for k, v in baselines.items() if number(v) is not None}
    chosen: dict[str, tuple[str, float]] = {}
    for model in MODELS:
        methods = metrics.get(model)
        if not isinstance(methods, dict) or not methods:
            continue
        method = (metrics.get("best_method") or {}).get(model)
        if method not in methods:
            method = max(methods, key=lambda m: methods[m].get("val_mean_iou") or -1)
        iou = number(methods[method].get("mean_iou"))
        if iou is not None:
            chosen[model] = (method, iou)
    return chosen, baselines


def saliency_iou(inputs: Inputs) -> list[str]:
    """Each model's best saliency IoU against the strongest trivial baseline (or why no IoU)."""
    metrics = inputs.metrics.get("gradcam_segment")
    if not metrics:
        return []
    if not metrics.get("iou_computed", False):
        return [metrics.get("reason", "IoU was not computed (no ground-truth masks).")]
    chosen, baselines = _saliency(inputs)
    strongest = max(baselines, key=baselines.get) if baselines else None
    notes = []
    for model, (method, iou) in chosen.items():
        entry = metrics[model][method]
        sentence = (f"{model}: {method} (chosen on validation, binarised by "
                    f"{entry.get('binarization')}, refined by {entry.get('refinement', 'none')}"
                    f") reaches a test mean IoU of {fmt(iou)}")
        if strongest is not None:
            margin = iou - baselines[strongest]
            sentence += (f", {'above' if margin > 0 else 'below'} the {strongest} baseline "
                         f"({fmt(baselines[strongest])}) by {fmt(abs(margin))}")
        accuracy = (metrics.get("test_accuracy") or {}).get(model)
        if accuracy is not None:
            sentence += f"; the model classifies {fmt(accuracy)} of the test images correctly"
        notes.append(sentence + ".")
    return notes


def saliency_changes(inputs: Inputs) -> list[str]:
    """What fine-tuning, and training end to end, did to the best saliency IoU."""
    if not (inputs.metrics.get("gradcam_segment") or {}).get("iou_computed", False):
        return []
    iou = {model: value for model, (_, value) in _saliency(inputs)[0].items()}
    notes = []
    if "frozen" in iou and "unfrozen" in iou:
        notes.append("Fine-tuning " + change(iou["frozen"], iou["unfrozen"],
                                             "the best saliency IoU") + ".")
    if "baseline" in iou and "unfrozen" in iou:
        notes.append("Training end to end (baseline to unfrozen) " + change(
            iou["baseline"], iou["unfrozen"], "the best saliency IoU") + ".")
    return notes


# --- experiments ------------------------------------------------------------------------------


def _ranked(inputs: Inputs) -> pd.DataFrame | None:
    """The experiments with a headline metric, best first; None when fewer than two."""
    table = inputs.experiments
    if table is None or len(table) < 2 or HEADLINE not in table:
        return None
    ranked = table.dropna(subset=[HEADLINE])
    return ranked if len(ranked) >= 2 else None


def _parameters(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in EXPERIMENT_FIXED_COLUMNS]


def _sort_key(value: Any) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def best_run(inputs: Inputs) -> list[str]:
    """Which recorded pipeline run has the best headline metric, with its parameters."""
    ranked = _ranked(inputs)
    if ranked is None:
        return []
    top = ranked.iloc[0]
    setting = ", ".join(f"{c}={top[c]}" for c in _parameters(ranked))
    return [f"Across {len(ranked)} pipeline runs recorded in MLflow, the highest unfrozen test "
            f"mAP, {fmt(float(top[HEADLINE]))}, came from the run {top['run']}"
            + (f" with {setting}" if setting else "") + "; the lowest was "
            f"{fmt(float(ranked[HEADLINE].min()))}."]


def parameter_effects(inputs: Inputs) -> list[str]:
    """For each varied parameter: among the runs that differ only in it (same commit, same
    other parameters), the value with the highest and the lowest headline metric.

    Runs repeated with the same value are averaged. When other parameters vary too, the largest
    group of runs that hold them fixed is used, and the sentence names the values held fixed.
    """
    ranked = _ranked(inputs)
    if ranked is None or ranked.attrs.get(PARAMETERS_NOT_SHOWN, 0):
        return []  # they also differ in parameters the table does not show
    parameters = _parameters(ranked)
    notes = []
    for parameter in parameters:
        # A different commit is different code: only runs of the same commit are compared.
        others = [*(["commit"] if "commit" in ranked else []),
                  *(p for p in parameters if p != parameter)]
        groups = [group for _, group in ranked.groupby(others, sort=False, dropna=False)
                  if group[parameter].nunique() >= 2]
        if not groups:
            continue
        group = max(groups, key=len)  # ties: the group of the best run (ranked order)
        by_value = group.groupby(parameter, sort=False)[HEADLINE].agg(["mean", "size"])
        ordered = sorted(by_value.itertuples(), key=lambda row: _sort_key(row.Index))
        held = [f"{p}={group[p].iloc[0]}" for p in others if p != "commit"]
        subject = (f"Across {len(group)} experiments that differ only in {parameter}"
                   + (f" ({', '.join(held)})" if held else ""))
        high = max(ordered, key=lambda row: row.mean)
        low = min(ordered, key=lambda row: row.mean)
        if fmt(high.mean) == fmt(low.mean):
            sentence = (f"{subject}, the {HEADLINE_NAME} was {fmt(high.mean)} at every "
                        f"{parameter}")
        else:
            sentence = (f"{subject}, the {HEADLINE_NAME} was highest at {parameter}="
                        f"{high.Index} ({fmt(high.mean)}) and lowest at {parameter}="
                        f"{low.Index} ({fmt(low.mean)})")
        if len(ordered) > 2:
            sentence += "; every value: " + ", ".join(
                f"{parameter}={row.Index}: {fmt(row.mean)}" for row in ordered)
        if any(row.size > 1 for row in ordered):
            sentence += " (repeated runs averaged)"
        notes.append(sentence + ".")
    return notes
