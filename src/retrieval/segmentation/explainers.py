"""What to explain for each model, and the explainer files `retrieval segment` reads.

For an embedding model, the cosine of the image's embedding to its class prototype (the mean
training embedding of its class); for the untrained baseline, the same on the pooled backbone
descriptor; for a classifier (a network with a ``classifier`` head), the predicted class logit.
An explainer file (``save_explainer``) holds the class prototypes, the view and the chosen
binarisation per method, tied to one checkpoint file by its digest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval import cam, embed, models, outputs, transforms
from retrieval.cache import ImageCache
from retrieval.outputs import UserError


class PooledDescriptor(nn.Module):
    """The untrained baseline's embedding: the L2-normalised pooled backbone descriptor (B, C).

    With a frozen trunk, train_frozen's trunk is the backbone before any training, so this view
    of its checkpoint is the baseline the learned embeddings are compared with.
    """

    def __init__(self, net: models.EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    @property
    def target_layer(self) -> nn.Module:
        return self.net.target_layer

    @property
    def fine_layers(self) -> list[nn.Module]:
        return self.net.fine_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.features(images).float(), dim=1)


class ClassifierLogits(nn.Module):
    """The cross-entropy baseline's class logits (B, C), read from the un-normalised head."""

    def __init__(self, net: models.EmbeddingNet) -> None:
        super().__init__()
        if net.classifier is None:
            raise ValueError("the network has no classifier (it was not trained with "
                             "cross_entropy)")
        self.net = net

    @property
    def target_layer(self) -> nn.Module:
        return self.net.target_layer

    @property
    def fine_layers(self) -> list[nn.Module]:
        return self.net.fine_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(self.net(images, normalize=False))


@dataclass
class Explainer:
    """A model to explain, and which scalar of its output each image's saliency explains."""

    name: str
    model: nn.Module  # (B, 3, s, s) -> (B, D) embeddings or (B, C) logits; has .target_layer
    target: str  # "prototype": cosine to a class prototype | "logit": the predicted class logit
    view: str = "embedding"  # embedding | backbone (pooled descriptor) | classifier
    prototypes: dict[str, np.ndarray] = field(default_factory=dict)  # label -> unit (D,)
    classes: list[str] = field(default_factory=list)  # a classifier's class of each logit

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def normalization(self) -> transforms.Normalization:
        return getattr(self.model, "net", self.model).normalization  # the wrapped EmbeddingNet

    @property
    def can_predict(self) -> bool:
        """A class can be named: a classifier with class names (checkpoints before they were
        stored have none), or an embedding with class prototypes."""
        return bool(self.classes) if self.target == "logit" else bool(self.prototypes)

    def predicted_indices(self, images: torch.Tensor) -> list[int]:
        """For a classifier: the index of the largest logit of each normalised image."""
        with torch.no_grad():
            return self.model(images.to(self.device)).float().argmax(dim=1).cpu().tolist()

    def predict(self, images: torch.Tensor) -> list[str]:
        """The predicted class of each normalised image (B, 3, s, s): the class of the largest
        logit, or the label of the nearest prototype (largest cosine)."""
        if self.target == "logit":
            if not self.classes:
                raise ValueError(f"{self.name} is a classifier without class names")
            return [self.classes[i] for i in self.predicted_indices(images)]
        labels = list(self.prototypes)
        if not labels:
            raise ValueError(f"{self.name} has no class prototypes: call with_prototypes first")
        with torch.no_grad():
            output = self.model(images.to(self.device)).float().cpu()  # (B, D)
        matrix = torch.from_numpy(np.stack([self.prototypes[label] for label in labels]))
        return [labels[i] for i in (F.normalize(output, dim=1) @ matrix.T).argmax(dim=1)]

    def targets(self, images: torch.Tensor, labels: Sequence[str] | None = None
                ) -> list[cam.Target]:
        """One target per image: the prototype of its class (``labels`` given) or of its
        predicted class; for classifiers always the predicted class logit."""
        if self.target == "logit":
            return [cam.ClassLogit(index) for index in self.predicted_indices(images)]
        if labels is None:
            labels = self.predict(images)
        missing = sorted(set(labels) - set(self.prototypes))
        if missing:
            raise ValueError(f"{self.name} has no prototype for class(es) {missing[:5]}")
        return [cam.SimilarityToPrototype(self.prototypes[label]) for label in labels]


