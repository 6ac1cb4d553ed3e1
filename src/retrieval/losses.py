"""Metric-learning losses behind one signature, and the registry of them (``LOSSES``).

As in pytorch-metric-learning, every loss is an ``nn.Module`` called as
``loss(embeddings, labels, tuples)``:

    embeddings  (N, D) float: L2-normalised embeddings, or class logits (N, C) for a loss whose
                entry says ``needs_classifier``
    labels      (N,) int class ids of those rows
    tuples      (B, k) int rows into ``embeddings``: pairs ``[a, b]`` (k = 2) or triplets
                ``[anchor, positive, negative]`` (k = 3) for the losses over tuples, the two
                views ``[v1, v2]`` of each image for NT-Xent; ``None`` for the losses over a
                whole labelled batch (every pair in it)

and returns a scalar. The tuple losses (``TupleLoss``) are the mean of one term per tuple and
expose those terms (``terms``), so a training loop can log the fraction of active tuples
(term > 0) without recomputing anything.

A new loss is one entry in ``LOSSES``: how to build it from the train params, which sampler
feeds it (``pairs`` from ``sampling.sample_pairs``, ``triplets`` from
``sampling.sample_triplets``, ``batches`` from ``sampling.class_balanced_batches``, ``views``
from ``sampling.view_batches``: two augmentations of each image, no labels; see
``training.epoch_work``) and whether the network needs a linear classifier for it. params.yaml's
``train.loss`` is validated against the registry.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # only for type hints: config imports this module to validate train.loss
    from retrieval.config import AugmentConfig, TrainConfig

# Added under the square root of the hinge term only: sqrt has an infinite derivative at 0,
# and a dissimilar pair can sit at distance 0 (e.g. a collapsed embedding at initialisation).
_SQRT_EPS = 1e-12


def _squared_distance(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """Row-wise squared Euclidean distance between two (B, D) tensors; returns (B,)."""
    return (emb_a - emb_b).pow(2).sum(dim=1)  # (B,)


def _check_labels(emb: torch.Tensor, labels: torch.Tensor) -> None:
    if emb.ndim != 2 or labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(
            f"expected embeddings (N, D) and labels (N,), found {tuple(emb.shape)} and "
            f"{tuple(labels.shape)}: pass one label per embedding row"
        )


def _checked_temperature(temperature: float) -> float:
    """The softmax temperature of SupCon and NT-Xent, or a ValueError saying what is typical."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, found {temperature}: 0.05 to 0.5 is typical")
    return temperature


def _no_tuples(name: str, tuples: torch.Tensor | None) -> None:
    if tuples is not None:
        raise ValueError(f"{name} uses every pair of the batch, found tuples of shape "
                         f"{tuple(tuples.shape)}: pass tuples=None")


