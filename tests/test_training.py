"""The training loop on small in-memory problems: it learns, it resumes, it stops on NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval import config, models, training
from retrieval.cache import ImageCache


def colour_classes(n: int = 160, classes: int = 4, side: int = 37, seed: int = 0):
    """Images whose class is their mean colour: separable, so training must solve it."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    colours = rng.integers(30, 225, size=(classes, 3))
    noise = rng.normal(0, 30, size=(n, 3, side, side))
    images = (colours[labels][:, :, None, None] + noise).clip(0, 255).astype(np.uint8)
    order = rng.permutation(n)
    return ImageCache(images), labels, np.sort(order[: n * 3 // 4]), np.sort(order[n * 3 // 4:])


def fit_tiny(tmp_path, loss="contrastive", epochs=3, resume_name="r.pt", **train):
    torch.manual_seed(0)
    images, labels, train_idx, val_idx = colour_classes()
    net = models.EmbeddingNet(config.ModelConfig(backbone="cifar_resnet", cifar_n=1,
                                                 hidden_dim=16, embedding_dim=8),
                              num_classes=4 if loss == "cross_entropy" else 0)
    encoder = training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=False),
                                    torch.device("cpu"), "fp32")
    cfg = config.TrainConfig(loss=loss, pairs_per_epoch=128, val_pairs=60, batch_size=16,
                             threshold_criterion="accuracy", **train)
    optimizer = training.build_optimizer(net, "adam", 3e-3, 0.0, 0.9)
    return training.fit(net, encoder, optimizer, train_idx, val_idx, labels, cfg, epochs, 0,
                        tmp_path / resume_name, "fingerprint"), net


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "supcon", "inbatch_contrastive",
                                  "cross_entropy"])
def test_every_loss_trains_end_to_end(tmp_path, loss):
    result, _ = fit_tiny(tmp_path, loss=loss, epochs=2)
    history = result.history.set_index("epoch")
    assert result.best_epoch > 0  # training improved on the untrained model (epoch 0)
    assert history.loc[result.best_epoch, "val_loss"] < history.loc[0, "val_loss"]
    assert history.loc[result.best_epoch, "val_accuracy"] >= 0.8
    assert not (tmp_path / "r.pt").exists()  # finished: the resume state is removed


def test_history_has_the_per_epoch_columns_dvc_plots_reads(tmp_path):
    result, _ = fit_tiny(tmp_path, epochs=2)
    for column in ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy",
                   "train_precision", "val_recall", "val_f1", "lr", "active_fraction",
                   "mean_positive_distance", "mean_negative_distance", "collapse_alarm"):
        assert column in result.history
    assert list(result.history["epoch"]) == [0, 1, 2]


def test_hard_negative_mining_records_mined_distances(tmp_path):
    result, _ = fit_tiny(tmp_path, loss="triplet", epochs=1, negatives="hard", mining_k=5)
    assert "mined_negative_distance_p50" in result.history


def test_resuming_after_an_interruption_gives_the_same_result(tmp_path):
    straight, _ = fit_tiny(tmp_path, epochs=3, resume_name="a.pt")

    calls = {"n": 0}
    original = training.save_resume_state

    def crash_after_first_epoch(path, state):
        original(path, state)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    training.save_resume_state = crash_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_tiny(tmp_path, epochs=3, resume_name="b.pt")
    finally:
        training.save_resume_state = original
    assert (tmp_path / "b.pt").exists()
    resumed, _ = fit_tiny(tmp_path, epochs=3, resume_name="b.pt")
    assert resumed.resumed_from_epoch == 1
    cols = ["val_loss", "val_accuracy", "train_loss"]
    np.testing.assert_allclose(resumed.history[cols].to_numpy(dtype=float),
                               straight.history[cols].to_numpy(dtype=float), rtol=1e-5)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    images, labels, train_idx, val_idx = colour_classes()
    net = models.EmbeddingNet(config.ModelConfig(backbone="cifar_resnet", cifar_n=1,
                                                 hidden_dim=16, embedding_dim=8))
    encoder = training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=False),
                                    torch.device("cpu"), "fp32")
    with torch.no_grad():
        net.head[0].weight.fill_(float("nan"))
    cfg = config.TrainConfig(pairs_per_epoch=32, val_pairs=20, batch_size=16)
    optimizer = training.build_optimizer(net, "adam", 1e-3, 0.0, 0.9)
    with pytest.raises(training.NonFiniteLossError, match="non-finite"):
        training.fit(net, encoder, optimizer, train_idx, val_idx, labels, cfg, 2, 0,
                     tmp_path / "n.pt", "f")