def model_explainer(name: str, net: models.EmbeddingNet,
                    classes: Sequence[str] = ()) -> Explainer:
    """A trained network: its classifier's predicted logit if it has one (``classes``: the
    checkpoint's class names, one per logit), else its embedding."""
    net.eval()
    if net.classifier is not None:
        return Explainer(name, ClassifierLogits(net).eval(), "logit", "classifier",
                         classes=list(classes))
    return Explainer(name, net, "prototype", "embedding")


def backbone_explainer(name: str, net: models.EmbeddingNet) -> Explainer:
    """The pooled backbone descriptor of ``net`` (the untrained baseline for a frozen trunk)."""
    return Explainer(name, PooledDescriptor(net).eval(), "prototype", "backbone")


def with_prototypes(explainer: Explainer, images: ImageCache, indices: np.ndarray,
                    labels: Sequence[str], image_size: int, precision: str) -> Explainer:
    """The explainer with class prototypes from the embeddings of ``images[indices]``."""
    if explainer.target != "prototype":
        return explainer
    embeddings = embed.run_batched(explainer.model, images, np.asarray(indices), image_size,
                                   explainer.device, precision,
                                   explainer.normalization)  # (N, D)
    return replace(explainer, prototypes=cam.class_prototypes(embeddings, list(labels)))


def explain(explainer: Explainer, method: str, views: torch.Tensor,
            labels: Sequence[str] | None = None) -> np.ndarray:
    """(B, s, s) saliency maps in [0, 1] of uint8 model views (B, 3, s, s)."""
    images = transforms.normalize(views.to(explainer.device), explainer.normalization)
    return cam.saliency_maps(explainer.model, images, explainer.targets(images, labels), method)


# --- explainer files: what `retrieval segment` needs besides the checkpoint --------------------


def save_explainer(path: str | Path, explainer: Explainer, model_file: str | Path,
                   binarizations: dict[str, str], refinements: dict[str, str] | None = None,
                   best_method: str | None = None) -> None:
    """Prototypes, view, the binarisation and refinement chosen per method and the best method
    (all on val), tied to one checkpoint file."""
    labels = list(explainer.prototypes)
    prototypes = (np.stack([explainer.prototypes[label] for label in labels]) if labels
                  else np.zeros((0, 0), np.float32))
    meta = {"name": explainer.name, "target": explainer.target, "view": explainer.view,
            "model_sha256": outputs.file_digest(model_file), "binarization": binarizations,
            "refinement": refinements or {}, "best_method": best_method}
    with outputs.atomic_path(path) as temp, open(temp, "wb") as stream:
        np.savez(stream, labels=np.array(labels, dtype=str), prototypes=prototypes,
                 meta=np.array(json.dumps(meta, sort_keys=True)))


def load_explainer(model_file: str | Path, explainer_file: str | Path | None
                   ) -> tuple[Explainer, dict, dict]:
    """(explainer, checkpoint, choices) for a checkpoint and, for embedding models, the explainer
    file the gradcam_segment stage wrote for it. ``choices`` holds what gradcam_segment chose on
    val: {"binarization": {method: setting}, "refinement": {method: setting}, "best_method"}
    (empty dicts and None without an explainer file)."""
    net, checkpoint = models.load_model(model_file)
    classes = checkpoint.get("classes", [])
    if explainer_file is None or not Path(explainer_file).is_file():
        if net.classifier is not None:
            return (model_explainer("model", net, classes), checkpoint,
                    {"binarization": {}, "refinement": {}, "best_method": None})
        where = f" ({explainer_file} does not exist)" if explainer_file else ""
        raise UserError(f"{model_file} is an embedding model: its saliency needs class "
                        f"prototypes{where}. Run `dvc repro gradcam_segment` and pass "
                        "--prototypes data/gradcam/prototypes/<model>.npz")
    try:
        with np.load(explainer_file, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            labels, prototypes = stored["labels"].tolist(), stored["prototypes"]
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"{explainer_file} is not a prototypes file written by gradcam_segment "
                        f"({type(error).__name__})") from error
    if meta["model_sha256"] != outputs.file_digest(model_file):
        raise UserError(f"{explainer_file} was computed for another model file than "
                        f"{model_file}: pass the matching --model, or re-run "
                        "`dvc repro gradcam_segment`")
    if meta["view"] == "backbone":
        explainer = backbone_explainer(meta["name"], net)
    else:
        explainer = model_explainer(meta["name"], net, classes)
    explainer.prototypes = dict(zip(labels, prototypes.astype(np.float32), strict=True))
    return explainer, checkpoint, {"binarization": meta["binarization"],
                                   "refinement": meta.get("refinement", {}),
                                   "best_method": meta.get("best_method")}
