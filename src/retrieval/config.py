"""Typed, validated parameters.

params.yaml is read once per stage into these dataclasses. Every key is checked before any work
starts: unknown keys (typos) and wrong types are rejected by name, and values are range-checked, so
a bad experiment fails in a second with a message that says which key to change.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from retrieval.outputs import UserError
from retrieval.workspace import resolve


class ParamsError(UserError):
    """A parameter in params.yaml is missing, unknown, of the wrong type or out of range."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ParamsError(f"{key} {message}: change {key} in params.yaml")


# Upper bounds on counts and sizes: far above any real use, and low enough that a typo (an extra
# three zeros) is refused in a second instead of allocating gigabytes or running for days.
MAX_SEED = 2**31 - 1  # rng.torch_epoch_seed keeps its streams apart below ~2.8e9
MAX_PAIRS = 10_000_000  # pairs and triplets an epoch: 16 bytes each as int64 indices
MAX_EVAL_PAIRS = 100_000  # evaluate holds ~33 KB a test pair (4.7 GB RSS at 10**5)
MAX_BATCH = 4096
MAX_DIM = 8192  # model.hidden_dim and model.embedding_dim
MAX_CIFAR_N = 200  # ResNet-1202, the deepest in He et al. 2016
MAX_BOOTSTRAP = 100_000
MAX_PROCESSES = 64  # train_unfrozen.processes: one node's GPUs or cores; more is a typo
# The softmax temperature of supcon / ntxent: below 0.01 the logits of cosine similarities
# exceed +-100 and bf16 (or fp32 exp) saturates; above 10 every similarity looks alike.
TEMPERATURE_RANGE = (0.01, 10.0)
IMAGE_SIZES = (16, 1024)  # data.image_size, px (also a checkpoint's and `--image-size`)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # device (and `retrieval --device`)


def _check_range(value: float, low: float, high: float, key: str) -> None:
    def shown(number: float) -> str:
        return f"{number:g}" if isinstance(number, float) else str(number)

    _check(low <= value <= high, key, f"({shown(value)}) must be in [{shown(low)}, {shown(high)}]")


@dataclass(frozen=True)
class SyntheticConfig:
    classes: int = 10
    images_per_class: int = 80
    size: int = 96

    def validate(self, key: str) -> None:
        _check(2 <= self.classes <= 16, f"{key}.classes", f"({self.classes}) must be in [2, 16]")
        _check(self.images_per_class >= 4, f"{key}.images_per_class", "must be >= 4")
        _check(32 <= self.size <= 512, f"{key}.size", f"({self.size}) must be in [32, 512]")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "digits", "folder"] = "synthetic"
    root: str = ""  # folder source: one sub-folder per class; relative paths start at the repo root
    masks: str = ""  # optional folder parallel to root holding <class>/<stem>.png masks
    image_size: int = 96
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str) -> None:
        _check(self.source != "folder" or bool(self.root), f"{key}.root",
               "is empty but data.source is 'folder'; set it to a one-folder-per-class directory")
        _check(IMAGE_SIZES[0] <= self.image_size <= IMAGE_SIZES[1], f"{key}.image_size",
               f"({self.image_size}) must be in [{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}]")
        self.synthetic.validate(f"{key}.synthetic")


@dataclass(frozen=True)
class SplitConfig:
    mode: Literal["stratified", "class_disjoint"] = "stratified"
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    small_classes: Literal["train", "drop"] = "train"

    def validate(self, key: str) -> None:
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            _check(0 < value < 1, f"{key}.{name}", f"({value}) must be in (0, 1)")
        total = self.train + self.val + self.test
        _check(abs(total - 1) < 1e-6, f"{key}.train/val/test", f"sum to {total:g}, not 1")


