"""Losses against hand-computed values on tiny 2-D embeddings at known positions."""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from torch import nn

from retrieval.losses import (
    BATCH_LOSSES,
    CLASSIFICATION_LOSSES,
    PAIR_LOSSES,
    TRIPLET_LOSSES,
    ContrastiveLoss,
    InBatchContrastiveLoss,
    SupConLoss,
    TripletLoss,
    build_loss,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- ContrastiveLoss --------------------------------------------------------------------------


def test_contrastive_similar_pair_at_distance_zero_is_zero():
    a = t([[0.3, -0.2]])
    loss = ContrastiveLoss(margin=1.0)(a, a.clone(), torch.tensor([1]))
    assert loss.item() == 0.0


def test_contrastive_dissimilar_pair_at_distance_zero_is_half_margin_squared():
    # N = 1, y = 0, d = 0: L = 1/2 * max(2 - 0, 0)^2 = 2.0
    a = t([[0.3, -0.2]])
    loss = ContrastiveLoss(margin=2.0)(a, a.clone(), torch.tensor([0]))
    assert loss.item() == pytest.approx(2.0, abs=1e-5)


def test_contrastive_dissimilar_pair_beyond_margin_is_zero():
    # d = 5 (3-4-5 triangle) > margin 1: hinge is 0
    loss = ContrastiveLoss(margin=1.0)(t([[0, 0]]), t([[3, 4]]), torch.tensor([0]))
    assert loss.item() == 0.0


def test_contrastive_hand_computed_batch():
    # pair 0: similar,    a=(0,0) b=(3,4): d = 5,   term = 5^2        = 25
    # pair 1: dissimilar, a=(0,0) b=(1,0): d = 1,   term = (2 - 1)^2  = 1
    # pair 2: dissimilar, a=(1,1) b=(1,4): d = 3,   term = max(2-3,0)^2 = 0
    # L = (25 + 1 + 0) / (2 * 3) = 26 / 6
    loss_fn = ContrastiveLoss(margin=2.0)
    a, b = t([[0, 0], [0, 0], [1, 1]]), t([[3, 4], [1, 0], [1, 4]])
    same = torch.tensor([1, 0, 0])
    assert loss_fn(a, b, same).item() == pytest.approx(26 / 6, rel=1e-6)
    per_pair = loss_fn.per_pair(a, b, same)
    assert per_pair.tolist() == pytest.approx([12.5, 0.5, 0.0], rel=1e-6)
    # the training loop's "fraction of active pairs"
    assert (per_pair > 0).float().mean().item() == pytest.approx(2 / 3)


def test_contrastive_gradient_finite_at_distance_zero():
    a = t([[0.5, 0.5], [0.5, 0.5]]).requires_grad_()
    b = t([[0.5, 0.5], [0.5, 0.5]]).requires_grad_()
    ContrastiveLoss(margin=1.0)(a, b, torch.tensor([1, 0])).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_contrastive_gradient_pushes_close_dissimilar_pair_apart():
    # a=(0,0), b=(0.1,0), d = 0.1, L = (m - d)^2 / 2:
    # dL/da = -(m - d) * (a - b) / d = -(0.9) * (-0.1, 0) / 0.1 = (0.9, 0)
    a = t([[0.0, 0.0]]).requires_grad_()
    ContrastiveLoss(margin=1.0)(a, t([[0.1, 0.0]]), torch.tensor([0])).backward()
    assert a.grad[0].tolist() == pytest.approx([0.9, 0.0], rel=1e-4)  # descent moves a away


def test_contrastive_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="same shape"):
        ContrastiveLoss()(t([[0, 0]]), t([[0, 0, 0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="one flag per pair"):
        ContrastiveLoss()(t([[0, 0]]), t([[0, 0]]), torch.tensor([1, 0]))


def test_contrastive_training_on_toy_problem_decreases_loss():
    # Two separable Gaussian blobs in 4-D, embedded by a linear map to 2-D.
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(32, 4, generator=gen) + 3, torch.randn(32, 4, generator=gen) - 3])
    y = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)])
    i = torch.randint(0, 64, (256,), generator=gen)
    j = torch.randint(0, 64, (256,), generator=gen)
    same = (y[i] == y[j]).long()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    loss_fn = ContrastiveLoss(margin=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(50):
        emb = model(x)  # (64, 2)
        loss = loss_fn(emb[i], emb[j], same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]  # measured: 0.186 -> 0.004


# --- InBatchContrastiveLoss -------------------------------------------------------------------


def test_inbatch_contrastive_hand_computed():
    # points (0,0) (1,0) (0,2), labels 0 0 1, margin 2, D = squared distance:
    # (0,1) same: D = 1          -> 1
    # (0,2) diff: D = 4 >= 2     -> 0
    # (1,2) diff: D = 1 + 4 = 5  -> 0
    # mean over 3 pairs = 1/3
    emb = t([[0, 0], [1, 0], [0, 2]])
    loss = InBatchContrastiveLoss(margin=2.0)(emb, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx(1 / 3, rel=1e-6)


def test_inbatch_contrastive_close_negatives_are_penalised():
    # (0,0) and (0.5,0) of different classes: D = 0.25, term = 1 - 0.25 = 0.75, one pair
    loss = InBatchContrastiveLoss(margin=1.0)(t([[0, 0], [0.5, 0]]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(0.75, rel=1e-6)


def test_inbatch_contrastive_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        InBatchContrastiveLoss()(t([[0, 0]]), torch.tensor([0]))


# --- TripletLoss ------------------------------------------------------------------------------


def test_triplet_hand_computed():
    # triplet 0: a=(0,0) p=(1,0) n=(0,2): 1 - 4 + 0.5 = -2.5 -> 0
    # triplet 1: a=(0,0) p=(0,2) n=(1,0): 4 - 1 + 0.5 = 3.5
    # mean = 1.75
    loss_fn = TripletLoss(margin=0.5)
    a = t([[0, 0], [0, 0]])
    p = t([[1, 0], [0, 2]])
    n = t([[0, 2], [1, 0]])
    assert loss_fn.per_triplet(a, p, n).tolist() == pytest.approx([0.0, 3.5])
    assert loss_fn(a, p, n).item() == pytest.approx(1.75)


def test_triplet_collapsed_embedding_gives_margin():
    a = t([[1, 1]])
    assert TripletLoss(margin=0.3)(a, a, a).item() == pytest.approx(0.3)


# --- SupConLoss -------------------------------------------------------------------------------


def test_supcon_hand_computed_two_views():
    # Unit vectors at angles 0, 0, 90, 90 degrees, labels 0 0 1 1, T = 1.
    # For anchor 0 the candidates are sims (1, 0, 0) to (1, 2, 3): positive 1 has sim 1.
    # l = -log(e / (e + 2)) for every anchor by symmetry.
    emb = t([[1, 0], [2, 0], [0, 1], [0, 3]])  # not unit: the loss normalises
    loss = SupConLoss(temperature=1.0)(emb, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_supcon_matches_pytorch_metric_learning(temperature):
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(48, 16, generator=gen)
    labels = torch.randint(0, 6, (48,), generator=gen)
    ours = SupConLoss(temperature)(emb, labels)
    theirs = pml_losses.SupConLoss(temperature=temperature)(emb, labels)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_supcon_gradient_matches_pytorch_metric_learning():
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(24, 8, generator=gen)
    labels = torch.randint(0, 4, (24,), generator=gen)
    ours, theirs = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    SupConLoss(0.1)(ours, labels).backward()
    pml_losses.SupConLoss(temperature=0.1)(theirs, labels).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_supcon_without_positives_or_negatives_is_zero_like_pml():
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    for labels in (torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5])):
        loss = SupConLoss()(emb, labels)
        assert loss.item() == 0.0
        assert pml_losses.SupConLoss()(emb, labels).item() == 0.0
        loss.backward()  # still attached to the graph


# --- build_loss -------------------------------------------------------------------------------


def test_build_loss_every_name():
    expected = {
        "contrastive": ContrastiveLoss,
        "inbatch_contrastive": InBatchContrastiveLoss,
        "triplet": TripletLoss,
        "supcon": SupConLoss,
        "cross_entropy": nn.CrossEntropyLoss,
    }
    names = PAIR_LOSSES + TRIPLET_LOSSES + BATCH_LOSSES + CLASSIFICATION_LOSSES
    assert sorted(names) == sorted(expected)
    for name, cls in expected.items():
        assert isinstance(build_loss(name, margin=0.5, temperature=0.2), cls)
    assert build_loss("triplet", margin=0.5, temperature=0.2).margin == 0.5
    assert build_loss("supcon", margin=0.5, temperature=0.2).temperature == 0.2


def test_build_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="contrastive, triplet.*supcon, cross_entropy"):
        build_loss("contrastiv", margin=1.0, temperature=0.1)


@pytest.mark.parametrize("cls", [ContrastiveLoss, InBatchContrastiveLoss, TripletLoss])
def test_non_positive_margin_is_value_error(cls):
    with pytest.raises(ValueError, match="margin must be > 0"):
        cls(margin=0.0)
