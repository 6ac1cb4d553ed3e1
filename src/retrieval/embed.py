"""Batched inference over the image cache: embeddings and backbone features, computed once.

The loop reads uint8 crops from the memory-mapped cache, normalises on the fly and runs the model
under inference_mode with the configured precision and channels_last. No JPEG is touched.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from retrieval import runtime, transforms
from retrieval.cache import ImageCache
from retrieval.progress import Progress


def model_inputs(images: ImageCache, indices: np.ndarray, image_size: int,
                 normalization: transforms.Normalization) -> torch.Tensor:
    """The model's input (B, 3, s, s) float32 on the CPU for cached images: what ``run_batched``
    feeds the network (an MLflow input example, an export check)."""
    crop = transforms.eval_crop(image_size)
    return runtime.model_input(crop(images.batch(indices)), torch.device("cpu"), normalization)


def run_batched(function: Callable[[torch.Tensor], torch.Tensor], images: ImageCache,
                indices: np.ndarray, image_size: int, device: torch.device, precision: str,
                normalization: transforms.Normalization, batch_size: int = 64,
                desc: str | None = None) -> np.ndarray:
    """function(normalised images (B, 3, s, s)) for every index, stacked as float32 numpy.
    ``desc``: show progress (a bar, or one line in a log) under this name."""
    crop = transforms.eval_crop(image_size)
    outputs = []
    with torch.inference_mode(), runtime.autocast(device, precision), \
            Progress(desc=desc, total=len(indices), unit="image", leave=False,
                     disable=desc is None) as progress:
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            x = runtime.model_input(crop(images.batch(batch)), device,
                                    normalization)  # (B, 3, s, s) float32
            outputs.append(function(x).float().cpu())
            progress.update(len(batch))
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outputs).numpy()
