"""The embedding network: shapes, depth, pooling, frozen split, checkpoints, weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval import models
from retrieval.config import ModelConfig
from retrieval.outputs import UserError

TINY = ModelConfig(weights="none",
                   backbone="cifar_resnet", cifar_n=1, hidden_dim=16, embedding_dim=8)


def test_embeddings_are_unit_length_with_the_configured_dimension():
    torch.manual_seed(0)
    net = models.EmbeddingNet(TINY).eval()
    out = net(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("n", [1, 3])
def test_cifar_resnet_has_6n_plus_2_weight_layers(n):
    net = models.EmbeddingNet(ModelConfig(weights="none",
                                          backbone="cifar_resnet", cifar_n=n, head="none"))
    convs = [m for m in net.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    # 1 stem conv + 3 groups x n blocks x 2 convs; the classifier layer makes 6n+2.
    assert len(convs) + 1 == 6 * n + 2
    assert net.feature_dim == 128 and net.embedding_dim == 128


def test_resnet50_head_is_2048_512_128():
    net = models.EmbeddingNet(ModelConfig(weights="none", backbone="resnet50"))
    linears = [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 512), (512, 128)]
    assert net.target_layer is dict(net.trunk.named_children())["layer4"]


def test_gem_interpolates_between_average_and_max():
    maps = torch.rand(2, 4, 5, 5)
    gem = models.GeM(p=1.0)
    torch.testing.assert_close(gem(maps), maps.clamp(min=1e-6).mean(dim=(2, 3)))
    gem.p.data.fill_(200.0)
    torch.testing.assert_close(gem(maps), maps.amax(dim=(2, 3)), atol=0.05, rtol=0)


@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_frozen_split_recomposes_the_full_network(pooling):
    torch.manual_seed(0)
    net = models.EmbeddingNet(ModelConfig(weights="none",
                                          backbone="cifar_resnet", cifar_n=1, pooling=pooling,
                                          hidden_dim=16, embedding_dim=8)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.from_frozen(net.frozen_features(x)), net(x))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = models.EmbeddingNet(TINY).eval()
    models.save_checkpoint(tmp_path / "best.pt", net, {"epoch": 3, "threshold": 0.7,
                                                       "classes": ["a", "b"]})
    loaded, checkpoint = models.load_model(tmp_path / "best.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert checkpoint["epoch"] == 3 and checkpoint["classes"] == ["a", "b"]
    # Plain tensors and primitives: weights_only loading works without our code.
    assert torch.load(tmp_path / "best.pt", weights_only=True)["threshold"] == 0.7


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": np.random.default_rng(0)}, path)
    with pytest.raises(UserError, match="refusing to load"):
        models.load_model(path)


def test_missing_or_wrong_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.EmbeddingNet(ModelConfig(backbone="resnet18", weights=str(tmp_path / "no.pt")))
    wrong = tmp_path / "resnet50.pt"
    torch.save(models.EmbeddingNet(ModelConfig(weights="none",
                                               backbone="cifar_resnet")).trunk.state_dict(),
               wrong)
    with pytest.raises(UserError, match="does not hold resnet18 weights"):
        models.EmbeddingNet(ModelConfig(backbone="resnet18", weights=str(wrong)))


def test_local_state_dict_weights_are_loaded(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    net = models.EmbeddingNet(ModelConfig(backbone="resnet18", weights=str(tmp_path / "r18.pt")))
    torch.testing.assert_close(net.trunk.conv1.weight, reference.conv1.weight)


def test_unfreeze_from_freezes_earlier_stages():
    net = models.EmbeddingNet(ModelConfig(weights="none", backbone="resnet18"))
    models.set_trunk_trainable(net, "layer3")
    trainable = {name for name, m in net.backbone_stages()
                 if any(p.requires_grad for p in m.parameters())}
    assert trainable == {"layer3", "layer4"}
    with pytest.raises(UserError, match="unfreeze_from"):
        models.set_trunk_trainable(models.EmbeddingNet(TINY), "layer4")


def test_model_normalize_chooses_unit_or_raw_embeddings():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for normalize in (True, False):
        net = models.EmbeddingNet(ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1,
                                              hidden_dim=8, embedding_dim=2,
                                              normalize=normalize)).eval()
        with torch.no_grad():
            raw, embedding = net(x, normalize=False), net(x)
        expected = torch.nn.functional.normalize(raw, dim=1) if normalize else raw
        torch.testing.assert_close(embedding, expected)
        torch.testing.assert_close(net.embedding(raw), expected)
