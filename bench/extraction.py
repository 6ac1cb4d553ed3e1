"""Row 1: feature extraction through the pipeline vs the raw model forward on the same tensors.

Pipeline: ``embed.run_batched`` (what evaluate, embed and the frozen feature cache call) over
the memory-mapped uint8 image cache of a seeded Caltech-101 subset: read, centre crop, normalise,
channels_last, the model under inference_mode and autocast. Raw: the same model on the same
images already cropped, normalised and in channels_last in memory, same batch size, threads and
precision: the speed of the model itself.
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np
import torch

from retrieval import runtime, transforms
from retrieval.embed import run_batched

PRECISION = "bf16"  # the params.yaml default (row 9 shows it keeps the results)


def pre_decoded(images, indices: np.ndarray, image_size: int,
                normalization: transforms.Normalization) -> torch.Tensor:
    """(N, 3, s, s) float32 model inputs in channels_last, made once, outside any timing."""
    batch = transforms.eval_crop(image_size)(images.batch(indices))
    return transforms.normalize(batch, normalization).contiguous(
        memory_format=torch.channels_last)


def raw_forward(function, inputs: torch.Tensor, batch_size: int, precision: str) -> None:
    device = torch.device("cpu")
    with torch.inference_mode(), runtime.autocast(device, precision):
        for start in range(0, len(inputs), batch_size):
            function(inputs[start:start + batch_size])


def breakdown(function, images, indices: np.ndarray, image_size: int, batch_size: int,
              precision: str, normalization: transforms.Normalization) -> dict[str, float]:
    """Milliseconds per batch of run_batched's two parts (best of the batches)."""
    crop, device = transforms.eval_crop(image_size), torch.device("cpu")
    parts: dict[str, list[float]] = {"read + crop + normalise": [], "forward": []}
    with torch.inference_mode(), runtime.autocast(device, precision):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            parts["read + crop + normalise"].append(common.seconds(
                lambda c=chunk: runtime.model_input(crop(images.batch(c)), device,
                                                    normalization)))
            x = runtime.model_input(crop(images.batch(chunk)), device, normalization)
            parts["forward"].append(common.seconds(lambda x=x: function(x)))
    return {name: 1000 * min(values) for name, values in parts.items()}


def run(quick: bool, workdir: Path) -> common.Result:
    backbone, size, n, batch, rounds = (("cifar_resnet", 32, 64, 32, 2) if quick else
                                        ("efficientnet_lite0", 160, 256, 64, 5))
    images, _ = common.image_cache(n, size, seed=0, workdir=workdir)
    indices = np.arange(len(images))
    net = runtime.prepare_model(common.embedding_net(backbone), torch.device("cpu")).eval()
    inputs = pre_decoded(images, indices, size, net.normalization)
    times = common.interleaved({
        "raw": lambda: raw_forward(net, inputs, batch, PRECISION),
        "pipeline": lambda: run_batched(net, images, indices, size, torch.device("cpu"),
                                        PRECISION, net.normalization, batch_size=batch),
    }, rounds)
    ratio = common.best_ratio(times["raw"], times["pipeline"])
    parts = breakdown(net, images, indices, size, batch, PRECISION, net.normalization)
    pipeline, raw = common.rate(n, times["pipeline"]), common.rate(n, times["raw"])
    return common.Result(
        row=1, name="extraction",
        what="Feature extraction (`run_batched`: evaluate / embed / frozen feature cache)",
        conditions=(f"{backbone}, {size} px, batch {batch}, {PRECISION} + channels_last, "
                    f"{torch.get_num_threads()} threads, {n} Caltech-101 images from the "
                    f"uint8 cache vs the same images pre-decoded in memory"),
        figure=f"{ratio:.2f} ({pipeline:.1f} / {raw:.1f} images/s)",
        target="≥ 0.90", passed=ratio >= 0.90,
        details={"ratio": ratio, "pipeline_images_per_s": pipeline, "raw_images_per_s": raw,
                 "times_s": times, "step_breakdown_ms": parts,
                 "step_breakdown_share": {k: v / sum(parts.values()) for k, v in parts.items()}})
