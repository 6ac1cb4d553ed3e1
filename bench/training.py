"""Row 2: a train_unfrozen epoch vs raw forward+backward on the same images, pre-decoded.

Pipeline: ``training.fit`` for one epoch with the ``ImageEncoder`` of train_unfrozen (random
augmentation of the cached uint8 crops, contrastive pairs, Adam), timed by fit itself
(``train_seconds``: sampling + every step, validation excluded; validation is made tiny).
Raw: the same network in train mode, forward + backward of a scalar loss on pre-decoded,
normalised channels_last tensors, same batch size, threads and precision; no optimizer step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import numpy as np
import torch

from retrieval import config, runtime, training
from retrieval.config import AugmentConfig

PRECISION = "bf16"
AUGMENT = AugmentConfig(enabled=True, crop_scale_min=0.7, flip=True, color_jitter=0.1)


def raw_train(net, inputs: torch.Tensor, batch_size: int, precision: str) -> None:
    device = torch.device("cpu")
    for start in range(0, len(inputs), batch_size):
        with runtime.autocast(device, precision):
            loss = net(inputs[start:start + batch_size], normalize=False).float().square().mean()
        net.zero_grad(set_to_none=True)
        loss.backward()


def pipeline_epoch(net, encoder, optimizer, train_idx, val_idx, labels, cfg,
                   workdir: Path) -> float:
    """Seconds of one fit() epoch as fit reports them (sampling and steps, not validation).
    The optimizer lives across calls, as across the epochs of a stage: its state is allocated
    once, in the warm-up call."""
    with tempfile.TemporaryDirectory(dir=workdir) as temp:
        result = training.fit(net, encoder, optimizer,
                              training.TrainingData(labels, [], train_idx, val_idx), cfg,
                              epochs=1, seed=0,
                              resume=training.ResumeSpec(Path(temp) / "resume.pt", "bench"))
    return result.train_seconds


def step_breakdown(net, encoder: training.ImageEncoder, indices: np.ndarray,
                   batch_size: int, precision: str) -> dict[str, float]:
    """Milliseconds per batch of each part of a training step (a poor man's profile)."""
    device = torch.device("cpu")
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)][:3]
    optimizer = training.build_optimizer(net, "adam", 1e-4, 1e-4, 0.9)
    parts = {"read + augment + normalise": [], "forward + backward": [], "optimizer step": []}
    for batch in batches:
        parts["read + augment + normalise"].append(common.seconds(
            lambda b=batch: encoder.inputs(b)))
        x = encoder.inputs(batch)

        def forward_backward(x=x):
            with runtime.autocast(device, precision):
                loss = net(x, normalize=False).float().square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

        parts["forward + backward"].append(common.seconds(forward_backward))
        parts["optimizer step"].append(common.seconds(optimizer.step))
    return {name: 1000 * min(values) for name, values in parts.items()}


def run(quick: bool, workdir: Path) -> common.Result:
    backbone, size, n, batch, rounds = (("cifar_resnet", 32, 32, 16, 1) if quick else
                                        ("resnet50", 224, 192, 32, 2))
    images, paths = common.image_cache(n + 16, size, seed=2, workdir=workdir, classes=8)
    labels = common.image_labels(paths)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, val_idx = np.sort(order[:n]), np.sort(order[n:])
    cfg = config.TrainConfig(loss="contrastive", pairs_per_epoch=n // 2, val_pairs=4,
                             batch_size=batch)
    net = runtime.prepare_model(common.embedding_net(backbone), torch.device("cpu"))
    encoder = training.ImageEncoder(net, images, size, AUGMENT, torch.device("cpu"), PRECISION)
    inputs = encoder.inputs(train_idx)  # pre-decoded: augmented once, normalised, in memory
    net.train()
    breakdown = step_breakdown(net, encoder, train_idx, batch, PRECISION)
    optimizer = training.build_optimizer(net, "adam", 1e-4, 1e-4, 0.9)
    times = common.interleaved({
        "raw": lambda: raw_train(net, inputs, batch, PRECISION),
        "pipeline": lambda: pipeline_epoch(net, encoder, optimizer, train_idx, val_idx,
                                           labels, cfg, workdir),
    }, rounds, warmup=not quick)
    pipeline_times = times["pipeline"]
    ratio = common.best_ratio(times["raw"], pipeline_times)
    pipeline, raw = common.rate(n, pipeline_times), common.rate(n, times["raw"])
    step_ms = sum(breakdown.values())
    return common.Result(
        row=2, name="training",
        what="train_unfrozen epoch (`fit` + `ImageEncoder`: augmentation, pairs, Adam)",
        conditions=(f"{backbone}, {size} px, batch {batch}, {PRECISION} + channels_last, "
                    f"{torch.get_num_threads()} threads, {n} Caltech-101 images (8 classes), "
                    "contrastive pairs; raw = forward + backward on pre-decoded tensors"),
        figure=f"{ratio:.2f} ({pipeline:.1f} / {raw:.1f} images/s)",
        target="≥ 0.85", passed=ratio >= 0.85,
        details={"ratio": ratio, "pipeline_images_per_s": pipeline, "raw_images_per_s": raw,
                 "raw_times_s": times["raw"], "pipeline_times_s": pipeline_times,
                 "step_breakdown_ms": breakdown,
                 "step_breakdown_share": {k: v / step_ms for k, v in breakdown.items()}})

