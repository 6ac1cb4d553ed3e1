"""Losses against hand-computed values on tiny 2-D embeddings at known positions, and the
registry: every loss behind one signature ``loss(embeddings, labels, tuples)``."""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from torch import nn

from retrieval import losses
from retrieval.config import TrainConfig
from retrieval.losses import (
    LOSSES,
    ContrastiveLoss,
    CrossEntropyLoss,
    InBatchContrastiveLoss,
    NTXentLoss,
    SupConLoss,
    TripletLoss,
    TupleLoss,
    build_loss,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def pairs(a: torch.Tensor, b: torch.Tensor, same: list[int]):
    """Pairs (a_k, b_k) in the one signature: rows [a; b], tuples [k, B + k], and labels that
    are equal exactly where ``same`` is 1."""
    n = len(a)
    first = torch.arange(n) * 2
    second = first + 1 - torch.tensor(same)
    return (torch.cat([a, b]), torch.cat([first, second]),
            torch.stack([torch.arange(n), torch.arange(n) + n], dim=1))


def triplets(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor):
    """Triplets (a_k, p_k, n_k): rows [a; p; n], tuples [k, B + k, 2B + k]."""
    b = len(a)
    labels = torch.cat([torch.zeros(2 * b, dtype=torch.long), torch.ones(b, dtype=torch.long)])
    return (torch.cat([a, p, n]), labels,
            torch.arange(b)[:, None] + b * torch.arange(3)[None, :])


# --- ContrastiveLoss --------------------------------------------------------------------------


def test_contrastive_similar_pair_at_distance_zero_is_zero():
    a = t([[0.3, -0.2]])
    loss = ContrastiveLoss(margin=1.0)(*pairs(a, a.clone(), [1]))
    assert loss.item() == 0.0


def test_contrastive_dissimilar_pair_at_distance_zero_is_half_margin_squared():
    # N = 1, y = 0, d = 0: L = 1/2 * max(2 - 0, 0)^2 = 2.0
    a = t([[0.3, -0.2]])
    loss = ContrastiveLoss(margin=2.0)(*pairs(a, a.clone(), [0]))
    assert loss.item() == pytest.approx(2.0, abs=1e-5)


def test_contrastive_dissimilar_pair_beyond_margin_is_zero():
    # d = 5 (3-4-5 triangle) > margin 1: hinge is 0
    loss = ContrastiveLoss(margin=1.0)(*pairs(t([[0, 0]]), t([[3, 4]]), [0]))
    assert loss.item() == 0.0


def test_contrastive_hand_computed_batch():
    # pair 0: similar,    a=(0,0) b=(3,4): d = 5,   term = 5^2        = 25
    # pair 1: dissimilar, a=(0,0) b=(1,0): d = 1,   term = (2 - 1)^2  = 1
    # pair 2: dissimilar, a=(1,1) b=(1,4): d = 3,   term = max(2-3,0)^2 = 0
    # L = (25 + 1 + 0) / (2 * 3) = 26 / 6
    loss_fn = ContrastiveLoss(margin=2.0)
    a, b = t([[0, 0], [0, 0], [1, 1]]), t([[3, 4], [1, 0], [1, 4]])
    inputs = pairs(a, b, [1, 0, 0])
    assert loss_fn(*inputs).item() == pytest.approx(26 / 6, rel=1e-6)
    per_pair = loss_fn.terms(*inputs)
    assert per_pair.tolist() == pytest.approx([12.5, 0.5, 0.0], rel=1e-6)
    # the training loop's "fraction of active pairs"
    assert (per_pair > 0).float().mean().item() == pytest.approx(2 / 3)


def test_contrastive_gradient_finite_at_distance_zero():
    emb, labels, rows = pairs(t([[0.5, 0.5], [0.5, 0.5]]), t([[0.5, 0.5], [0.5, 0.5]]), [1, 0])
    emb.requires_grad_()
    ContrastiveLoss(margin=1.0)(emb, labels, rows).backward()
    assert torch.isfinite(emb.grad).all()


def test_contrastive_gradient_pushes_close_dissimilar_pair_apart():
    # a=(0,0), b=(0.1,0), d = 0.1, L = (m - d)^2 / 2:
    # dL/da = -(m - d) * (a - b) / d = -(0.9) * (-0.1, 0) / 0.1 = (0.9, 0)
    emb, labels, rows = pairs(t([[0.0, 0.0]]), t([[0.1, 0.0]]), [0])
    emb.requires_grad_()
    ContrastiveLoss(margin=1.0)(emb, labels, rows).backward()
    assert emb.grad[0].tolist() == pytest.approx([0.9, 0.0], rel=1e-4)  # descent moves a away


def test_tuple_losses_reject_the_wrong_inputs():
    emb, labels = t([[0, 0], [1, 1], [2, 2]]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"expects tuples of shape \(B, 2\).*found None"):
        ContrastiveLoss()(emb, labels)
    with pytest.raises(ValueError, match=r"expects tuples of shape \(B, 3\).*found \(1, 2\)"):
        TripletLoss()(emb, labels, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="one label per embedding row"):
        ContrastiveLoss()(emb, labels[:2], torch.tensor([[0, 1]]))


@pytest.mark.parametrize("loss", [InBatchContrastiveLoss(), SupConLoss(), CrossEntropyLoss()])
def test_batch_losses_reject_tuples(loss):
    with pytest.raises(ValueError, match="every pair of the batch.*tuples=None"):
        loss(t([[0, 0], [1, 1]]), torch.tensor([0, 1]), torch.tensor([[0, 1]]))


def test_contrastive_training_on_toy_problem_decreases_loss():
    # Two separable Gaussian blobs in 4-D, embedded by a linear map to 2-D.
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(32, 4, generator=gen) + 3, torch.randn(32, 4, generator=gen) - 3])
    y = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)])
    i = torch.randint(0, 64, (256,), generator=gen)
    j = torch.randint(0, 64, (256,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    loss_fn = ContrastiveLoss(margin=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(50):
        emb = model(x)  # (64, 2)
        loss = loss_fn(emb, y, torch.stack([i, j], dim=1))  # pairs as rows into emb
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
    assert loss_fn.terms(*triplets(a, p, n)).tolist() == pytest.approx([0.0, 3.5])
    assert loss_fn(*triplets(a, p, n)).item() == pytest.approx(1.75)


def test_triplet_collapsed_embedding_gives_margin():
    a = t([[1, 1]])
    assert TripletLoss(margin=0.3)(*triplets(a, a, a)).item() == pytest.approx(0.3)


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


# --- CrossEntropyLoss ---------------------------------------------------------------------------


def test_cross_entropy_equals_torch():
    gen = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(10, 5, generator=gen), torch.randint(0, 5, (10,), generator=gen)
    assert torch.equal(CrossEntropyLoss()(logits, labels), nn.CrossEntropyLoss()(logits, labels))


# --- the registry ------------------------------------------------------------------------------


def test_registry_lists_every_loss_with_its_sampler_and_classifier_need():
    expected = {  # name: (class, sampler, needs_classifier)
        "contrastive": (ContrastiveLoss, "pairs", False),
        "inbatch_contrastive": (InBatchContrastiveLoss, "batches", False),
        "triplet": (TripletLoss, "triplets", False),
        "supcon": (SupConLoss, "batches", False),
        "cross_entropy": (CrossEntropyLoss, "batches", True),
        "ntxent": (NTXentLoss, "views", False),
    }
    assert list(LOSSES) == list(expected)  # the order error messages list them in
    for name, (cls, sampler, classifier) in expected.items():
        spec = LOSSES[name]
        assert isinstance(build_loss(TrainConfig(loss=name)), cls)
        assert (spec.sampler, spec.needs_classifier) == (sampler, classifier)


def test_build_loss_reads_margin_and_temperature_from_the_train_params():
    assert build_loss(TrainConfig(loss="triplet", margin=0.5)).margin == 0.5
    assert build_loss(TrainConfig(loss="contrastive", margin=0.7)).margin == 0.7
    assert build_loss(TrainConfig(loss="supcon", temperature=0.2)).temperature == 0.2
    assert build_loss(TrainConfig(loss="ntxent", temperature=0.3)).temperature == 0.3
    # At collapse (distance 0) each contrastive negative costs margin^2 / 2; half are negatives.
    assert LOSSES["contrastive"].collapsed_value(TrainConfig(margin=0.6)) == pytest.approx(0.09)


def test_an_unknown_loss_names_the_registered_ones():
    with pytest.raises(ValueError, match="contrastive, inbatch_contrastive, triplet, supcon, "
                                         "cross_entropy, ntxent"):
        losses.loss_spec("contrastiv")


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_takes_the_one_signature_and_gives_a_differentiable_scalar(name):
    # What training feeds each sampler kind: 12 rows of 3 classes; pairs and triplets as rows.
    spec = LOSSES[name]
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(12) % 3
    emb = torch.randn(12, 3 if spec.needs_classifier else 4, generator=gen)  # logits: 3 classes
    if not spec.needs_classifier:
        emb = nn.functional.normalize(emb, dim=1)
    tuples = {"pairs": torch.tensor([[0, 3], [1, 2], [4, 5]]),
              "triplets": torch.tensor([[0, 3, 1], [1, 4, 2]]), "batches": None,
              "views": torch.arange(6)[:, None] + 6 * torch.arange(2)}[spec.sampler]
    emb.requires_grad_()
    loss = spec.build(TrainConfig(loss=name))(emb, labels, tuples)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    # The tuple losses are the mean of their per-tuple terms (training logs the active share).
    loss_fn = spec.build(TrainConfig(loss=name))
    if isinstance(loss_fn, TupleLoss):
        terms = loss_fn.terms(emb, labels, tuples)
        assert terms.shape == (len(tuples),) and torch.equal(terms.mean(), loss)


@pytest.mark.parametrize("cls", [ContrastiveLoss, InBatchContrastiveLoss, TripletLoss])
def test_non_positive_margin_is_value_error(cls):
    with pytest.raises(ValueError, match="margin must be > 0"):
        cls(margin=0.0)
