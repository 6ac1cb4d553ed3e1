"""Figures of the gradcam_segment stage: saliency overlays and IoU histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

TRUTH_COLOUR, PREDICTED_COLOUR = "lime", "yellow"


def overlays(views: np.ndarray, labels: Sequence[str], truth: np.ndarray, has_truth: np.ndarray,
             maps: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
             ious: Mapping[str, np.ndarray], title: str) -> plt.Figure:
    """One row per image: the image, its ground truth, then per method the heat map and the
    predicted mask.

    views (K, 3, s, s) uint8 model inputs; truth (K, s, s) bool, used where has_truth (K,);
    maps/masks/ious: method -> (K, s, s) saliency in [0, 1] / (K, s, s) bool / (K,) IoU (NaN:
    no ground truth). Masks are drawn as the image with the background darkened and the mask's
    outline in yellow; the ground-truth outline is green everywhere. A flat map is labelled.
    """
    methods = list(maps)
    columns = 2 + 2 * len(methods)
    rows = max(len(views), 1)
    figure, axes = plt.subplots(rows, columns, figsize=(1.35 * columns, 1.45 * rows + 0.6),
                                squeeze=False)
    headers = ["image", "ground truth"]
    for method in methods:
        headers += [f"{method}\nheat map", f"{method}\nmask"]
    for column, header in enumerate(headers):
        axes[0, column].set_title(header, fontsize=8)
    for row, view in enumerate(views):
        image = view.transpose(1, 2, 0)  # (s, s, 3)
        gray = image.mean(axis=2)
        truth_row = truth[row] if has_truth[row] else None
        axes[row, 0].imshow(image, interpolation="nearest")
        axes[row, 0].set_ylabel(labels[row], fontsize=7)
        if truth_row is None:
            axes[row, 1].imshow(image, interpolation="nearest")
            axes[row, 1].text(0.5, 0.5, "no mask", ha="center", va="center", fontsize=8,
                              color="white", transform=axes[row, 1].transAxes)
        else:
            _show_mask(axes[row, 1], image, truth_row, None)
        for k, method in enumerate(methods):
            heat, shown = axes[row, 2 + 2 * k], axes[row, 3 + 2 * k]
            heat.imshow(gray, cmap="gray", interpolation="nearest")
            heat.imshow(maps[method][row], cmap="jet", alpha=0.5, vmin=0, vmax=1,
                        interpolation="nearest")
            if np.ptp(maps[method][row]) < 1e-6:  # no evidence anywhere: an empty mask
                heat.text(0.5, 0.5, "flat map", ha="center", va="center", fontsize=8,
                          color="white", transform=heat.transAxes)
            _show_mask(shown, image, masks[method][row], truth_row)
            iou = ious[method][row]
            if not np.isnan(iou):
                shown.set_xlabel(f"IoU {iou:.2f}", fontsize=7, labelpad=1)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if not len(views):
        axes[0, 0].text(0.5, 0.5, "no test images", ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(h_pad=0.3, w_pad=0.2)
    return figure


def no_iou(reason: str = "IoU not computed: the test images have no ground-truth masks"
           ) -> plt.Figure:
    """What an IoU figure shows when there is nothing to draw, and why."""
    figure, ax = plt.subplots(figsize=(6, 2))
    ax.text(0.5, 0.5, reason, ha="center", va="center")
    ax.set_axis_off()
    return figure


def extremes(views: np.ndarray, labels: Sequence[str], truth: np.ndarray, chosen,
             title: str) -> plt.Figure:
    """The best and the worst test images of one (model, method), as ``overlays`` draws them.

    views (N, 3, s, s), labels, truth (N, s, s): the whole test split; ``chosen``: an
    ``experiment.Extremes`` (positions into it, best first, with their maps, masks and IoUs).
    """
    positions = chosen.positions
    half = len(positions) // 2
    rank = [f"best {i + 1}" for i in range(half)] + [f"worst {half - i}" for i in range(half)]
    return overlays(views[positions], [f"{rank[i]}: {labels[p]}" for i, p in
                                       enumerate(positions)],
                    truth[positions], np.ones(len(positions), bool), {"": chosen.maps},
                    {"": chosen.masks}, {"": chosen.ious}, title)


def _show_mask(ax: plt.Axes, image: np.ndarray, mask: np.ndarray,
               truth: np.ndarray | None) -> None:
    """The image, background darkened, with the mask's outline (and the truth's, if given)."""
    shaded = image * np.where(mask, 1.0, 0.3)[..., None]
    ax.imshow(shaded.astype(np.uint8), interpolation="nearest")
    outlines = [(mask, TRUTH_COLOUR if truth is None else PREDICTED_COLOUR)]
    if truth is not None:
        outlines.append((truth, TRUTH_COLOUR))
    for outline, colour in outlines:
        if outline.any() and not outline.all():  # a constant mask has no outline
            ax.contour(outline.astype(float), levels=[0.5], colors=colour, linewidths=0.8)


def iou_histogram(scores: pd.DataFrame, baselines: Mapping[str, float]) -> plt.Figure:
    """Per-image test IoU, one panel per model, one curve per method.

    scores: columns model, method, iou; baselines: trivial baseline name -> mean IoU, drawn as
    dashed vertical lines. Without scores, a panel that says IoU was not computed.
    """
    if scores.empty:
        return no_iou()
    models = list(dict.fromkeys(scores["model"]))
    figure, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.4), sharey=True,
                                squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, model in zip(axes[0], models, strict=True):
        for method, group in scores[scores["model"] == model].groupby("method", sort=False):
            ax.hist(group["iou"], bins=bins, histtype="step", linewidth=1.6,
                    label=f"{method} (mean {group['iou'].mean():.2f})")
        for (name, mean), style in zip(baselines.items(), ("--", ":", "-."), strict=False):
            ax.axvline(mean, color="black", linestyle=style, linewidth=1,
                       label=f"{name} baseline (mean {mean:.2f})")
        ax.set(title=model, xlabel="IoU with the ground-truth mask", xlim=(0, 1))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                  frameon=False)
    axes[0, 0].set_ylabel("test images")
    figure.suptitle("Saliency segmentation: per-image IoU on the test split")
    figure.tight_layout()
    return figure
