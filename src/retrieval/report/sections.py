"""The report's sections: one `SectionSpec` per section, in the order they are printed.

A section is one entry of `SECTIONS` and nothing else: its title, the stages whose metrics it
needs, its figures (with captions), its tables, its observations and whether the summary
repeats each of them. `build_sections` turns the entries into the document the renderers draw:

  Summary (every observation flagged `in_summary`, in report order), then for each entry:
  its observations, a notice for each needed stage that has not run, its tables, its figures.

Every PNG the stages left appears exactly once: a figure no entry names goes to the section
that `collects` its stage (or "*"), with a caption made from its file name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from retrieval.report import figures, observations, tables
from retrieval.report.document import Block, Bullets, Figure, Missing, Section
from retrieval.report.inputs import MODELS, TRAIN_STAGES, Inputs

ANY_STAGE = "*"  # in `collects`: the figures of every stage no other section collects


@dataclass(frozen=True)
class FigureSpec:
    key: str  # "stage/name": plots/<stage>/<name>.png, or the report's own when `draw` is set
    caption: str  # what the figure shows (a description; findings are observations)
    optional: bool = False  # drawn only sometimes: no notice when its stage ran without it
    draw: Callable[[Inputs], Any | None] | None = None  # the report draws it (figures.py)


@dataclass(frozen=True)
class Observation:
    sentences: Callable[[Inputs], list[str]]  # a function of observations.py
    in_summary: bool = False  # the summary repeats these sentences


@dataclass(frozen=True)
class SectionSpec:
    id: str  # the HTML/markdown anchor
    title: str
    needs: tuple[str, ...] = ()  # stages whose metrics `blocks` reads; "not run yet" otherwise
    figures: tuple[FigureSpec, ...] = ()
    blocks: Callable[[Inputs], list[Block]] | None = None  # tables and text (tables.py)
    observations: tuple[Observation, ...] = ()
    collects: tuple[str, ...] = ()  # stages whose unnamed figures are shown here
    omit_if_empty: bool = False  # leave the section out when it has nothing to show


LR_FIGURE = "report/lr_schedule"

SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        "data", "Data", needs=("prepare", "split"), collects=("prepare", "split"),
        blocks=tables.data,
        observations=(Observation(observations.dataset), Observation(observations.split))),
    SectionSpec(
        "normalization", "Normalisation check", needs=("verify_normalization",),
        collects=("verify_normalization",), blocks=tables.normalization,
        figures=(FigureSpec("verify_normalization/histograms", "Pixel values of a training "
                            "sample per channel, before (0..1) and after normalisation (the "
                            "model's input)."),),
        observations=(Observation(observations.normalization),)),
    SectionSpec(
        "training", "Training curves: frozen vs unfrozen", needs=TRAIN_STAGES,
        collects=TRAIN_STAGES, blocks=tables.training,
        figures=(
            FigureSpec("train_frozen/curves", "train_frozen (backbone frozen, head trained): "
                       "loss, pair accuracy, precision, recall, F1 and learning rate per epoch, "
                       "train vs validation. Epoch 0 is before training."),
            FigureSpec("train_unfrozen/curves", "train_unfrozen (whole network fine-tuned): "
                       "loss, pair accuracy, precision, recall, F1 and learning rate per epoch, "
                       "train vs validation. Epoch 0 is the starting point.")),
        observations=(Observation(observations.stopping, in_summary=True),
                      Observation(observations.loss_trend),
                      Observation(observations.accuracy_change),
                      Observation(observations.accuracy_gap),
                      Observation(observations.collapse),
                      Observation(observations.frozen_vs_unfrozen, in_summary=True))),
    SectionSpec(
        "lr_schedule", "Learning-rate schedule", collects=("report",), blocks=tables.lr_schedule,
        figures=(FigureSpec(LR_FIGURE, "Learning rate per epoch (log scale, top) and the losses "
                            "it acted on (bottom); dashed lines mark the epochs where "
                            "ReduceLROnPlateau lowered it.", draw=figures.lr_schedule),),
        observations=(Observation(observations.lr_schedule, in_summary=True),
                      Observation(observations.lr_effects))),
    SectionSpec(
        "comparison", "Baseline vs frozen vs unfrozen (test set)", needs=("evaluate",),
        blocks=tables.comparison,
        observations=(Observation(observations.map_steps, in_summary=True),
                      Observation(observations.precision_at_1_steps),
                      Observation(observations.roc_auc),
                      Observation(observations.constant_answer),
                      Observation(observations.hardest_classes))),
    SectionSpec(
        "verification", "Pair verification: confusion matrix, ROC, distances",
        blocks=tables.decision_threshold,
        figures=(
            FigureSpec("evaluate/confusion_matrix", "Pair verification on the test pairs: "
                       "confusion matrices at the distance threshold chosen on validation "
                       "pairs."),
            FigureSpec("evaluate/roc", "ROC curves of pair verification (test pairs): true vs "
                       "false positive rate as the distance threshold varies."),
            FigureSpec("evaluate/distance_histograms", "Distances between the embeddings of "
                       "same-class and different-class test pairs, with the chosen "
                       "threshold."))),
    SectionSpec(
        "retrieval", "Retrieval examples", collects=("evaluate",),
        figures=(
            FigureSpec("evaluate/retrieval_examples", "Example test queries and their nearest "
                       "gallery images (correct class framed green, wrong red)."),
            FigureSpec("evaluate/worst_queries", "The test queries with the lowest average "
                       "precision and their nearest gallery images."))),
    SectionSpec(
        "similarity", "Cosine similarity before and after training (test pairs)",
        needs=("evaluate",), blocks=tables.similarity,
        figures=(FigureSpec("evaluate/similarity", "Cosine similarity between the embeddings of "
                            "same-class (green) and different-class (red) test pairs, one panel "
                            "per model (baseline: before training) on a shared -1..1 axis; "
                            "dashed lines mark each group's mean, the panel title gives the gap "
                            "(same-class mean - different-class mean)."),),
        observations=(Observation(observations.similarity_gap, in_summary=True),)),
    SectionSpec(
        "embeddings", "Embeddings before and after training", needs=("embed_viz",),
        collects=("embed_viz",), blocks=tables.embeddings,
        figures=(
            FigureSpec("embed_viz/tsne", "t-SNE of the test embeddings: before training "
                       "(baseline) and after (frozen, unfrozen)."),
            FigureSpec("embed_viz/pca", "PCA (first two components) of the test embeddings: "
                       "baseline, frozen, unfrozen."),
            FigureSpec("embed_viz/direct", "The 2-D embeddings plotted directly (no "
                       "projection), coloured by class; the origin is marked.",
                       optional=True)),  # only for 2-D embeddings
        observations=(Observation(observations.silhouettes, in_summary=True),
                      Observation(observations.silhouette_changes, in_summary=True),
                      Observation(observations.class_shapes, in_summary=True),
                      Observation(observations.overlapping_classes))),
    SectionSpec(
        "gradcam", "Grad-CAM segmentation", needs=("gradcam_segment",),
        collects=("gradcam_segment",), blocks=tables.saliency,
        figures=(
            FigureSpec("gradcam_segment/overlays_baseline", "Saliency masks of the untrained "
                       "backbone (baseline) on test images: prediction yellow, ground truth "
                       "green."),
            FigureSpec("gradcam_segment/overlays_frozen", "Saliency masks of the frozen model "
                       "on test images: prediction yellow, ground truth green."),
            FigureSpec("gradcam_segment/overlays_unfrozen", "Saliency masks of the fine-tuned "
                       "(unfrozen) model on test images: prediction yellow, ground truth "
                       "green."),
            FigureSpec("gradcam_segment/iou_histogram", "IoU of the saliency masks with the "
                       "ground truth per test image, against the trivial baselines."),
            *(FigureSpec(f"gradcam_segment/extremes_{model}", f"The best and the worst test "
                         f"images of the {model} model's best method (chosen on val).",
                         optional=True) for model in MODELS)),
        observations=(Observation(observations.saliency_iou, in_summary=True),
                      Observation(observations.saliency_changes))),
    SectionSpec(
        "experiments", "Experiments compared", blocks=tables.experiments,
        observations=(Observation(observations.best_run, in_summary=True),
                      Observation(observations.parameter_effects, in_summary=True))),
    SectionSpec("wall_time", "Wall time per stage", blocks=tables.wall_time),
    SectionSpec("other", "Other figures", collects=(ANY_STAGE,), omit_if_empty=True),
    SectionSpec("configuration", "Configuration of this run", blocks=tables.configuration),
)


def _missing_stage(stage: str) -> Missing:
    return Missing(f"The {stage} stage has not produced its outputs yet "
                   f"(metrics/details/{stage}.json is missing): run `dvc repro {stage}`.")


def _unnamed_figures(inputs: Inputs) -> dict[str, list[str]]:
    """Section id -> the figures of `inputs` that no entry names, in the order found."""
    named = {figure.key for spec in SECTIONS for figure in spec.figures}
    home = {stage: spec.id for spec in SECTIONS for stage in spec.collects}
    found: dict[str, list[str]] = {}
    for key in inputs.figures:
        if key not in named:
            stage = key.split("/")[0]
            found.setdefault(home.get(stage, home[ANY_STAGE]), []).append(key)
    return found


def _figure_blocks(spec: SectionSpec, unnamed: list[str], inputs: Inputs) -> list[Block]:
    captions = {figure.key: figure.caption for figure in spec.figures}
    optional = {figure.key for figure in spec.figures if figure.optional}
    blocks: list[Block] = []
    for key in (*captions, *unnamed):
        stage, name = key.split("/", 1)
        if key in inputs.figures:
            caption = captions.get(key, f"{stage}: {name.replace('_', ' ')}")
            blocks.append(Figure(key, inputs.figures[key], caption))
        elif key not in optional and stage in inputs.metrics:
            blocks.append(Missing(f"Figure {key}.png was not found in the plots folder."))
    return blocks


def build_sections(inputs: Inputs) -> list[Section]:
    """The summary, then every entry of `SECTIONS` with its observations, tables and figures.
    Every PNG of `inputs.figures` appears exactly once."""
    unnamed = _unnamed_figures(inputs)
    summary: list[str] = []
    sections = []
    for spec in SECTIONS:
        notes: list[str] = []
        for observation in spec.observations:
            sentences = observation.sentences(inputs)
            notes += sentences
            if observation.in_summary:
                summary += sentences
        blocks: list[Block] = [Bullets(tuple(notes), "Observations")] if notes else []
        blocks += [_missing_stage(stage) for stage in spec.needs if stage not in inputs.metrics]
        blocks += spec.blocks(inputs) if spec.blocks else []
        blocks += _figure_blocks(spec, unnamed.get(spec.id, []), inputs)
        if blocks or not spec.omit_if_empty:
            sections.append(Section(spec.id, spec.title, blocks))
    first = (Bullets(tuple(summary), "Key observations") if summary
             else Missing("No stage has produced metrics yet: run `dvc repro`."))
    return [Section("summary", "Summary", [first]), *sections]


def drawn_figures(inputs: Inputs) -> Iterator[tuple[str, Any]]:
    """(key, matplotlib figure) for each figure the report draws itself and can draw now."""
    for spec in SECTIONS:
        for figure in spec.figures:
            drawn = figure.draw(inputs) if figure.draw else None
            if drawn is not None:
                yield figure.key, drawn
