"""The figures the report draws itself (the stages' own PNGs are only placed, not drawn).

Every public function is `(Inputs) -> matplotlib Figure | None` (None: nothing to draw); the
caller saves it. sections.py names each one as the `draw` of a figure.
"""

from __future__ import annotations

from typing import Any

from retrieval.report.inputs import Inputs, lr_changes


def lr_schedule(inputs: Inputs) -> Any | None:
    """Learning rate (log) over the train and val losses, per training stage, with the epochs
    where it changed marked; None when no history has a learning rate."""
    import matplotlib.pyplot as plt

    histories = inputs.histories
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