class TupleLoss(nn.Module, abc.ABC):
    """A loss that is the mean of one term per tuple (pair or triplet) of embedding rows."""

    width: int  # 2 for pairs, 3 for triplets

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                tuples: torch.Tensor | None = None) -> torch.Tensor:
        return self.terms(embeddings, labels, tuples).mean()

    def terms(self, embeddings: torch.Tensor, labels: torch.Tensor,
              tuples: torch.Tensor | None) -> torch.Tensor:
        """The per-tuple terms (B,); ``forward`` is their mean."""
        _check_labels(embeddings, labels)
        if tuples is None or tuples.ndim != 2 or tuples.shape[1] != self.width:
            found = "None" if tuples is None else str(tuple(tuples.shape))
            raise ValueError(f"{type(self).__name__} expects tuples of shape (B, {self.width}) "
                             f"(rows into the embeddings), found {found}")
        return self._terms([embeddings[tuples[:, k]] for k in range(self.width)],
                           [labels[tuples[:, k]] for k in range(self.width)])

    @abc.abstractmethod
    def _terms(self, rows: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """One term per tuple (B,) from its rows' embeddings and labels, each (B, D) / (B,)."""


class ContrastiveLoss(TupleLoss):
    """Contrastive loss of Hadsell, Chopra and LeCun (2006) over pairs ``[a, b]``.

    ``L = 1/(2N) * sum_i [ y_i * d_i^2 + (1 - y_i) * max(margin - d_i, 0)^2 ]`` with
    ``d_i = ||a_i - b_i||_2`` and ``y_i = 1`` when the two labels are equal.

    Label convention: ``y = 1`` means a similar (same-class) pair, pulled together; ``y = 0`` a
    dissimilar pair, pushed beyond ``margin``. The course text labels same-class pairs 0
    instead; its formula with our ``y`` would invert the loss.

    The positive term uses the squared distance directly (smooth everywhere); only the hinge
    term takes ``d = sqrt(d^2 + eps)``, so the gradient stays finite when a pair coincides.
    """

    width = 2

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, found {margin}: set a positive margin")
        self.margin = margin

    def _terms(self, rows: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """Per-pair terms *including* the 1/2 factor, shape (B,)."""
        d2 = _squared_distance(*rows)  # (B,)
        y = (labels[0] == labels[1]).to(d2.dtype)
        d = torch.sqrt(d2 + _SQRT_EPS)  # (B,)
        hinge = torch.clamp(self.margin - d, min=0).pow(2)  # (B,)
        return 0.5 * (y * d2 + (1 - y) * hinge)


class InBatchContrastiveLoss(nn.Module):
    """Contrastive loss over every pair ``i < j`` of a labelled minibatch.

    ``l_ij = I(y_i = y_j) * D_ij + (1 - I(y_i = y_j)) * max(0, margin - D_ij)`` with ``D_ij`` the
    *squared* Euclidean distance (as in the course text: the margin is on the squared
    distance, so no square root and no eps are needed). Returns the mean over all pairs.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, found {margin}: set a positive margin")
        self.margin = margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor,
                tuples: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(emb, labels)
        _no_tuples(type(self).__name__, tuples)
        if emb.shape[0] < 2:
            raise ValueError(
                f"expected a batch of at least 2 embeddings, found {emb.shape[0]}: "
                "increase the batch size"
            )
        i, j = torch.triu_indices(emb.shape[0], emb.shape[0], offset=1, device=emb.device)
        # The explicit difference (not |a|^2 + |b|^2 - 2ab) is exact for close pairs; at
        # B = 256, D = 128 it is 32640 x 128 floats, small.
        d2 = _squared_distance(emb[i], emb[j])  # (P,) with P = B(B-1)/2
        same = (labels[i] == labels[j]).to(d2.dtype)  # (P,)
        per_pair = same * d2 + (1 - same) * torch.clamp(self.margin - d2, min=0)
        return per_pair.mean()


class TripletLoss(TupleLoss):
    """Triplet loss ``mean(max(0, ||a - p||^2 - ||a - n||^2 + margin))`` on squared distances,
    over triplets ``[anchor, positive, negative]`` (the labels are not read: the sampler
    guarantees that the positive shares the anchor's class and the negative does not)."""

    width = 3

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, found {margin}: set a positive margin")
        self.margin = margin

    def _terms(self, rows: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """Per-triplet hinge terms, shape (B,)."""
        anchor, positive, negative = rows
        d_ap = _squared_distance(anchor, positive)  # (B,)
        d_an = _squared_distance(anchor, negative)  # (B,)
        return torch.clamp(d_ap - d_an + self.margin, min=0)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020; NT-Xent when each class has 2 views).

    Embeddings are L2-normalised; for each anchor ``i`` with at least one positive,
    ``l_i = -mean_{p in P(i)} log( exp(s_ip / T) / sum_{k != i} exp(s_ik / T) )`` with ``s`` the
    cosine similarity. The loss is the mean over anchors that have a positive. A batch with no
    positive pair or no negative pair gives 0 (still attached to the graph), which matches
    ``pytorch_metric_learning.losses.SupConLoss``.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = _checked_temperature(temperature)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor,
                tuples: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(emb, labels)
        _no_tuples(type(self).__name__, tuples)
        z = F.normalize(emb, dim=1)  # (B, D)
        logits = z @ z.T / self.temperature  # (B, B)
        same = labels[:, None] == labels[None, :]  # (B, B)
        eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
        pos = same & ~eye
        if not pos.any() or same.all():
            return logits.sum() * 0.0
        # Subtracting the row max does not change log-softmax but keeps exp() in range.
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        logits = logits.masked_fill(eye, float("-inf"))  # an anchor is not its own candidate
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (B, B)
        n_pos = pos.sum(dim=1)  # (B,)
        mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp(min=1)
        return -mean_log_prob_pos[n_pos > 0].mean()


class NTXentLoss(nn.Module):
    """NT-Xent, SimCLR's label-free contrastive loss (Chen et al. 2020).

    The batch holds two random augmentations ("views") of each of B images, 2B rows;
    ``tuples`` (B, 2) names the two rows of each image (training embeds ``[v1..., v2...]``, so
    ``[k, B + k]``). For every anchor ``a`` in a tuple, its positive ``p`` is the other view of
    the same image and every other row of the batch is a negative, two views of two images of
    one class included:
    ``l_a = -log( exp(s_ap / T) / sum_{k != a} exp(s_ak / T) )`` with ``s`` the cosine
    similarity; the loss is the mean over the 2B anchors. ``labels`` are not read (they may be
    None): which rows belong together is all in ``tuples``.

    When every embedding sits at one point, every ``s`` is 1 and each anchor costs
    ``log(2B - 1)`` whatever T (tests/test_ntxent.py checks it). That is no constant of the
    params, so the registry entry does not declare it as ``collapsed_value``: an epoch's last
    step is shorter unless the train split is a multiple of batch_size / 2 images, which moves
    the epoch's mean at collapse; ``fit``'s other alarm (val embeddings at one point) covers it.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = _checked_temperature(temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                tuples: torch.Tensor | None = None) -> torch.Tensor:
        return self.terms(embeddings, tuples).mean()

    def terms(self, embeddings: torch.Tensor, tuples: torch.Tensor | None) -> torch.Tensor:
        """Per-anchor terms (2B,): the first views' anchors, then the second views'."""
        if embeddings.ndim != 2:
            raise ValueError(f"expected embeddings (N, D), found {tuple(embeddings.shape)}: "
                             "pass one row per view")
        if tuples is None or tuples.ndim != 2 or tuples.shape[1] != 2 or len(tuples) < 2:
            found = "None" if tuples is None else str(tuple(tuples.shape))
            raise ValueError(f"NTXentLoss expects tuples of shape (B, 2) with B >= 2 (the two "
                             f"views of each image, rows into the embeddings), found {found}")
        anchors = torch.cat([tuples[:, 0], tuples[:, 1]])  # (2B,)
        if anchors.min() < 0 or anchors.max() >= len(embeddings) \
                or len(anchors.unique()) != len(anchors):
            raise ValueError(f"NTXentLoss expects every tuple entry to be a distinct row in "
                             f"[0, {len(embeddings)}), found repeated or out-of-range rows: "
                             "name each view once")
        positives = torch.cat([tuples[:, 1], tuples[:, 0]])  # (2B,)
        # float32: under bf16 autocast the logits (up to 1/T) would keep ~3 significant digits.
        z = F.normalize(embeddings.float(), dim=1)  # (N, D)
        logits = z[anchors] @ z.T / self.temperature  # (2B, N): every row is a candidate
        # An anchor is not its own candidate; rows in no tuple stay negatives of everyone.
        logits = logits.masked_fill(
            anchors[:, None] == torch.arange(len(z), device=z.device)[None, :], float("-inf"))
        # logsumexp subtracts the row max, so exp() stays in range at any temperature.
        positive = logits.gather(1, positives[:, None])[:, 0]  # (2B,)
        return torch.logsumexp(logits, dim=1) - positive


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy of class logits (N, C) against labels: the classifier baseline."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                tuples: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(logits, labels)
        _no_tuples(type(self).__name__, tuples)
        return F.cross_entropy(logits, labels)


# --- the registry ------------------------------------------------------------------------------

Sampler = Literal["pairs", "triplets", "batches", "views"]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: how to build it and what a training step must feed it."""

    build: Callable[[TrainConfig], nn.Module]  # from the train section of params.yaml
    # pairs [i, j] | triplets [a, p, n] | class-balanced labelled batches | views (each image of
    # an unlabelled shuffle embedded twice, under two random augmentations)
    sampler: Sampler
    # The network gets a linear classifier on its (un-normalised) head output and the loss sees
    # its logits; otherwise the loss sees the embeddings (L2-normalised unless model.normalize
    # is false).
    needs_classifier: bool = False
    # The loss when every embedding sits at one point, where that is a constant: training
    # raises its collapse alarm when the epoch's mean loss is pinned there.
    collapsed_value: Callable[[TrainConfig], float] | None = None
    # The largest train.margin that means something between L2-normalised embeddings: unit
    # vectors are at most 2 apart, so 2 for a margin on the distance and 4 on the squared
    # distance. Beyond it the hinge never closes (every negative is pushed for ever). None: the
    # loss has no margin.
    max_margin: float | None = None


# The order is the order error messages list the names in.
LOSSES: dict[str, LossSpec] = {
    # Hadsell et al. 2006 on fresh random pairs, half same-class. At collapse (d = 0 for every
    # pair) each negative costs margin^2 / 2 and half the pairs are negatives.
    "contrastive": LossSpec(lambda c: ContrastiveLoss(c.margin), "pairs",
                            collapsed_value=lambda c: c.margin**2 / 4, max_margin=2.0),
    "inbatch_contrastive": LossSpec(lambda c: InBatchContrastiveLoss(c.margin), "batches",
                                    max_margin=4.0),
    # One triplet per anchor; train.negatives chooses mined or random negatives.
    "triplet": LossSpec(lambda c: TripletLoss(c.margin), "triplets", max_margin=4.0),
    "supcon": LossSpec(lambda c: SupConLoss(c.temperature), "batches"),
    "cross_entropy": LossSpec(lambda c: CrossEntropyLoss(), "batches", needs_classifier=True),
    # SimCLR: two augmentations of each image, no labels; no collapsed_value (see NTXentLoss).
    "ntxent": LossSpec(lambda c: NTXentLoss(c.temperature), "views"),
}


def loss_spec(name: str) -> LossSpec:
    """The registry entry called ``name``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}")
    return LOSSES[name]


def check_params(cfg: TrainConfig, key: str = "train", augment: AugmentConfig | None = None,
                 augment_key: str = "augment", normalize: bool = True,
                 train_labels: np.ndarray | None = None) -> None:
    """The loss is registered, its margin means something, and the batches fit its sampler,
    or a ParamsError naming the key (the training stages call this before any work).
    ``augment``: the calling stage's augmentation (``augment_key`` its params key), which the
    ``views`` sampler needs; ``normalize``: model.normalize (bounds the margin);
    ``train_labels``: the train split's labels, to check that its batches can be formed.

    For NT-Xent the frozen stage is *not* switched to its augmented path behind the user's
    back: ``train_frozen.augment.enabled: false`` would then no longer mean what it says, and
    the cost of an epoch would jump (no feature cache: the backbone runs on every view) without
    a param showing why. Without augmentation both views of an image are the same input, so
    each positive pair is trivially solved and nothing invariant is learnt: that is an error
    that names the key to set.
    """
    from retrieval.config import ParamsError

    if cfg.loss not in LOSSES:
        raise ParamsError(f"{key}.loss is '{cfg.loss}', expected one of {list(LOSSES)}: "
                          f"change {key}.loss in params.yaml")
    spec = LOSSES[cfg.loss]
    if normalize and spec.max_margin is not None and cfg.margin > spec.max_margin:
        raise ParamsError(f"{key}.margin ({cfg.margin:g}) must be <= {spec.max_margin:g} for "
                          f"{key}.loss '{cfg.loss}' on L2-normalised embeddings (unit vectors are "
                          "at most 2 apart: a larger margin is never met): change "
                          f"{key}.margin in params.yaml")
    if spec.sampler == "batches":
        _check_class_batches(cfg, key, train_labels)
    if spec.sampler == "views":
        _check_view_batches(cfg, key, augment, augment_key, train_labels)


def _check_class_batches(cfg: TrainConfig, key: str, train_labels: np.ndarray | None) -> None:
    """sampling.class_balanced_batches cuts P = batch_size / images_per_class classes x K =
    images_per_class images; P >= 2 (a negative in every batch) classes of 2+ train images."""
    from retrieval.config import ParamsError

    if cfg.batch_size % cfg.images_per_class:
        raise ParamsError(f"{key}.batch_size ({cfg.batch_size}) must be a multiple of "
                          f"images_per_class ({cfg.images_per_class}): change {key}.batch_size "
                          "in params.yaml")
    per_batch = cfg.batch_size // cfg.images_per_class
    if per_batch < 2:
        raise ParamsError(f"{key}.batch_size ({cfg.batch_size}) must hold at least 2 classes "
                          f"of {key}.images_per_class ({cfg.images_per_class}) images, or no "
                          f"batch has a negative: raise {key}.batch_size in params.yaml")
    if train_labels is not None:
        usable = int((np.unique(train_labels, return_counts=True)[1] >= 2).sum())
        if usable < per_batch:
            raise ParamsError(f"{key}.batch_size / images_per_class = {per_batch} classes a "
                              f"batch, but only {usable} classes of the train split have 2 or "
                              f"more images: lower {key}.batch_size (or raise "
                              f"{key}.images_per_class) in params.yaml")


def _check_view_batches(cfg: TrainConfig, key: str, augment: AugmentConfig | None,
                        augment_key: str, train_labels: np.ndarray | None) -> None:
    from retrieval.config import ParamsError

    # batch_size / 2 images a step, each twice; an image needs another image as a negative.
    if cfg.batch_size < 4 or cfg.batch_size % 2:
        raise ParamsError(f"{key}.batch_size ({cfg.batch_size}) must be even and >= 4 for "
                          f"{key}.loss '{cfg.loss}' (two views of at least 2 images a "
                          f"step): change {key}.batch_size in params.yaml")
    if train_labels is not None and len(train_labels) < cfg.batch_size // 2:
        raise ParamsError(f"{key}.batch_size ({cfg.batch_size}) takes {cfg.batch_size // 2} "
                          f"images a step, but the train split has {len(train_labels)}: lower "
                          f"{key}.batch_size in params.yaml")
    if augment is not None and not augment.enabled:
        raise ParamsError(f"{augment_key}.enabled is false, but {key}.loss '{cfg.loss}' "
                          "contrasts two random augmentations of each image (without them "
                          f"both views are the same): set {augment_key}.enabled: true in "
                          "params.yaml")
    if augment is not None and augment.crop_scale_min >= 1 and not augment.flip \
            and augment.color_jitter == 0:
        # RandomResizedCrop at scale 1 always falls back to the whole image.
        raise ParamsError(f"{augment_key} changes no image (crop_scale_min 1, no flip, no "
                          f"colour jitter), but {key}.loss '{cfg.loss}' needs two different "
                          f"views: lower {augment_key}.crop_scale_min in params.yaml")


def build_loss(cfg: TrainConfig) -> nn.Module:
    """The loss ``cfg.loss``, built from the train params it reads (margin, temperature, ...)."""
    return loss_spec(cfg.loss).build(cfg)
