"""NT-Xent (SimCLR, train.loss: ntxent): the loss against hand-computed values and
pytorch-metric-learning, the label-free ``views`` sampler, the two augmented views, the params
it refuses, and a real fit on images."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from retrieval import config, losses, models, rng, sampling, training, transforms
from retrieval.config import ParamsError, TrainConfig, params_from_dict
from retrieval.losses import LOSSES, NTXentLoss
from retrieval.outputs import UserError
from tests.test_training import SMALL, colour_classes, frozen_problem, train_config

REPO = Path(__file__).resolve().parents[1]


def views(b: int) -> torch.Tensor:
    """The tuples training passes for b images embedded as [v1..., v2...]: [k, b + k]."""
    return torch.arange(b)[:, None] + b * torch.arange(2)[None, :]


# --- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "a", "b"), [(1.0, 0.55144, 1.86199),
                                                    (0.5, 0.23954, 2.75862)])
def test_ntxent_hand_computed_two_images(temperature, a, b):
    # Image a: views (1, 0) and (2, 0), cosine 1. Image b: views (0, 1) and (0, -3), cosine -1.
    # Rows [a1, b1, a2, b2]; every cross-image cosine is 0. At temperature T:
    #   a1, a2: cosines (1, 0, 0) to the candidates, positive first:
    #           -log(e^(1/T) / (e^(1/T) + 2)) = log(1 + 2 e^(-1/T)): 0.55144 (T = 1), 0.23954
    #   b1, b2: cosines (-1, 0, 0): log(1 + 2 e^(1/T)): 1.86199 (T = 1), 2.75862 (T = 0.5)
    # L = (a + b) / 2: 1.20672 (T = 1), 1.49908 (T = 0.5)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -3.0]])
    loss_fn = NTXentLoss(temperature)
    assert loss_fn(emb, None, views(2)).item() == pytest.approx((a + b) / 2, abs=1e-5)
    assert loss_fn.terms(emb, views(2)).tolist() == pytest.approx([a, b, a, b], abs=1e-5)
    expected = (math.log(1 + 2 * math.exp(-1 / temperature))
                + math.log(1 + 2 * math.exp(1 / temperature))) / 2
    assert loss_fn(emb, None, views(2)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_ntxent_matches_pytorch_metric_learning_value_and_gradient(temperature):
    # PML's NTXentLoss takes labels: the image ids (the two views of an image share one), so its
    # negatives are exactly the other rows.
    b = 16
    emb = torch.randn(2 * b, 8, generator=torch.Generator().manual_seed(6))
    image_ids = torch.arange(2 * b) % b
    ours, theirs = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ours_loss = NTXentLoss(temperature)(ours, None, views(b))
    theirs_loss = pml_losses.NTXentLoss(temperature=temperature)(theirs, image_ids)
    assert ours_loss.item() == pytest.approx(theirs_loss.item(), rel=1e-5, abs=1e-6)
    ours_loss.backward()
    theirs_loss.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4)


def test_ntxent_ignores_class_labels():
    emb = torch.randn(12, 4, generator=torch.Generator().manual_seed(7))
    loss_fn = NTXentLoss(0.1)
    reference = loss_fn(emb, None, views(6))
    for labels in (torch.zeros(12, dtype=torch.long), torch.arange(12) % 3,
                   torch.randperm(12, generator=torch.Generator().manual_seed(8))):
        assert torch.equal(loss_fn(emb, labels, views(6)), reference)


def test_ntxent_is_numerically_stable_at_a_tiny_temperature():
    emb = torch.randn(8, 4, generator=torch.Generator().manual_seed(9), requires_grad=True)
    loss = NTXentLoss(1e-4)(emb, None, views(4))  # logits up to 1e4: exp() alone overflows
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


def test_ntxent_at_collapse_is_log_2b_minus_1_whatever_the_temperature():
    # Every cosine is 1: each anchor's positive is 1 of 2B - 1 equal candidates.
    for b, temperature in ((2, 0.1), (4, 0.5), (16, 1.0)):
        loss = NTXentLoss(temperature)(torch.ones(2 * b, 3), None, views(b))
        assert loss.item() == pytest.approx(math.log(2 * b - 1), rel=1e-6)
    # Not a constant of the params (a short last step changes B), so not registered.
    assert LOSSES["ntxent"].collapsed_value is None


@pytest.mark.parametrize(("emb", "tuples", "message"), [
    (torch.zeros(4), views(2), r"expected embeddings \(N, D\), found \(4,\)"),
    (torch.zeros(4, 2), None, r"tuples of shape \(B, 2\) with B >= 2.*found None"),
    (torch.zeros(4, 2), torch.tensor([[0, 1, 2]]), r"found \(1, 3\)"),
    (torch.zeros(2, 2), torch.tensor([[0, 1]]), r"B >= 2.*found \(1, 2\)"),
    (torch.zeros(4, 2), torch.tensor([[0, 1], [1, 2]]), "distinct row"),
    (torch.zeros(4, 2), torch.tensor([[0, 1], [2, 4]]), r"distinct row in \[0, 4\)"),
])
def test_ntxent_rejects_bad_shapes_in_one_line(emb, tuples, message):
    with pytest.raises(ValueError, match=message) as error:
        NTXentLoss()(emb, None, tuples)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_ntxent_rejects_a_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NTXentLoss(temperature)


# --- the views sampler -------------------------------------------------------------------------


def test_view_batches_cover_every_image_once_per_epoch_in_steps_of_half_the_batch():
    steps = sampling.view_batches(40, 8, seed=3, epoch=1)
    assert [len(s) for s in steps] == [4] * 10
    assert sorted(np.concatenate(steps).tolist()) == list(range(40))
    # 22 images, 4 a step: a last step of 2 is kept (each has a negative) ...
    assert [len(s) for s in sampling.view_batches(22, 8, 3, 1)] == [4] * 5 + [2]
    # ... a last single image is dropped (it would have no negative).
    assert [len(s) for s in sampling.view_batches(21, 8, 3, 1)] == [4] * 5
    with pytest.raises(ValueError, match="batch_size must be >= 4"):
        sampling.view_batches(10, 3, 3, 1)


def test_view_batches_are_seeded_per_seed_and_epoch():
    def flat(seed, epoch):
        return np.concatenate(sampling.view_batches(50, 10, seed, epoch))

    np.testing.assert_array_equal(flat(1, 2), flat(1, 2))
    assert not np.array_equal(flat(1, 2), flat(1, 3))
    assert not np.array_equal(flat(1, 2), flat(2, 2))


def test_epoch_work_for_views_reads_no_labels_and_embeds_each_image_twice():
    cfg = TrainConfig(loss="ntxent", batch_size=8)
    train_idx = np.arange(100, 140)
    class_labels = np.arange(200) % 4
    no_call = lambda: pytest.fail("the views sampler embeds nothing to sample")  # noqa: E731
    work = training.epoch_work(cfg, train_idx, class_labels, 0, 1, no_call, cfg.batch_size)
    other = training.epoch_work(cfg, train_idx, np.zeros(200, dtype=np.int64), 0, 1, no_call,
                                cfg.batch_size)
    assert work.kind == "views"
    assert [s.tolist() for s in work.items] == [s.tolist() for s in other.items]
    # Two images of one class share steps: labels play no part in the order.
    assert any(len(np.unique(class_labels[s])) < len(s) for s in work.items)
    counts = np.zeros(200, dtype=int)
    for step in work.items:
        indices, tuples = training.step_inputs("views", step)
        assert len(indices) == cfg.batch_size  # batch_size rows: batch_size / 2 images, twice
        np.testing.assert_array_equal(indices[tuples[:, 0]], indices[tuples[:, 1]])
        np.add.at(counts, indices, 1)
    assert (counts[train_idx] == 2).all() and counts.sum() == 2 * len(train_idx)
    again = training.epoch_work(cfg, train_idx, class_labels, 0, 2, no_call, cfg.batch_size)
    assert [s.tolist() for s in again.items] != [s.tolist() for s in work.items]


def test_step_inputs_put_both_views_of_an_image_in_one_batch():
    indices, tuples = training.step_inputs("views", np.array([7, 8, 9]))
    assert indices.tolist() == [7, 8, 9, 7, 8, 9]
    assert tuples.tolist() == [[0, 3], [1, 4], [2, 5]]


# --- two different views -----------------------------------------------------------------------


def image_encoder(augment: bool = True) -> tuple[training.ImageEncoder, training.TrainingData]:
    torch.manual_seed(0)
    images, data = colour_classes()
    net = models.EmbeddingNet(config.ModelConfig(weights="none", **SMALL))
    return training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=augment),
                                 torch.device("cpu"), "fp32"), data


def test_batch_augment_draws_for_every_row_so_a_repeated_image_gets_two_views():
    augment = transforms.BatchAugment(32, config.AugmentConfig(enabled=True),
                                      transforms.NORMALIZATIONS["imagenet"])
    augment.reseed(0)
    image = colour_classes(n=4)[0].batch([0])  # (1, 3, S, S)
    out = augment(image.repeat(6, 1, 1, 1))  # one image six times in one batch
    flat = out.reshape(6, -1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(6) for j in range(i))


def test_the_two_views_of_each_image_in_a_step_differ_after_augmentation():
    encoder, data = image_encoder()
    encoder.reseed(rng.torch_epoch_seed(0, 1, rng.TorchStream.AUGMENT))
    step = training.epoch_work(TrainConfig(loss="ntxent", batch_size=16), data.train_idx,
                               data.labels, 0, 1, lambda: None, 16).items[0]
    indices, tuples = training.step_inputs("views", step)
    x = encoder.inputs(indices).reshape(len(indices), -1)  # what the network sees
    first, second = x[tuples[:, 0]], x[tuples[:, 1]]
    assert ((first - second).abs().amax(dim=1) > 0.1).all()
    # ... and so do their embeddings.
    z = encoder.project(indices).detach()
    assert ((z[tuples[:, 0]] - z[tuples[:, 1]]).norm(dim=1) > 1e-4).all()


def test_validation_views_are_the_same_every_call_and_differ_per_view():
    encoder, data = image_encoder()
    encoder.set_train(False)
    a = encoder.eval_views(data.val_idx, seed=5, batch_size=16)
    b = encoder.eval_views(data.val_idx, seed=5, batch_size=16)
    assert a.shape == (2, len(data.val_idx), 8)
    np.testing.assert_array_equal(a, b)  # fixed seed: every epoch scores the same inputs
    assert (np.linalg.norm(a[0] - a[1], axis=1) > 1e-4).all()
    # The training stream is left alone.
    encoder.reseed(1)
    before = encoder.augment.generator.get_state()
    encoder.eval_views(data.val_idx[:4], seed=5, batch_size=16)
    assert torch.equal(before, encoder.augment.generator.get_state())


def test_views_validation_loss_is_label_free_ntxent_in_training_sized_steps():
    z = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(10)).numpy()
    loss_fn = NTXentLoss(0.2)
    steps = sampling.view_batches(10, 8, 3, rng.VAL_EPOCH)  # 4 + 4 + 2 images
    expected = sum(len(s) * loss_fn(torch.from_numpy(np.concatenate([z[0][s], z[1][s]])), None,
                                    views(len(s))).item() for s in steps) / 10
    assert training.views_validation_loss(loss_fn, z, 8, 3) == pytest.approx(expected, rel=1e-6)


# --- params ------------------------------------------------------------------------------------


STAGES = ("train_frozen", "train_unfrozen")


def run_stage_check(stage: str, raw: dict, monkeypatch) -> None:
    """Run the stage's main() on these params: it must stop at its check, before any work
    (load_params and the split table are replaced; no model is built, no image decoded)."""
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", REPO / "stages" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.config, "load_params", lambda: params_from_dict(raw))
    table = pd.DataFrame({"label": list("abcd") * 10, "split": ["train"] * 40})
    monkeypatch.setattr(module.data, "load_split_table", lambda *a, **k: table)
    monkeypatch.setattr(module.runtime, "resolve_device",
                        lambda *a, **k: pytest.fail("the params check came after work started"))
    module.main()


@pytest.mark.parametrize("stage", STAGES)
def test_each_training_stage_refuses_ntxent_without_its_augmentation(stage, monkeypatch):
    raw = {"train": {"loss": "ntxent"}, stage: {"augment": {"enabled": False}}}
    with pytest.raises(ParamsError) as error:
        run_stage_check(stage, raw, monkeypatch)
    message = str(error.value)
    assert message.startswith(f"{stage}.augment.enabled is false, but train.loss 'ntxent'")
    assert f"set {stage}.augment.enabled: true in params.yaml" in message
    assert "\n" not in message and isinstance(error.value, UserError)


@pytest.mark.parametrize(("raw", "message"), [
    ({"batch_size": 6}, None),
    ({"batch_size": 4}, None),
    ({"batch_size": 2}, "train.batch_size (2) must be even and >= 4 for train.loss 'ntxent'"),
    ({"batch_size": 7}, "train.batch_size (7) must be even and >= 4"),
])
def test_ntxent_batch_size_must_be_even_and_hold_two_images(raw, message):
    params = params_from_dict({"train": {"loss": "ntxent", **raw},
                               "train_frozen": {"augment": {"enabled": True}}})
    check = lambda: losses.check_params(  # noqa: E731
        params.train, augment=params.train_frozen.augment, augment_key="train_frozen.augment")
    if message is None:
        check()
        return
    with pytest.raises(ParamsError) as error:
        check()
    assert message in str(error.value) and "change train.batch_size" in str(error.value)
    assert "\n" not in str(error.value)


def test_ntxent_refuses_an_augmentation_that_changes_no_image():
    identity = config.AugmentConfig(enabled=True, crop_scale_min=1.0, flip=False,
                                    color_jitter=0.0)
    with pytest.raises(ParamsError, match="train_unfrozen.augment changes no image"):
        losses.check_params(TrainConfig(loss="ntxent"), augment=identity,
                            augment_key="train_unfrozen.augment")
    # The default augmentations of both stages pass once enabled.
    params = params_from_dict({"train": {"loss": "ntxent"},
                               "train_frozen": {"augment": {"enabled": True}}})
    for stage in STAGES:
        losses.check_params(params.train, augment=getattr(params, stage).augment)


def test_other_losses_do_not_need_augmentation():
    off = config.AugmentConfig(enabled=False)
    for name, spec in LOSSES.items():
        if spec.sampler != "views":
            losses.check_params(TrainConfig(loss=name), augment=off)


def test_fit_refuses_ntxent_through_an_encoder_without_augmentation():
    net, encoder, data = frozen_problem("ntxent")
    optimizer = training.build_optimizer(net, "adam", 1e-3, 0.0, 0.9)
    with pytest.raises(UserError, match="needs two different augmentations"):
        training.fit(net, encoder, optimizer, data, train_config("ntxent"), epochs=1, seed=0)


# --- a real fit --------------------------------------------------------------------------------


def test_ntxent_trains_the_whole_network_on_images(tmp_path):
    encoder, data = image_encoder()
    net = encoder.net
    optimizer = training.build_optimizer(net, "adam", 3e-3, 0.0, 0.9)
    result = training.fit(net, encoder, optimizer, data,
                          train_config("ntxent", batch_size=16, temperature=0.2),
                          epochs=3, seed=0,
                          resume=training.ResumeSpec(tmp_path / "r.pt", "fingerprint"))
    history = result.history.set_index("epoch")
    assert list(history.index) == [0, 1, 2, 3]
    assert history.loc[3, "train_loss"] < history.loc[1, "train_loss"]
    assert result.best_epoch > 0 and result.best_val_loss < history.loc[0, "val_loss"]
    # NT-Xent with 16 rows a step starts near its collapse value, log(15) = 2.71.
    assert history.loc[0, "val_loss"] == pytest.approx(math.log(15), abs=0.5)
    assert history.loc[1, "mean_negative_distance"] > history.loc[1, "mean_positive_distance"]
    assert math.isnan(history.loc[1, "active_fraction"])  # no hinge: nothing to count
    assert not history["collapse_alarm"].any()
    assert not (tmp_path / "r.pt").exists()
