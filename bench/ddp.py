"""Row 18: a train_unfrozen epoch as 2 DistributedDataParallel processes vs 1 process.

Each side is a fresh `python bench/ddp.py` that trains as train_unfrozen does: with 2
processes it launches itself under torchrun (``launch.run_workers``, as the stage with
train_unfrozen.processes: 2), gloo on CPU, each rank taking every other step with the
gradients all-reduced; with 1 it trains alone. The cores are shared out as the stage shares
them: 1 process x cpu_count threads vs 2 processes x cpu_count / 2 threads. A side's figure is
``fit``'s own training seconds for its second epoch (the first warms the allocator and oneDNN
kernels), validation made tiny; the sides alternate, and each keeps its fastest round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import common

from retrieval import launch

PRECISION = "bf16"


def sizes(quick: bool) -> tuple[str, int, int, int, int]:
    """backbone, image size, images an epoch, batch size, rounds"""
    return ("cifar_resnet", 32, 32, 8, 1) if quick else ("efficientnet_lite0", 96, 384, 32, 2)


def worker(workdir: Path, processes: int, quick: bool, out: Path) -> None:
    """Two fit() epochs as train_unfrozen trains (under torchrun when processes > 1); rank 0
    writes the second epoch's training seconds to ``out``."""
    code = launch.run_workers(__file__, processes, "processes", "cpu")
    if code is not None:
        sys.exit(code)
    import tempfile

    import numpy as np
    import torch

    from retrieval import config, runtime, training
    from retrieval.config import AugmentConfig

    backbone, size, n, batch, _ = sizes(quick)
    device = torch.device("cpu")
    runtime.init_distributed(device)
    images, paths = common.image_cache(n + 16, size, seed=2, workdir=workdir, classes=8)
    labels = common.image_labels(paths)
    order = np.random.default_rng(0).permutation(len(images))
    split = training.TrainingData(labels, [], np.sort(order[:n]), np.sort(order[n:]))
    cfg = config.TrainConfig(loss="contrastive", pairs_per_epoch=n // 2, val_pairs=4,
                             batch_size=batch)
    net = runtime.prepare_model(common.embedding_net(backbone), device)
    model = (torch.nn.parallel.DistributedDataParallel(net) if runtime.world_size() > 1
             else net)
    augment = AugmentConfig(enabled=True, crop_scale_min=0.7, flip=True, color_jitter=0.1)
    encoder = training.ImageEncoder(model, images, size, augment, device, PRECISION)
    optimizer = training.build_optimizer(net, "adam", 1e-4, 1e-4, 0.9)
    seconds = []
    for epoch in range(2):
        with tempfile.TemporaryDirectory(dir=workdir) as temp:
            result = training.fit(net, encoder, optimizer, split, cfg, epochs=1, seed=epoch,
                                  resume=training.ResumeSpec(Path(temp) / "r.pt", "bench"))
        seconds.append(result.train_seconds)
    if runtime.is_main_process():
        out.write_text(json.dumps({"seconds": seconds[-1], "world_size": runtime.world_size(),
                                   "threads": torch.get_num_threads()}))
    runtime.shutdown_distributed()


def side(workdir: Path, processes: int, quick: bool) -> dict:
    out = workdir / f"ddp-{processes}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(launch.threads_per_process(processes)),
           "PYTHONPATH": os.pathsep.join([str(common.REPO / "src"), str(common.REPO / "bench")])}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    subprocess.run([sys.executable, __file__, str(workdir), str(processes), str(int(quick)),
                    str(out)], env=env, check=True, timeout=1800)
    return json.loads(out.read_text())


def run(quick: bool, workdir: Path) -> common.Result:
    backbone, size, n, batch, rounds = sizes(quick)
    common.image_cache(n + 16, size, seed=2, workdir=workdir, classes=8)  # built once, here
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(rounds):
        for processes in runs:
            runs[processes].append(side(workdir, processes, quick))
    times = {p: [r["seconds"] for r in records] for p, records in runs.items()}
    one, two = common.rate(n, times[1]), common.rate(n, times[2])
    speedup = two / one
    threads = {p: records[0]["threads"] for p, records in runs.items()}
    assert runs[2][0]["world_size"] == 2, runs[2]
    cores = launch.cpu_count()
    return common.Result(
        row=18, name="ddp",
        what="train_unfrozen epoch: 2 DDP processes (torchrun, gloo) vs 1 process (CPU)",
        conditions=(f"{backbone}, {size} px, batch {batch}, {PRECISION} + channels_last, "
                    f"{n} Caltech-101 images (8 classes) an epoch, contrastive pairs, {cores} "
                    f"cores: 1 process x {threads[1]} threads vs 2 x {threads[2]}; "
                    "fit's training seconds of the second epoch"),
        figure=f"2 processes {speedup:.2f}x 1 process ({two:.1f} vs {one:.1f} images/s)",
        target="a measurement (on 2 cores, 2 x 1 thread need not beat 1 x 2)", passed=None,
        details={"speedup": speedup, "images_per_s": {"1": one, "2": two},
                 "seconds": {str(p): t for p, t in times.items()}, "threads": threads},
        notes=["DDP splits an epoch's steps between the processes and all-reduces the "
               "gradients each step (gloo over loopback); on a CPU the processes share the "
               "same cores, so any gain comes from running the parts of a step that one "
               "process does not parallelise (augmentation, Python, the optimizer) side by "
               "side, against the cost of the all-reduce and of two copies of the model."])


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3])), Path(sys.argv[4]))
