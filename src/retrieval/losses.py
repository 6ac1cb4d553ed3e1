"""Metric-learning losses behind one signature, and the registry of them (``LOSSES``).

As in pytorch-metric-learning, every loss is an ``nn.Module`` called as
``loss(embeddings, labels, tuples)``:

    embeddings  (N, D) float: L2-normalised embeddings, or class logits (N, C) for a loss whose
                entry says ``needs_classifier``
    labels      (N,) int class ids of those rows
    tuples      (B, k) int rows into ``embeddings``: pairs ``[a, b]`` (k = 2) or triplets
                ``[anchor, positive, negative]`` (k = 3) for the losses over tuples; ``None`` for
                the losses over a whole labelled batch (every pair in it)

and returns a scalar. The tuple losses (``TupleLoss``) are the mean of one term per tuple and
expose those terms (``terms``), so a training loop can log the fraction of active tuples
(term > 0) without recomputing anything.

A new loss is one entry in ``LOSSES``: how to build it from the train params, which sampler
feeds it (``pairs`` from ``sampling.sample_pairs``, ``triplets`` from
``sampling.sample_triplets``, ``batches`` from ``sampling.class_balanced_batches``; see
``training.epoch_work``) and whether the network needs a linear classifier for it. params.yaml's
``train.loss`` is validated against the registry.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # only for type hints: config imports this module to validate train.loss
    from retrieval.config import TrainConfig

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
        if temperature <= 0:
            raise ValueError(
                f"temperature must be > 0, found {temperature}: 0.05 to 0.5 is typical"
            )
        self.temperature = temperature

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


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy of class logits (N, C) against labels: the classifier baseline."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                tuples: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(logits, labels)
        _no_tuples(type(self).__name__, tuples)
        return F.cross_entropy(logits, labels)


# --- the registry ------------------------------------------------------------------------------

Sampler = Literal["pairs", "triplets", "batches"]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: how to build it and what a training step must feed it."""

    build: Callable[[TrainConfig], nn.Module]  # from the train section of params.yaml
    sampler: Sampler  # pairs [i, j] | triplets [a, p, n] | class-balanced labelled batches
    # The network gets a linear classifier on its (un-normalised) head output and the loss sees
    # its logits; otherwise the loss sees L2-normalised embeddings.
    needs_classifier: bool = False
    # The loss when every embedding sits at one point, where that is a constant: training
    # raises its collapse alarm when the epoch's mean loss is pinned there.
    collapsed_value: Callable[[TrainConfig], float] | None = None


# The order is the order error messages list the names in.
LOSSES: dict[str, LossSpec] = {
    # Hadsell et al. 2006 on fresh random pairs, half same-class. At collapse (d = 0 for every
    # pair) each negative costs margin^2 / 2 and half the pairs are negatives.
    "contrastive": LossSpec(lambda c: ContrastiveLoss(c.margin), "pairs",
                            collapsed_value=lambda c: c.margin**2 / 4),
    "inbatch_contrastive": LossSpec(lambda c: InBatchContrastiveLoss(c.margin), "batches"),
    # One triplet per anchor; train.negatives chooses mined or random negatives.
    "triplet": LossSpec(lambda c: TripletLoss(c.margin), "triplets"),
    "supcon": LossSpec(lambda c: SupConLoss(c.temperature), "batches"),
    "cross_entropy": LossSpec(lambda c: CrossEntropyLoss(), "batches", needs_classifier=True),
}


def loss_spec(name: str) -> LossSpec:
    """The registry entry called ``name``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}")
    return LOSSES[name]


def check_params(cfg: TrainConfig, key: str = "train") -> None:
    """The loss is registered and the batches fit its sampler, or a ParamsError naming the key
    (the training stages call this before any work)."""
    from retrieval.config import ParamsError

    if cfg.loss not in LOSSES:
        raise ParamsError(f"{key}.loss is '{cfg.loss}', expected one of {list(LOSSES)}: "
                          f"change {key}.loss in params.yaml")
    if LOSSES[cfg.loss].sampler == "batches" and cfg.batch_size % cfg.images_per_class:
        # class_balanced_batches cuts P classes x K images
        raise ParamsError(f"{key}.batch_size ({cfg.batch_size}) must be a multiple of "
                          f"images_per_class ({cfg.images_per_class}): change {key}.batch_size "
                          "in params.yaml")


def build_loss(cfg: TrainConfig) -> nn.Module:
    """The loss ``cfg.loss``, built from the train params it reads (margin, temperature, ...)."""
    return loss_spec(cfg.loss).build(cfg)
