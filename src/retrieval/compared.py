"""The models compared side by side (baseline / frozen / fine-tuned): ``COMPARED_MODELS``.

A fourth model is one ``ComparedModel`` entry here: evaluate embeds and scores it, embed_viz draws
it, gradcam_segment explains it and the report lists it. Plain data, so the report can read it
without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

View = Literal["backbone", "head", "model"]


@dataclass(frozen=True)
class ComparedModel:
    """One model of the comparison: all that evaluate and embed_viz need to know about it."""

    name: str  # key in metrics/details/evaluate.json, table column, data/embeddings/<name>.npz
    checkpoint: str  # the training stage whose best.pt it embeds with
    # How its embedding is computed from that checkpoint's network:
    #   backbone  the pooled backbone features (``net.features``), the untrained descriptor
    #   head      the trained head on those features, in float32 (``net.project``)
    #   model     the whole network (``net(x)``), under the run's precision
    view: View
    label: str  # its column heading in comparison.md (short: the delta columns use names)
    trained: bool = True  # False: the "before training" reference the others are compared with

    def __post_init__(self) -> None:
        if self.view not in get_args(View):
            raise ValueError(f"ComparedModel {self.name!r}: view must be one of "
                             f"{get_args(View)}, found {self.view!r}")


# Order matters: tables and figures list the models in it, the comparison table shows every
# model minus each model before it, and the figures show the first and the last side by side.
COMPARED_MODELS = (
    # The pooled backbone descriptor before any training: train_frozen never updates its trunk
    # (nor its BatchNorm statistics), so its trunk *is* the untrained (or ImageNet-pretrained)
    # backbone. With GeM pooling the pool's p is train_frozen's.
    ComparedModel("baseline", "train_frozen", "backbone", "baseline", trained=False),
    # train_frozen's embedding: the trained head on the frozen backbone.
    ComparedModel("frozen", "train_frozen", "head", "frozen"),
    # train_unfrozen's embedding: fine-tuned backbone and head.
    ComparedModel("unfrozen", "train_unfrozen", "model", "unfrozen"),
)
MODELS = tuple(model.name for model in COMPARED_MODELS)
SEARCHED = "unfrozen"  # whose gallery index `retrieval search` uses (with its checkpoint)


def checkpoints(compared: Sequence[ComparedModel] = COMPARED_MODELS) -> tuple[str, ...]:
    """The training stages whose checkpoints the compared models need, in first-use order."""
    return tuple(dict.fromkeys(model.checkpoint for model in compared))


def compared_model(name: str) -> ComparedModel:
    return next(model for model in COMPARED_MODELS if model.name == name)
