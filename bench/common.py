"""What every benchmark shares: a timing helper, the Caltech-101 subset, models, the result record.

Every figure is a ratio of two measurements taken in the same process, interleaved (A, B, A, B,
...) so that a change in the machine's load hits both sides alike, after one untimed warm-up call
of each side (allocator, oneDNN kernels). Other processes can only add time, so a side's figure
is its fastest round: the ratio of best times is the least disturbed estimate on a shared
machine (the per-round times are kept in the JSON).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
LEEDS = REPO.parent / "shared" / "datasets" / "leeds_butterfly"
GIB = 1024**3


# --- timing ------------------------------------------------------------------------------------

def seconds(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved(sides: dict[str, Callable[[], object]], rounds: int,
                warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each side, ``rounds`` times, alternating sides within each round.

    A side that returns a number reports its own seconds (e.g. fit's training time, which
    leaves validation out); otherwise the call's wall time counts.
    """
    if warmup:
        for function in sides.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, function in sides.items():
            started = time.perf_counter()
            reported = function()
            elapsed = time.perf_counter() - started
            times[name].append(float(reported) if isinstance(reported, int | float)
                               else elapsed)
    return times


def best_ratio(numerator: list[float], denominator: list[float]) -> float:
    """min(numerator) / min(denominator): each side at its least disturbed."""
    return min(numerator) / min(denominator)


def rate(items: int, times: list[float]) -> float:
    """Items per second in the fastest round."""
    return items / min(times)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far: VmHWM, the high-water mark of its own
    address space (getrusage's ru_maxrss would also count the parent's memory at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import torch

    from retrieval import runtime

    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_native": runtime.bf16_supported(torch.device("cpu")),
            "torch": torch.__version__, "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB)}


# --- the result record ---------------------------------------------------------------------------

@dataclass
class Result:
    """One row of BENCHMARKS.md (and one bench/results/*.json)."""

    row: int
    name: str
    what: str
    conditions: str
    figure: str  # as shown in the table, e.g. "0.97 (41.2 / 42.5 images/s)"
    target: str
    passed: bool | None  # None: a table, nothing to pass
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- data and models -----------------------------------------------------------------------------

def caltech_available() -> bool:
    return CALTECH.is_dir()


def image_paths(n: int, seed: int, workdir: Path, classes: int = 0) -> list[Path]:
    """A seeded subset of ``n`` Caltech-101 images: drawn from all of them, or ``classes`` > 0
    seeded classes with ``n // classes`` images each (enough positives to train on). Without
    the dataset (CI elsewhere), generated sample images instead."""
    if not caltech_available():
        return _synthetic_paths(n, seed, workdir)
    rng = np.random.default_rng(seed)
    if classes:
        folders = sorted(f for f in CALTECH.iterdir()
                         if f.is_dir() and len(list(f.glob("*.jpg"))) >= n // classes)
        chosen = [folders[i] for i in np.sort(rng.choice(len(folders), classes, replace=False))]
        return [path for folder in chosen for path in
                sorted(rng.choice(sorted(folder.glob("*.jpg")), n // classes, replace=False))]
    files = sorted(CALTECH.glob("*/*.jpg"))
    return [files[i] for i in np.sort(rng.choice(len(files), min(n, len(files)),
                                                 replace=False))]


def _synthetic_paths(n: int, seed: int, workdir: Path) -> list[Path]:
    from retrieval import synthetic

    folder = workdir / f"synthetic-{n}-{seed}"
    if not folder.exists():
        synthetic.generate(folder, n_classes=10, images_per_class=max(4, -(-n // 10)),
                           image_size=96, seed=seed)
    return sorted((folder / "images").glob("*/*.png"))[:n]


def image_labels(paths: list[Path]) -> np.ndarray:
    names = [path.parent.name for path in paths]
    classes = {name: i for i, name in enumerate(sorted(set(names)))}
    return np.array([classes[name] for name in names], dtype=np.int64)


def image_cache(n: int, image_size: int, seed: int, workdir: Path, classes: int = 0):
    """The decoded uint8 cache of ``image_paths(...)`` (built once into the bench work folder)
    and the paths, in the cache's order."""
    from retrieval.cache import ImageCache

    paths = image_paths(n, seed, workdir, classes)
    return ImageCache.build(paths, image_size, workdir / "images", progress=False), paths


def embedding_net(backbone: str, embedding_dim: int = 128):
    """An untrained EmbeddingNet: speed does not depend on the weights (none can be downloaded)."""
    import torch

    from retrieval import config, models

    torch.manual_seed(0)
    cfg = config.ModelConfig(backbone=backbone, weights="none", embedding_dim=embedding_dim,
                             hidden_dim=512, cifar_n=1)
    return models.EmbeddingNet(cfg)