def fit_linear_head(tmp_path, lr: float, epochs: int, patience: int, on_epoch=None):
    """A frozen trunk and a head without BatchNorm: at lr 0 every epoch scores the same."""
    torch.manual_seed(0)
    images, labels, train_idx, val_idx = colour_classes()
    net = models.EmbeddingNet(config.ModelConfig(backbone="cifar_resnet", cifar_n=1,
                                                 hidden_dim=16, embedding_dim=8,
                                                 batchnorm=False))
    net.trunk.requires_grad_(False)
    encoder = training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=False),
                                    torch.device("cpu"), "fp32", frozen_trunk=True)
    cfg = config.TrainConfig(pairs_per_epoch=64, val_pairs=40, batch_size=16,
                             early_stopping_patience=patience)
    optimizer = training.build_optimizer(net, "adam", lr, 0.0, 0.9)
    result = training.fit(net, encoder, optimizer, train_idx, val_idx, labels, cfg, epochs, 0,
                          tmp_path / "r.pt", "f",
                          on_epoch=(lambda e, row: on_epoch(e, optimizer)) if on_epoch else None)
    return result


def test_patience_starts_once_training_beats_the_start_model(tmp_path):
    # Never better than epoch 0 (lr 0): a fine-tuning dip, so no early stop; all epochs run.
    stuck = fit_linear_head(tmp_path, lr=0.0, epochs=4, patience=1)
    assert stuck.stopped == "epochs" and stuck.best_epoch == 0
    assert list(stuck.history["epoch"]) == [0, 1, 2, 3, 4]

    def freeze_after_first_epoch(epoch, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    # Better at epoch 1, then flat: patience 2 counts epochs 2 and 3 and stops before 4.
    improved = fit_linear_head(tmp_path, lr=3e-3, epochs=6, patience=2,
                               on_epoch=freeze_after_first_epoch)
    assert improved.best_epoch == 1 and improved.stopped == "early_stopping"
    assert list(improved.history["epoch"]) == [0, 1, 2, 3]


def test_non_finite_loss_keeps_the_best_weights_so_far(tmp_path):
    images, labels, train_idx, val_idx = colour_classes()
    torch.manual_seed(0)
    net = models.EmbeddingNet(config.ModelConfig(backbone="cifar_resnet", cifar_n=1,
                                                 hidden_dim=16, embedding_dim=8))
    encoder = training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=False),
                                    torch.device("cpu"), "fp32")
    cfg = config.TrainConfig(pairs_per_epoch=64, val_pairs=20, batch_size=16)
    optimizer = training.build_optimizer(net, "adam", 1e-3, 0.0, 0.9)
    good = {}

    def poison_after_first_epoch(epoch, row):
        good.update({k: v.clone() for k, v in net.state_dict().items()})
        with torch.no_grad():
            net.head[0].weight.fill_(float("nan"))

    saved = []
    with pytest.raises(training.NonFiniteLossError, match="epoch 2"):
        training.fit(net, encoder, optimizer, train_idx, val_idx, labels, cfg, 3, 0,
                     tmp_path / "n.pt", "f", on_epoch=poison_after_first_epoch,
                     save_best=lambda state, epoch, row: saved.append((state, epoch)))
    assert len(saved) == 1
    state, epoch = saved[0]
    assert epoch in (0, 1) and set(state) == set(net.state_dict())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    if epoch == 1:
        assert all(torch.equal(state[k], good[k]) for k in good)


def test_a_frozen_trunk_is_not_copied_but_the_result_is_whole(tmp_path):
    images, labels, train_idx, val_idx = colour_classes()
    torch.manual_seed(0)
    net = models.EmbeddingNet(config.ModelConfig(backbone="cifar_resnet", cifar_n=1,
                                                 hidden_dim=16, embedding_dim=8))
    net.trunk.requires_grad_(False)
    trunk_before = {k: v.clone() for k, v in net.trunk.state_dict().items()}
    assert set(training._snapshot_function(net)()) == {
        k for k in net.state_dict() if not k.startswith("trunk.")}
    encoder = training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=False),
                                    torch.device("cpu"), "fp32", frozen_trunk=True)
    cfg = config.TrainConfig(pairs_per_epoch=64, val_pairs=20, batch_size=16)
    optimizer = training.build_optimizer(net, "adam", 3e-3, 0.0, 0.9)
    result = training.fit(net, encoder, optimizer, train_idx, val_idx, labels, cfg, 2, 0,
                          tmp_path / "r.pt", "f")
    assert set(result.best_state) == set(net.state_dict())
    assert all(torch.equal(result.best_state["trunk." + k], v) for k, v in trunk_before.items())


def test_frozen_feature_cache_equals_fresh_backbone_features():
    torch.manual_seed(0)
    images, labels, train_idx, _ = colour_classes(n=24)
    net = models.EmbeddingNet(config.ModelConfig(backbone="cifar_resnet", cifar_n=1)).eval()
    cached = training.frozen_features(net, images, train_idx, 32, torch.device("cpu"), "fp32")
    from retrieval import transforms

    with torch.no_grad():
        fresh = net.features(transforms.normalize(
            transforms.eval_crop(32)(images.batch(train_idx)), net.normalization))
    np.testing.assert_allclose(cached, fresh.numpy(), rtol=1e-5, atol=1e-5)