@dataclass(frozen=True)
class VerifyNormalizationConfig:
    sample_size: int = 256
    # Normalised natural images have per-channel means within ~0.3 of 0 and stds within
    # ~0.25 of 1 (ImageNet statistics are averages over very varied photos; any one dataset
    # drifts a little). A wrong mean/std, a missing ToTensor scaling (0-255) or a double
    # normalisation moves these by > 1, so the tolerances separate right from wrong easily.
    mean_tolerance: float = 0.5
    std_tolerance: float = 0.5

    def validate(self, key: str) -> None:
        _check(self.sample_size >= 1, f"{key}.sample_size", "must be >= 1")
        _check(self.mean_tolerance > 0, f"{key}.mean_tolerance", "must be > 0")
        _check(self.std_tolerance > 0, f"{key}.std_tolerance", "must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "efficientnet_lite0"  # a key of models.BACKBONES
    weights: str = "imagenet"  # imagenet | none | path to a local state_dict file
    cifar_n: int = 3  # cifar_resnet depth is 6n+2
    pooling: Literal["avg", "max", "gem"] = "avg"
    head: Literal["mlp", "linear", "none"] = "mlp"
    hidden_dim: int = 512
    embedding_dim: int = 128
    batchnorm: bool = True
    dropout: float = 0.0
    # The embedding is the L2-normalised head output (cosine geometry). False keeps the raw
    # head output: the losses and retrieval then see Euclidean positions, as in the course's
    # 2-D experiment (README, "Teaching experiments").
    normalize: bool = True

    def validate(self, key: str) -> None:
        # The backbone name is checked against models.BACKBONES when a stage first uses it
        # (models.backbone): importing the registry here would make every stage depend on it.
        _check(self.backbone != "cifar_resnet" or self.weights == "none", f"{key}.weights",
               f"('{self.weights}') must be none for cifar_resnet (it is trained from scratch)")
        if self.weights not in ("imagenet", "none"):
            # Checked here, before any stage works; whether the file holds the right
            # architecture is checked when the model is built (train_frozen, first thing).
            _check(resolve(self.weights).is_file(), f"{key}.weights",
                   f"('{self.weights}') is neither imagenet, none nor an existing file "
                   f"(looked for {resolve(self.weights)})")
        _check_range(self.cifar_n, 1, MAX_CIFAR_N, f"{key}.cifar_n")
        _check_range(self.hidden_dim, 1, MAX_DIM, f"{key}.hidden_dim")
        _check_range(self.embedding_dim, 2, MAX_DIM, f"{key}.embedding_dim")
        _check(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = False
    crop_scale_min: float = 0.6
    flip: bool = True
    color_jitter: float = 0.2

    def validate(self, key: str) -> None:
        _check(0 < self.crop_scale_min <= 1, f"{key}.crop_scale_min", "must be in (0, 1]")
        _check(0 <= self.color_jitter <= 1, f"{key}.color_jitter", "must be in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by train_frozen and train_unfrozen (per-stage sections override epochs)."""

    loss: str = "triplet"  # a key of losses.LOSSES
    margin: float = 1.0
    temperature: float = 0.1
    pairs_per_epoch: int = 1000
    hard_pairs: bool = False
    negatives: Literal["hard", "random"] = "hard"
    triplets_per_epoch: int = 2000  # 0: one triplet per train image; else a seeded sample
    mining_k: int = 30
    images_per_class: int = 4
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_factor: float = 0.5
    lr_patience: int = 3
    early_stopping_patience: int = 6
    threshold_criterion: Literal["f1", "accuracy"] = "accuracy"
    val_pairs: int = 500

    def validate(self, key: str) -> None:
        # The loss name and what its sampler needs are checked against losses.LOSSES by
        # losses.check_params, first thing in the training stages (see GradcamConfig.validate).
        _check(self.margin > 0, f"{key}.margin", f"({self.margin}) must be > 0")
        # The largest useful margin depends on the loss and on model.normalize: checked with
        # the loss (losses.check_params).
        _check_range(self.temperature, *TEMPERATURE_RANGE, f"{key}.temperature")
        _check_range(self.pairs_per_epoch, 2, MAX_PAIRS, f"{key}.pairs_per_epoch")
        _check_range(self.mining_k, 1, 1000, f"{key}.mining_k")
        _check_range(self.triplets_per_epoch, 0, MAX_PAIRS, f"{key}.triplets_per_epoch")
        _check_range(self.batch_size, 2, MAX_BATCH, f"{key}.batch_size")
        _check_range(self.images_per_class, 2, MAX_BATCH, f"{key}.images_per_class")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(0 <= self.momentum < 1, f"{key}.momentum", "must be in [0, 1)")
        _check(0 < self.lr_factor < 1, f"{key}.lr_factor", "must be in (0, 1)")
        _check(self.lr_patience >= 0, f"{key}.lr_patience", "must be >= 0")
        _check(self.early_stopping_patience >= 1, f"{key}.early_stopping_patience", "must be >= 1")
        _check_range(self.val_pairs, 2, MAX_EVAL_PAIRS, f"{key}.val_pairs")


@dataclass(frozen=True)
class TrainFrozenConfig:
    epochs: int = 20
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        self.augment.validate(f"{key}.augment")


@dataclass(frozen=True)
class TrainUnfrozenConfig:
    epochs: int = 4
    init: Literal["frozen", "scratch"] = "frozen"
    backbone_lr_mult: float = 0.1
    # Train only the backbone stages from this one on (earlier ones stay frozen); "all" trains
    # every layer. ResNets: layer1..layer4; efficientnet_lite0: blocks0..blocks6, head
    # (models.BACKBONES lists each backbone's stages; checked when the model is built).
    unfreeze_from: str = "all"
    # BatchNorm of the trained trunk stages: train (batch statistics, running stats updated) |
    # frozen (keep the pretrained running statistics). Frozen stages always keep theirs.
    batchnorm: Literal["train", "frozen"] = "frozen"
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        enabled=True, crop_scale_min=0.7, color_jitter=0.1))
    # DistributedDataParallel processes: > 1 makes the stage launch itself under torchrun (one
    # a GPU on CUDA; on CPU each gets cpu_count / processes threads).
    processes: int = 1

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        _check(self.backbone_lr_mult > 0, f"{key}.backbone_lr_mult", "must be > 0")
        _check_range(self.processes, 1, MAX_PROCESSES, f"{key}.processes")
        self.augment.validate(f"{key}.augment")


@dataclass(frozen=True)
class EvaluateConfig:
    test_pairs: int = 2000
    val_pairs: int = 2000  # the decision threshold is chosen on these, then applied to test
    threshold_criterion: Literal["f1", "accuracy"] = "accuracy"
    gallery: Literal["test", "train"] = "test"
    # Neighbours ranked per query: mAP and MAP@R are exact while this is >= the gallery size
    # (else mAP@max_rank); memory is O(query chunk x max_rank), never gallery x gallery.
    max_rank: int = 1000
    bootstrap: int = 1000  # resamples for the 95% confidence intervals; 0 = none
    examples: int = 6  # queries shown in the example and worst-query figures
    view_queries: int = 100  # queries in the HTML retrieval view, failures first; 0 = all
    view_k: int = 8  # neighbours shown per query there

    def validate(self, key: str) -> None:
        _check_range(self.test_pairs, 2, MAX_EVAL_PAIRS, f"{key}.test_pairs")
        _check_range(self.view_queries, 0, 100_000, f"{key}.view_queries")
        _check_range(self.view_k, 1, 10, f"{key}.view_k")
        _check_range(self.val_pairs, 2, MAX_EVAL_PAIRS, f"{key}.val_pairs")
        _check(self.max_rank >= 10, f"{key}.max_rank", f"({self.max_rank}) must be >= 10")
        _check_range(self.bootstrap, 0, MAX_BOOTSTRAP, f"{key}.bootstrap")
        _check(1 <= self.examples <= 20, f"{key}.examples",
               f"({self.examples}) must be in [1, 20]")


@dataclass(frozen=True)
class EmbedVizConfig:
    perplexity: float = 30.0
    max_points: int = 3000  # seeded subsample of the test split (t-SNE is O(n log n))
    highlight_classes: int = 10  # the largest classes get colours, the rest are grey
    knn_k: int = 5  # leave-one-out kNN accuracy among the plotted test embeddings

    def validate(self, key: str) -> None:
        _check(self.perplexity > 0, f"{key}.perplexity", "must be > 0")
        _check(1 <= self.knn_k <= 100, f"{key}.knn_k", f"({self.knn_k}) must be in [1, 100]")
        _check(self.max_points >= 10, f"{key}.max_points", "must be >= 10")
        _check(1 <= self.highlight_classes <= 20, f"{key}.highlight_classes",
               f"({self.highlight_classes}) must be in [1, 20] (one colour each)")


@dataclass(frozen=True)
class GradcamConfig:
    methods: tuple[str, ...] = ("gradcam", "layercam", "guided_backprop", "guided_gradcam")
    # Binarisation candidates; the one with the best mean IoU on validation is applied to test.
    binarize: tuple[str, ...] = ("otsu", "top_percent:10", "top_percent:20", "top_percent:30",
                                 "top_percent:40", "top_percent:50", "fixed:0.5")
    # Refinement candidates, chosen on validation after the binarisation (segmentation.refine).
    refine: tuple[str, ...] = ("none", "components", "grabcut:10/30")
    overlays: int = 8  # test images shown in the overlay figures (seeded choice)
    max_images: int = 400  # per split (val, test): a seeded choice caps the cost on big datasets
    batch_size: int = 32  # images per saliency call (forward + backward); lower it if out of memory

    def validate(self, key: str) -> None:
        # Method names and binarisation settings are checked against cam's registry and parser
        # by cam.check_params, first thing in the gradcam_segment stage: importing cam here would
        # make every stage depend on cam.py (an edit there would re-run training).
        _check(len(self.methods) > 0, f"{key}.methods", "is empty (name at least one method)")
        _check(len(set(self.methods)) == len(self.methods), f"{key}.methods",
               "names a method twice")
        _check(len(self.binarize) > 0, f"{key}.binarize", "is empty (name at least one)")
        _check(len(self.refine) > 0, f"{key}.refine", "is empty (name at least 'none')")
        _check(self.overlays >= 0, f"{key}.overlays", "must be >= 0")
        _check(self.max_images >= 1, f"{key}.max_images", "must be >= 1")
        _check_range(self.batch_size, 1, MAX_BATCH, f"{key}.batch_size")


@dataclass(frozen=True)
class ExportConfig:
    """The export stage: TorchScript and ONNX files of the fine-tuned network, checked against
    PyTorch on real images before they are written."""

    opset: int = 18  # ONNX opset; torch's exporter writes 18 at the least
    verify_images: int = 16  # test images every export is compared on (batch N and N x 1)
    onnx_tolerance: float = 1e-4  # max |embedding difference| to PyTorch fp32
    torchscript_tolerance: float = 1e-5

    def validate(self, key: str) -> None:
        _check_range(self.opset, 18, 25, f"{key}.opset")
        _check_range(self.verify_images, 1, 1024, f"{key}.verify_images")
        for name in ("onnx_tolerance", "torchscript_tolerance"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"{key}.{name}", f"({value:g}) must be in (0, 1]")


@dataclass(frozen=True)
class TrackingConfig:
    """What a stage does when MLFLOW_TRACKING_URI names a server it cannot reach.

    Not a DVC param of any stage: where the runs are logged never changes a result.
    """

    # fail: stop in one line naming the URI | local: warn once and log to this project's
    # mlruns/ store instead (the runs can be imported into the server later)
    unreachable: Literal["fail", "local"] = "fail"
    timeout_s: float = 5.0  # how long to wait for the server before deciding it is unreachable
    # Log each trained network as an MLflow model and register the fine-tuned one (about 5 s a
    # model); tests that never load them turn it off.
    log_models: bool = True

    def validate(self, key: str) -> None:
        _check(0 < self.timeout_s <= 120, f"{key}.timeout_s",
               f"({self.timeout_s}) must be in (0, 120] seconds")


@dataclass(frozen=True)
class Params:
    seed: int = 42
    lr: float = 3e-4
    precision: Literal["fp32", "bf16"] = "bf16"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    verify_normalization: VerifyNormalizationConfig = field(
        default_factory=VerifyNormalizationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_frozen: TrainFrozenConfig = field(default_factory=TrainFrozenConfig)
    train_unfrozen: TrainUnfrozenConfig = field(default_factory=TrainUnfrozenConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    embed_viz: EmbedVizConfig = field(default_factory=EmbedVizConfig)
    gradcam_segment: GradcamConfig = field(default_factory=GradcamConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self, key: str = "") -> None:
        _check(0 < self.lr < 10, "lr", f"({self.lr}) must be in (0, 10)")
        _check_range(self.seed, 0, MAX_SEED, "seed")
        _check(DEVICE_PATTERN.fullmatch(self.device) is not None,
               "device", f"('{self.device}') must be auto, cpu or cuda[:N]")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)


def _build(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{key or 'params'} must be a mapping, found {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        where = f"{key}." if key else ""
        raise ParamsError(f"unknown key '{where}{unknown[0]}' in params.yaml "
                          f"(valid keys: {', '.join(sorted(fields))})")
    values = {name: _coerce(hints[name], value, f"{key}.{name}" if key else name)
              for name, value in raw.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(f"{key} is '{value}', expected one of {list(choices)}: "
                              f"change {key} in params.yaml")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key} must be a list, found {type(value).__name__}")
        return tuple(_coerce(typing.get_args(hint)[0], v, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > 1e300:  # float(10**400) overflows
            value = math.inf
        if not math.isfinite(value):
            raise ParamsError(f"{key} is {value}, expected a finite number: "
                              f"change {key} in params.yaml")
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{key} must be true or false, found {value!r}")
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ParamsError(f"{key} must be an integer, found {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ParamsError(f"{key} must be a {hint.__name__}, found {value!r}")
    return value


def params_from_dict(raw: dict) -> Params:
    params = _build(Params, raw or {}, "")
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError with a one-line message on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error
    return params_from_dict(raw)


def to_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, the form MLflow params and DVC use."""
    flat: dict[str, Any] = {}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def select(params: Params, keys: Sequence[str]) -> dict[str, Any]:
    """The flattened values of ``keys`` (top-level like ``train`` or dotted like
    ``data.image_size``): what a stage logs to MLflow."""
    selected: dict[str, Any] = {}
    for key in keys:
        value: Any = to_dict(params)
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ParamsError(f"unknown params key {key!r}")
            value = value[part]
        selected.update(flatten({key: value}) if isinstance(value, dict) else {key: value})
    return selected


def stage_params(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> tuple[str, ...]:
    """The params keys ``stage`` declares in dvc.yaml: the one list of what it reads, what DVC
    re-runs it for and what it logs. A ``params.yaml:`` entry with no keys means all of them."""
    if not Path(dvc_yaml).is_file():
        raise ParamsError(f"{dvc_yaml}: not found in {Path.cwd()}; run stages from the "
                          "repository root, as dvc repro does")
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    if stage not in stages:
        raise ParamsError(f"{dvc_yaml} has no stage {stage!r}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
            continue
        for names in entry.values():  # {params file: its keys, or None for all}
            keys.extend(names or [f.name for f in dataclasses.fields(Params)])
    return tuple(keys)
