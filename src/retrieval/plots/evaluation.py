"""Figures of the evaluate and embed_viz stages and the user commands; data in, Figure out.

Confusion matrices, ROC curves, distance and cosine-similarity histograms put the models side by
side; retrieval grids show a query and its nearest gallery images with green (same class) or red
(other class) borders; embedding scatters colour the largest classes and leave the rest grey, so
102 classes stay legible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

MODEL_COLOURS = {"baseline": "tab:gray", "frozen": "tab:blue", "unfrozen": "tab:orange"}
RIGHT, WRONG, NEUTRAL = "#1a9850", "#d73027", "#4d4d4d"
OTHER_GREY = "#c8c8c8"


def _colour(model: str) -> str:
    return MODEL_COLOURS.get(model, "tab:purple")


def confusion_matrices(results: dict[str, dict]) -> plt.Figure:
    """TP/FN/FP/TN of each model's test pairs as 2x2 matrices (rows: true, columns: predicted)."""
    figure, axes = plt.subplots(1, len(results), figsize=(3.9 * len(results), 3.8), squeeze=False)
    for ax, (model, m) in zip(axes[0], results.items(), strict=True):
        counts = np.array([[m["tp"], m["fn"]], [m["fp"], m["tn"]]], dtype=float)
        rates = counts / counts.sum(axis=1, keepdims=True).clip(1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        names = (("TP", "FN"), ("FP", "TN"))
        for r in range(2):
            for c in range(2):
                ax.text(c, r, f"{names[r][c]}\n{int(counts[r, c])}\n{rates[r, c]:.0%} of row",
                        ha="center", va="center", fontsize=10,
                        color="white" if rates[r, c] > 0.6 else "black")
        ax.set_xticks([0, 1], ["same", "different"])
        ax.set_yticks([0, 1], ["same", "different"])
        ax.set(xlabel="predicted", ylabel="true pair",
               title=f"{model}\nthreshold {m['threshold']:.3f}, accuracy {m['accuracy']:.3f}")
    figure.suptitle("Pair verification on the test pairs (threshold chosen on validation)")
    figure.tight_layout()
    return figure


def roc_curves(roc: pd.DataFrame, aucs: dict[str, float]) -> plt.Figure:
    """ROC of each model (columns model, fpr, tpr): linear axes, and a log false-match axis."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for model, part in roc.groupby("model", sort=False):
        label = f"{model} (AUC {aucs[model]:.3f})"
        for ax in axes:
            ax.step(part["fpr"], part["tpr"], where="post", color=_colour(model), label=label)
    axes[0].plot([0, 1], [0, 1], ls=":", color="black", lw=0.8, label="chance")
    axes[0].set(xlim=(0, 1), ylim=(0, 1.01), title="ROC, test pairs")
    positive = roc["fpr"][roc["fpr"] > 0]
    axes[1].set_xscale("log")
    axes[1].set(xlim=(max(positive.min() if len(positive) else 1e-3, 1e-4), 1), ylim=(0, 1.01),
                title="ROC with a log false-match axis (FNMR@FMR)")
    for fmr in (1e-2, 1e-3):
        axes[1].axvline(fmr, color="black", ls="--", lw=0.6)
    for ax in axes:
        ax.set(xlabel="false match rate (FPR)", ylabel="true match rate (TPR)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def distance_histograms(distances: dict[str, tuple[np.ndarray, np.ndarray]],
                        thresholds: dict[str, float]) -> plt.Figure:
    """Test-pair distances of same-class vs different-class pairs, one panel per model.

    ``distances``: model -> (distances (P,), same (P,) 0/1).
    """
    figure, axes = plt.subplots(1, len(distances), figsize=(4.4 * len(distances), 3.6),
                                squeeze=False)
    for ax, (model, (d, same)) in zip(axes[0], distances.items(), strict=True):
        same = np.asarray(same).astype(bool)
        # Each model's own range: an untrained descriptor can crowd into a narrow band.
        low, high = min(d.min(), thresholds[model]), max(d.max(), thresholds[model])
        pad = 0.05 * (high - low) + 1e-3
        bins = np.linspace(max(0.0, low - pad), high + pad, 41)
        ax.hist(d[same], bins=bins, alpha=0.6, color=RIGHT, label=f"same class ({same.sum()})")
        ax.hist(d[~same], bins=bins, alpha=0.6, color=WRONG,
                label=f"different class ({(~same).sum()})")
        ax.axvline(thresholds[model], color="black", ls="--",
                   label=f"threshold {thresholds[model]:.3f}")
        ax.set(title=model, xlabel="Euclidean distance between embeddings", ylabel="test pairs")
        ax.legend(fontsize=8)
    figure.suptitle("Distances of positive vs negative test pairs")
    figure.tight_layout()
    return figure


def similarity_histograms(similarities: dict[str, tuple[np.ndarray, np.ndarray]],
                          summaries: dict[str, dict]) -> plt.Figure:
    """Cosine similarity of same-class vs different-class test pairs, one panel per model on a
    shared -1..1 axis, each group's mean marked and the gap (same mean - different mean) in the
    panel's title.

    ``similarities``: model -> (cosine similarities (P,), same (P,) 0/1); ``summaries``: model
    -> its ``metrics.cosine_separation`` (cosine_same_mean, cosine_different_mean, cosine_gap).
    """
    figure, axes = plt.subplots(1, len(similarities), figsize=(4.4 * len(similarities), 3.6),
                                squeeze=False, sharex=True)
    bins = np.linspace(-1.0, 1.0, 51)
    for ax, (model, (cosines, same)) in zip(axes[0], similarities.items(), strict=True):
        cosines, same = np.asarray(cosines), np.asarray(same).astype(bool)
        summary = summaries[model]
        for mask, colour, name, key in ((same, RIGHT, "same class", "cosine_same_mean"),
                                        (~same, WRONG, "different class",
                                         "cosine_different_mean")):
            ax.hist(cosines[mask], bins=bins, alpha=0.6, color=colour,
                    label=f"{name} ({mask.sum()})")
            mean = summary.get(key)
            if mean is not None and np.isfinite(mean):
                ax.axvline(mean, color=colour, ls="--", lw=1.5,
                           label=f"{name} mean {mean:.3f}")
        gap = summary.get("cosine_gap")
        gap_text = f"gap {gap:+.3f}" if gap is not None and np.isfinite(gap) else "gap n/a"
        ax.set(title=f"{model}: {gap_text}", xlim=(-1, 1),
               xlabel="cosine similarity of the pair's embeddings", ylabel="test pairs")
        ax.legend(fontsize=7, loc="best")
    figure.suptitle("Cosine similarity of same-class vs different-class test pairs "
                    "(gap = same mean - different mean)")
    figure.tight_layout()
    return figure


@dataclass
class Tile:
    """One image of a retrieval grid."""

    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    correct: bool | None = None  # green / red border; None: a neutral border (the query)


def retrieval_grid(rows: list[list[Tile | None]], column_titles: list[str], title: str,
                   gaps_after: tuple[int, ...] = ()) -> plt.Figure:
    """Rows of tiles (typically a query, then its nearest gallery images), bordered by class.

    ``gaps_after``: column numbers followed by a narrow gap (between groups of results).
    """
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    ratios = []
    for c in range(n_cols):
        ratios += [1.0, 0.25] if c in gaps_after else [1.0]
    figure, grid = plt.subplots(n_rows, len(ratios), squeeze=False,
                                figsize=(1.35 * sum(ratios), 1.6 * n_rows + 0.6),
                                gridspec_kw={"width_ratios": ratios})
    tile_columns = [i for i, ratio in enumerate(ratios) if ratio == 1.0]
    for ax in grid[:, [i for i, ratio in enumerate(ratios) if ratio != 1.0]].ravel():
        ax.axis("off")
    axes = grid[:, tile_columns]
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            tile = row[c] if c < len(row) else None
            if tile is None:
                ax.axis("off")
                continue
            ax.imshow(tile.image)
            colour = NEUTRAL if tile.correct is None else (RIGHT if tile.correct else WRONG)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if tile.correct is not None else 2)
            ax.set_xlabel(tile.caption, fontsize=7, labelpad=2)
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=8)
    judged = any(tile is not None and tile.correct is not None for row in rows for tile in row)
    legend = "\n(green border: same class as the query, red: another class)" if judged else ""
    figure.suptitle(title + legend, fontsize=10)
    figure.tight_layout()
    return figure


def _scatter_panel(ax: plt.Axes, points: np.ndarray, labels: np.ndarray,
                   highlighted: list[str]) -> None:
    size = float(np.clip(2500 / max(len(points), 1), 4, 30))  # fewer points, bigger dots
    other = ~np.isin(labels, highlighted)
    ax.scatter(points[other, 0], points[other, 1], s=0.6 * size, c=OTHER_GREY, linewidths=0)
    palette = plt.get_cmap("tab10" if len(highlighted) <= 10 else "tab20")
    for i, name in enumerate(highlighted):
        mine = labels == name
        ax.scatter(points[mine, 0], points[mine, 1], s=size, color=palette(i), linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])


def embedding_scatter(points: dict[str, np.ndarray], labels: np.ndarray, highlighted: list[str],
                      title: str, axis_name: str,
                      subtitles: dict[str, str] | None = None) -> plt.Figure:
    """One 2-D scatter per model, side by side (before -> after), coloured by class.

    The ``highlighted`` classes get a colour each and a legend entry; the others are grey.
    """
    labels = np.asarray(labels).astype(str)
    figure, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points) + 2.0, 4.8),
                                squeeze=False)
    for ax, (model, xy) in zip(axes[0], points.items(), strict=True):
        _scatter_panel(ax, xy, labels, highlighted)
        ax.set(title=model + (f"\n{subtitles[model]}" if subtitles and model in subtitles
                              else ""), xlabel=f"{axis_name} 1", ylabel=f"{axis_name} 2")
        if axis_name == "embedding":  # plotted directly: keep the geometry, origin included
            ax.set_aspect("equal")
            norms = np.linalg.norm(xy, axis=1)
            if np.allclose(norms, 1, atol=1e-3):  # L2-normalised: on the unit circle
                ax.set(xlim=(-1.12, 1.12), ylim=(-1.12, 1.12))
                ax.set_xticks([-1, 0, 1])
                ax.set_yticks([-1, 0, 1])
                ax.add_patch(plt.Circle((0, 0), 1, fill=False, ls=":", color="black", lw=0.6))
            else:  # the raw head output: the same scale on both axes, around the origin
                reach = 1.08 * float(np.percentile(np.abs(xy), 99.5)) or 1.0
                ax.set(xlim=(-reach, reach), ylim=(-reach, reach))
                ax.xaxis.set_major_locator(plt.MaxNLocator(5))
                ax.yaxis.set_major_locator(plt.MaxNLocator(5))
                ax.axhline(0, color="black", lw=0.4, ls=":")
                ax.axvline(0, color="black", lw=0.4, ls=":")
    palette = plt.get_cmap("tab10" if len(highlighted) <= 10 else "tab20")
    handles = [plt.Line2D([], [], ls="", marker="o", color=palette(i), label=name[:24])
               for i, name in enumerate(highlighted)]
    n_other = len(set(labels) - set(highlighted))
    if n_other:
        handles.append(plt.Line2D([], [], ls="", marker="o", color=OTHER_GREY,
                                  label=f"{n_other} other classes"))
    figure.legend(handles=handles, loc="center right", fontsize=8, frameon=False,
                  title="class (largest)" if n_other else "class")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1 - 1.8 / figure.get_size_inches()[0], 1))
    return figure


def pair_figure(image_a: np.ndarray, image_b: np.ndarray, names: tuple[str, str],
                distance: float, similarity: float, same: bool, threshold: float) -> plt.Figure:
    """Two images and the model's verdict (the `retrieval compare` figure)."""
    figure, axes = plt.subplots(1, 2, figsize=(7, 4))
    colour = RIGHT if same else WRONG
    for ax, image, name in zip(axes, (image_a, image_b), names, strict=True):
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("/".join(Path(name).parts[-2:]), fontsize=8)  # class folder/file
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
    verdict = "same class" if same else "different classes"
    figure.suptitle(f"{verdict}: distance {distance:.3f} (threshold {threshold:.3f}), "
                    f"cosine similarity {similarity:.3f}", color=colour)
    figure.tight_layout()
    return figure
