"""Figures of the data and training stages: normalisation histograms, training curves."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

CHANNELS = ("red", "green", "blue")


def normalization_histograms(raw: np.ndarray, normalized: np.ndarray) -> plt.Figure:
    """Per-channel histograms of raw [0, 1] pixels and of the normalised tensors, (B, 3, H, W)."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for channel, colour in enumerate(CHANNELS):
        axes[0].hist(raw[:, channel].ravel(), bins=64, color=colour, alpha=0.45, label=colour)
        axes[1].hist(normalized[:, channel].ravel(), bins=64, color=colour, alpha=0.45,
                     label=colour)
    axes[0].set(title="raw pixels (ToTensor scale)", xlabel="value", ylabel="pixels")
    axes[1].set(title="after ImageNet mean/std normalisation", xlabel="value")
    axes[1].axvline(0, color="black", lw=0.8)
    for ax in axes:
        ax.legend()
    figure.tight_layout()
    return figure


def training_curves(history: pd.DataFrame, title: str) -> plt.Figure:
    """Loss, accuracy, precision, recall, F1 and learning rate per epoch, train vs val."""
    panels = [("loss", "loss"), ("accuracy", "pair accuracy"), ("precision", "precision"),
              ("recall", "recall"), ("f1", "F1"), ("lr", "learning rate")]
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (name, label) in zip(axes.ravel(), panels, strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            column = f"{split}_{name}"
            if column in history:
                ax.plot(history["epoch"], history[column], style, ms=3, label=split)
        if name == "lr" and "lr" in history:
            ax.plot(history["epoch"], history["lr"], "-o", ms=3, color="tab:purple")
            ax.set_yscale("log")
        ax.set(title=label, xlabel="epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure
