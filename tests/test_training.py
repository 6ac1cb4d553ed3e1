"""The training loop on small in-memory problems: it learns, it resumes, it stops on NaN.

Most cases train only the head, on random class-clustered "backbone features" through
``FrozenEncoder`` (an epoch takes milliseconds); one CNN case per sampler kind (pairs, triplets,
batches) runs the whole network on images through ``ImageEncoder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from retrieval import config, losses, models, training
from retrieval.cache import ImageCache

REPO = Path(__file__).resolve().parents[1]
SMALL = {"backbone": "cifar_resnet", "cifar_n": 1, "hidden_dim": 16, "embedding_dim": 8}


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels 0..3 in turn, and a seeded 3/4 train, 1/4 val split of the n rows."""
    order = np.random.default_rng(seed).permutation(n)
    return np.arange(n) % 4, np.sort(order[: n * 3 // 4]), np.sort(order[n * 3 // 4:])


def colour_classes(n: int = 160, side: int = 37, seed: int = 0):
    """Images whose class is their mean colour: separable, so training must solve it."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    colours = rng.integers(30, 225, size=(4, 3))
    noise = rng.normal(0, 30, size=(n, 3, side, side))
    images = (colours[labels][:, :, None, None] + noise).clip(0, 255).astype(np.uint8)
    order = rng.permutation(n)
    return ImageCache(images), training.TrainingData(
        labels, ["a", "b", "c", "d"], np.sort(order[: n * 3 // 4]), np.sort(order[n * 3 // 4:]))


def frozen_problem(loss: str = "contrastive", n: int = 160, seed: int = 0, **model):
    """A head on a frozen trunk, fed random features clustered by class (noise 2x the
    spread of the class centres): separable, but not before the head learns."""
    torch.manual_seed(seed)
    spec = losses.LOSSES[loss]
    net = models.EmbeddingNet(config.ModelConfig(weights="none", **{**SMALL, **model}),
                              num_classes=4 if spec.needs_classifier else 0)
    net.trunk.requires_grad_(False)
    labels, train_idx, val_idx = split(n, seed)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(4, net.feature_dim))
    features = centres[labels] + rng.normal(0, 2.0, size=(n, net.feature_dim))
    encoder = training.FrozenEncoder(net, torch.from_numpy(features.astype(np.float32)),
                                     torch.device("cpu"))
    return net, encoder, training.TrainingData(labels, ["a", "b", "c", "d"], train_idx, val_idx)


def train_config(loss: str = "contrastive", **train) -> config.TrainConfig:
    return config.TrainConfig(**{"loss": loss, "pairs_per_epoch": 128, "val_pairs": 60,
                                 "batch_size": 16, "threshold_criterion": "accuracy", **train})


def fit_frozen(tmp_path, loss="contrastive", epochs=3, resume_name="r.pt", lr=3e-3,
               model: dict | None = None, on_epoch=None, save_best=None, **train):
    net, encoder, data = frozen_problem(loss, **(model or {}))
    optimizer = training.build_optimizer(net, "adam", lr, 0.0, 0.9)
    resume = training.ResumeSpec(tmp_path / resume_name, "fingerprint") if resume_name else None
    result = training.fit(net, encoder, optimizer, data, train_config(loss, **train),
                          epochs=epochs, seed=0, resume=resume,
                          on_epoch=on_epoch and (lambda e, row: on_epoch(e, row, net, optimizer)),
                          save_best=save_best)
    return result, net


def fit_cnn(tmp_path, loss="contrastive", epochs=2, **train):
    torch.manual_seed(0)
    images, data = colour_classes()
    net = models.EmbeddingNet(config.ModelConfig(weights="none", **SMALL),
                              num_classes=training.classifier_classes(train_config(loss), data))
    encoder = training.ImageEncoder(net, images, 32, config.AugmentConfig(enabled=False),
                                    torch.device("cpu"), "fp32")
    optimizer = training.build_optimizer(net, "adam", 3e-3, 0.0, 0.9)
    return training.fit(net, encoder, optimizer, data, train_config(loss, **train),
                        epochs=epochs, seed=0,
                        resume=training.ResumeSpec(tmp_path / "r.pt", "fingerprint"))


def assert_learned(result, min_accuracy: float) -> None:
    history = result.history.set_index("epoch")
    assert result.best_epoch > 0  # training improved on the untrained model (epoch 0)
    assert history.loc[result.best_epoch, "val_loss"] < history.loc[0, "val_loss"]
    assert history.loc[result.best_epoch, "val_accuracy"] >= min_accuracy


# --- the whole network, one case per sampler kind ------------------------------------------------

@pytest.mark.parametrize(("loss", "train"), [
    ("contrastive", {}),  # pairs
    ("triplet", {"negatives": "hard", "mining_k": 5}),  # triplets, mined under the current model
    ("cross_entropy", {}),  # class-balanced batches, through the classifier
])
def test_one_loss_per_sampler_kind_trains_the_whole_network(tmp_path, loss, train):
    result = fit_cnn(tmp_path, loss, **train)
    assert_learned(result, 0.8)
    assert not (tmp_path / "r.pt").exists()  # finished: the resume state is removed
    if loss == "triplet":
        assert "mined_negative_distance_p50" in result.history


# --- the head on frozen features ----------------------------------------------------------------

@pytest.mark.parametrize(("loss", "train"), [
    # ntxent's views need augmentation, which frozen features lack (tests/test_ntxent.py).
    *[(name, {}) for name, spec in losses.LOSSES.items() if spec.sampler != "views"],
    ("contrastive", {"hard_pairs": True}),
    ("triplet", {"negatives": "random"}),
])
def test_every_loss_and_sampler_option_trains_the_head(tmp_path, loss, train):
    result, _ = fit_frozen(tmp_path, loss, epochs=3, **train)
    assert_learned(result, 0.9)
    assert not (tmp_path / "r.pt").exists()


def test_a_new_loss_is_one_registry_entry(tmp_path, monkeypatch):
    # Registered here and nowhere else: params validation accepts it and fit trains with it.
    monkeypatch.setitem(losses.LOSSES, "half_margin_contrastive", losses.LossSpec(
        lambda c: losses.ContrastiveLoss(c.margin / 2), "pairs"))
    params = config.params_from_dict({"train": {"loss": "half_margin_contrastive"}})
    assert params.train.loss == "half_margin_contrastive"
    result, _ = fit_frozen(tmp_path, "half_margin_contrastive")
    assert_learned(result, 0.9)


def test_history_has_the_per_epoch_columns_dvc_plots_reads(tmp_path):
    result, _ = fit_frozen(tmp_path, epochs=2)
    for column in ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy",
                   "train_precision", "val_recall", "val_f1", "lr", "active_fraction",
                   "mean_positive_distance", "mean_negative_distance", "collapse_alarm"):
        assert column in result.history
    assert list(result.history["epoch"]) == [0, 1, 2]
    epoch_1 = result.history.set_index("epoch").loc[1]
    assert 0 < epoch_1["active_fraction"] <= 1
    assert epoch_1["mean_negative_distance"] > epoch_1["mean_positive_distance"] > 0


def plotted_history_columns() -> set[str]:
    """The history.csv columns that dvc.yaml's top-level plots draw, and those curves.png
    draws (train and val of each panel, and the learning rate)."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    columns = {"lr", *(f"{split}_{name}" for split in ("train", "val")
                       for name in ("loss", "accuracy", "precision", "recall", "f1"))}
    for plot in plots:
        for spec in plot.values():
            for file, y in spec["y"].items():
                if file.endswith("history.csv"):
                    columns.update([y] if isinstance(y, str) else y)
    return columns


def test_every_plotted_series_has_a_value_at_every_epoch(tmp_path):
    result, _ = fit_frozen(tmp_path, "triplet", epochs=2, negatives="hard", mining_k=5)
    columns = plotted_history_columns()
    assert {"train_loss", "val_loss", "train_accuracy", "lr"} <= columns
    plotted = result.history[sorted(columns)]
    assert np.isfinite(plotted.to_numpy(dtype=float)).all(), plotted.T


def lr_0_history(images: bool) -> training.FitResult:
    """Two epochs at lr 0 (the weights never change) with BatchNorm in the head; ``images``:
    the whole network on augmented images with dropout, else the head on frozen features."""
    torch.manual_seed(0)
    if images:
        cache, data = colour_classes()
        net = models.EmbeddingNet(config.ModelConfig(weights="none", **SMALL, dropout=0.3))
        encoder = training.ImageEncoder(net, cache, 32, config.AugmentConfig(enabled=True),
                                        torch.device("cpu"), "fp32")
    else:
        net, encoder, data = frozen_problem("triplet")
    optimizer = training.build_optimizer(net, "adam", 0.0, 0.0, 0.9)
    return training.fit(net, encoder, optimizer, data,
                        train_config("triplet", negatives="hard", mining_k=5), epochs=2, seed=0)


@pytest.mark.parametrize("images", [False, True], ids=["frozen_features", "augmented_images"])
def test_epoch_0_train_loss_is_the_loss_the_first_epoch_starts_from(images):
    # At lr 0 epoch 1 takes its steps through the starting weights: the same steps, the same
    # augmentation and dropout draws, so its training loss and step statistics are epoch 0's.
    history = lr_0_history(images).history.set_index("epoch")
    step_columns = ["train_loss", "active_fraction", "mean_positive_distance",
                    "mean_negative_distance"]
    np.testing.assert_allclose(history.loc[0, step_columns].to_numpy(dtype=float),
                               history.loc[1, step_columns].to_numpy(dtype=float), rtol=1e-6)
    assert history.loc[0, "train_loss"] > 0


def test_the_epoch_0_training_loss_leaves_the_model_as_it_found_it():
    # Training mode moves BatchNorm's running statistics; fit puts the start weights back, so
    # epoch 0 measures the model without changing it (and epoch 1 starts from it).
    net, encoder, data = frozen_problem("triplet")
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = training.build_optimizer(net, "adam", 3e-3, 0.0, 0.9)
    result = training.fit(net, encoder, optimizer, data, train_config("triplet"), epochs=0,
                          seed=0)
    assert list(result.history["epoch"]) == [0] and result.history["train_loss"].notna().all()
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_step_inputs_embed_every_tuple_in_one_batch():
    pairs = np.array([[10, 11, 1], [12, 13, 0]])  # [i, j, same]
    indices, tuples = training.step_inputs("pairs", pairs)
    assert indices.tolist() == [10, 12, 11, 13] and tuples.tolist() == [[0, 2], [1, 3]]
    triplets = np.array([[1, 2, 3], [4, 5, 6]])
    indices, tuples = training.step_inputs("triplets", triplets)
    assert indices.tolist() == [1, 4, 2, 5, 3, 6] and tuples.tolist() == [[0, 2, 4], [1, 3, 5]]
    indices, tuples = training.step_inputs("batches", np.array([7, 8, 9]))
    assert indices.tolist() == [7, 8, 9] and tuples is None


def test_resuming_after_an_interruption_gives_the_same_result(tmp_path, monkeypatch):
    straight, _ = fit_frozen(tmp_path, epochs=3, resume_name="a.pt")

    calls = {"n": 0}
    original = training.save_resume_state

    def crash_after_first_epoch(path, state):
        original(path, state)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_resume_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit_frozen(tmp_path, epochs=3, resume_name="b.pt")
    monkeypatch.setattr(training, "save_resume_state", original)
    assert (tmp_path / "b.pt").exists()
    resumed, _ = fit_frozen(tmp_path, epochs=3, resume_name="b.pt")
    assert resumed.resumed_from_epoch == 1
    cols = ["val_loss", "val_accuracy", "train_loss"]
    np.testing.assert_allclose(resumed.history[cols].to_numpy(dtype=float),
                               straight.history[cols].to_numpy(dtype=float), rtol=1e-5)
    assert (resumed.best_epoch, resumed.threshold) == (straight.best_epoch, straight.threshold)
    assert all(torch.equal(resumed.best_state[k], v) for k, v in straight.best_state.items())


def test_best_round_trips_through_the_resume_file_format():
    best = training.Best(0.5, 2, 0.9, {"w": torch.ones(2)}, {"epoch": 2})
    again = training.Best.from_state(best.to_state())
    assert (again.loss, again.epoch, again.threshold, again.row) == (0.5, 2, 0.9, {"epoch": 2})
    # A resume file written before Best existed has no "row" at epoch 0.
    old = training.Best.from_state({"loss": 1.0, "epoch": 0, "state": {}, "threshold": 1.0})
    assert old.row == {} and old.epoch == 0


def test_without_a_resume_spec_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, _ = fit_frozen(tmp_path, epochs=1, resume_name=None)
    assert result.resumed_from_epoch == 0 and list(tmp_path.iterdir()) == []


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    net, encoder, data = frozen_problem()
    with torch.no_grad():
        net.head[0].weight.fill_(float("nan"))
    optimizer = training.build_optimizer(net, "adam", 1e-3, 0.0, 0.9)
    with pytest.raises(training.NonFiniteLossError, match="non-finite"):
        training.fit(net, encoder, optimizer, data, train_config(), epochs=2, seed=0)


def test_patience_starts_once_training_beats_the_start_model(tmp_path):
    no_batchnorm = {"batchnorm": False}  # so that at lr 0 every epoch scores exactly the same
    # Never better than epoch 0 (lr 0): a fine-tuning dip, so no early stop; all epochs run.
    stuck, _ = fit_frozen(tmp_path, lr=0.0, epochs=4, model=no_batchnorm,
                          early_stopping_patience=1)
    assert stuck.stopped == "epochs" and stuck.best_epoch == 0
    assert list(stuck.history["epoch"]) == [0, 1, 2, 3, 4]

    def freeze_after_first_epoch(epoch, row, net, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    # Better at epoch 1, then flat: patience 2 counts epochs 2 and 3 and stops before 4.
    improved, _ = fit_frozen(tmp_path, lr=3e-3, epochs=6, model=no_batchnorm,
                             early_stopping_patience=2, on_epoch=freeze_after_first_epoch)
    assert improved.best_epoch == 1 and improved.stopped == "early_stopping"
    assert list(improved.history["epoch"]) == [0, 1, 2, 3]


def test_non_finite_loss_keeps_the_best_weights_so_far(tmp_path):
    good = {}

    def poison_after_first_epoch(epoch, row, net, optimizer):
        good.update({k: v.clone() for k, v in net.state_dict().items()})
        with torch.no_grad():
            net.head[0].weight.fill_(float("nan"))

    saved = []
    with pytest.raises(training.NonFiniteLossError, match="epoch 2"):
        fit_frozen(tmp_path, epochs=3, on_epoch=poison_after_first_epoch,
                   save_best=lambda state, epoch, row: saved.append((state, epoch, row)))
    assert len(saved) == 1
    state, epoch, row = saved[0]
    # The head improves on the start model in its first epoch (as every loss does in the test
    # above), so the best weights are epoch 1's, exactly as they were before the poisoning.
    assert epoch == 1 and row["epoch"] == 1
    assert set(state) == set(good)
    assert all(torch.equal(state[k], good[k]) for k in good)


def test_a_frozen_trunk_is_not_copied_but_the_result_is_whole(tmp_path):
    net, encoder, data = frozen_problem()
    trunk_before = {k: v.clone() for k, v in net.trunk.state_dict().items()}
    assert set(training._snapshot_function(net)()) == {
        k for k in net.state_dict() if not k.startswith("trunk.")}
    optimizer = training.build_optimizer(net, "adam", 3e-3, 0.0, 0.9)
    result = training.fit(net, encoder, optimizer, data, train_config(), epochs=2, seed=0)
    assert set(result.best_state) == set(net.state_dict())
    assert all(torch.equal(result.best_state["trunk." + k], v) for k, v in trunk_before.items())


def test_classifier_classes_follow_the_registry():
    _, data = colour_classes(n=8)
    assert training.classifier_classes(train_config("cross_entropy"), data) == 4
    assert training.classifier_classes(train_config("supcon"), data) == 0


def test_frozen_feature_cache_equals_fresh_backbone_features():
    torch.manual_seed(0)
    images, data = colour_classes(n=24)
    net = models.EmbeddingNet(config.ModelConfig(weights="none",
                                                 backbone="cifar_resnet", cifar_n=1)).eval()
    cached = training.frozen_features(net, images, data.train_idx, 32, torch.device("cpu"),
                                      "fp32")
    from retrieval import transforms

    with torch.no_grad():
        fresh = net.features(transforms.normalize(
            transforms.eval_crop(32)(images.batch(data.train_idx)), net.normalization))
    np.testing.assert_allclose(cached, fresh.numpy(), rtol=1e-5, atol=1e-5)


def test_an_unnormalised_model_trains_and_validates_on_its_raw_embedding():
    from retrieval import losses
    from retrieval.config import ModelConfig

    net = models.EmbeddingNet(ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1,
                                          hidden_dim=8, embedding_dim=2, normalize=False))
    z = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    spec = losses.loss_spec("inbatch_contrastive")
    torch.testing.assert_close(training.loss_inputs(spec, net, z), z)  # the loss sees raw z
    np.testing.assert_allclose(training.embedding_space(net, z.numpy()), z.numpy())
    # Validation pairs are measured where the loss measures them: |(3, 4) - (0, 0.5)|.
    distances = training.pair_distances({7: z[0].numpy(), 9: z[1].numpy()}, np.array([[7, 9, 0]]))
    np.testing.assert_allclose(distances, [np.hypot(3, 3.5)], rtol=1e-6)
    unit = models.EmbeddingNet(ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1,
                                           hidden_dim=8, embedding_dim=2))
    np.testing.assert_allclose(training.embedding_space(unit, z.numpy()),
                               [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


def test_a_resume_state_is_keyed_on_the_training_code_as_well_as_params_and_data(tmp_path):
    import types

    module = types.SimpleNamespace(__file__=str(tmp_path / "step.py"))
    (tmp_path / "step.py").write_text("loss = 1\n")
    before = training.source_digest(module)
    (tmp_path / "step.py").write_text("loss = 2\n")
    assert training.source_digest(module) != before
    # Same params and data, so the same plain fingerprint, but the resume key also names the code.
    assert training.resume_fingerprint({"lr": 1e-3}, "images") == \
        training.resume_fingerprint({"lr": 1e-3}, "images")
    assert training.resume_fingerprint({"lr": 1e-3}, "images") != \
        training.fingerprint({"lr": 1e-3}, "images")
    assert training.resume_fingerprint({"lr": 1e-3}, "images") != \
        training.resume_fingerprint({"lr": 3e-3}, "images")
