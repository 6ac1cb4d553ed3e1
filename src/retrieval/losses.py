"""Metric-learning losses over embeddings, in the style of pytorch-metric-learning.

Each loss is a small ``nn.Module`` whose ``forward`` takes embeddings (and labels or a
same-class flag) and returns a scalar. The pair and triplet losses also expose their
per-example terms (``per_pair``, ``per_triplet``) so a training loop can log the fraction of
active examples (term > 0) without recomputing anything.

Which sampler feeds which loss is given by the name tuples ``PAIR_LOSSES`` (rows
``[i, j, same]`` from ``sampling.sample_pairs``), ``TRIPLET_LOSSES`` (rows ``[a, p, n]`` from
``sampling.sample_triplets``), ``BATCH_LOSSES`` (labelled batches from
``sampling.class_balanced_batches``) and ``CLASSIFICATION_LOSSES`` (logits and labels from any
shuffled batch).
"""

import torch
import torch.nn.functional as F
from torch import nn

PAIR_LOSSES = ("contrastive",)
TRIPLET_LOSSES = ("triplet",)
BATCH_LOSSES = ("inbatch_contrastive", "supcon")
CLASSIFICATION_LOSSES = ("cross_entropy",)
LOSS_NAMES = PAIR_LOSSES + TRIPLET_LOSSES + BATCH_LOSSES + CLASSIFICATION_LOSSES

# Added under the square root of the hinge term only: sqrt has an infinite derivative at 0,
# and a dissimilar pair can sit at distance 0 (e.g. a collapsed embedding at initialisation).
_SQRT_EPS = 1e-12


def _squared_distance(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """Row-wise squared Euclidean distance between two (B, D) tensors; returns (B,)."""
    if emb_a.ndim != 2 or emb_a.shape != emb_b.shape:
        raise ValueError(
            f"expected two embedding tensors of the same shape (B, D), found "
            f"{tuple(emb_a.shape)} and {tuple(emb_b.shape)}: pass one row per pair"
        )
    return (emb_a - emb_b).pow(2).sum(dim=1)  # (B,)


def _check_labels(emb: torch.Tensor, labels: torch.Tensor) -> None:
    if emb.ndim != 2 or labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(
            f"expected embeddings (B, D) and labels (B,), found {tuple(emb.shape)} and "
            f"{tuple(labels.shape)}: pass one label per embedding row"
        )


class ContrastiveLoss(nn.Module):
    """Contrastive loss of Hadsell, Chopra and LeCun (2006) over explicit pairs.

    ``L = 1/(2N) * sum_i [ y_i * d_i^2 + (1 - y_i) * max(margin - d_i, 0)^2 ]`` with
    ``d_i = ||a_i - b_i||_2``.

    Label convention: ``same = 1`` means a similar (same-class) pair, pulled together;
    ``same = 0`` means a dissimilar pair, pushed beyond ``margin``. The course text labels
    same-class pairs 0 instead; feeding its labels here would invert the loss.

    The positive term uses the squared distance directly (smooth everywhere); only the hinge
    term takes ``d = sqrt(d^2 + eps)``, so the gradient stays finite when a pair coincides.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, found {margin}: set a positive margin")
        self.margin = margin

    def per_pair(
        self, emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor
    ) -> torch.Tensor:
        """Per-pair terms *including* the 1/2 factor, shape (B,); ``forward`` is their mean."""
        d2 = _squared_distance(emb_a, emb_b)  # (B,)
        if same.shape != d2.shape:
            raise ValueError(
                f"expected same of shape {tuple(d2.shape)} (one flag per pair), "
                f"found {tuple(same.shape)}"
            )
        y = same.to(d2.dtype)
        d = torch.sqrt(d2 + _SQRT_EPS)  # (B,)
        hinge = torch.clamp(self.margin - d, min=0).pow(2)  # (B,)
        return 0.5 * (y * d2 + (1 - y) * hinge)

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        return self.per_pair(emb_a, emb_b, same).mean()


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

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_labels(emb, labels)
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


class TripletLoss(nn.Module):
    """Triplet loss ``mean(max(0, ||a - p||^2 - ||a - n||^2 + margin))`` on squared distances."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, found {margin}: set a positive margin")
        self.margin = margin

    def per_triplet(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        """Per-triplet hinge terms, shape (B,); ``forward`` is their mean."""
        d_ap = _squared_distance(anchor, positive)  # (B,)
        d_an = _squared_distance(anchor, negative)  # (B,)
        return torch.clamp(d_ap - d_an + self.margin, min=0)

    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        return self.per_triplet(anchor, positive, negative).mean()


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

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_labels(emb, labels)
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


def build_loss(name: str, margin: float, temperature: float) -> nn.Module:
    """The loss called ``name``; ``margin`` and ``temperature`` are ignored where unused."""
    if name == "contrastive":
        return ContrastiveLoss(margin)
    if name == "inbatch_contrastive":
        return InBatchContrastiveLoss(margin)
    if name == "triplet":
        return TripletLoss(margin)
    if name == "supcon":
        return SupConLoss(temperature)
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSS_NAMES)}")
