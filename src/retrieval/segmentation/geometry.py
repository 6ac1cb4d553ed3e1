"""Ground-truth and predicted masks between an image and the model's input view of it.

Ground-truth masks go through the images' own resize + centre crops (``align_mask``), so maps and
masks are scored on the model's input view, image_size x image_size pixels. Predicted masks are
written back at each image's own size (``restore_mask``); what lies outside the centre crop is
background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from retrieval import outputs, transforms


def align_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W) bool mask of an image -> (s, s) bool mask of the model's input view of it.

    The very transforms the images go through (``decode_transform``: antialiased resize of the
    shorter side, centre crop; then ``eval_crop``), applied to the mask as an 8-bit image and
    thresholded at half, so the mask lines up with the model input pixel for pixel.
    """
    picture = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    view = transforms.eval_crop(image_size)(transforms.decode_transform(image_size)(picture))
    return view[0].numpy() >= 128


def _view_window(height: int, width: int, image_size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of the model view inside the resized image.

    The same arithmetic as torchvision's Resize(int) and CenterCrop, twice (cache, then eval).
    """
    side = transforms.cache_size(image_size)
    short, long = min(height, width), max(height, width)
    new_long = int(side * long / short)
    rh, rw = (side, new_long) if height <= width else (new_long, side)
    inner = int(round((side - image_size) / 2.0))
    return rh, rw, int(round((rh - side) / 2.0)) + inner, int(round((rw - side) / 2.0)) + inner


def restore_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(s, s) bool mask of the model view -> (height, width) bool mask of the original image.

    The inverse of ``align_mask``: the view is pasted into its window of the resized image, which
    is resized (bilinear) back to the image's size and thresholded at half. Pixels the model never
    saw (outside the centre crop) are background.
    """
    image_size = mask.shape[-1]
    rh, rw, top, left = _view_window(height, width, image_size)
    canvas = torch.zeros((1, rh, rw))
    canvas[0, top:top + image_size, left:left + image_size] = torch.from_numpy(
        np.asarray(mask, dtype=np.float32))
    full = TF.resize(canvas, [height, width], antialias=True)
    return full[0].numpy() >= 0.5


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """An 8-bit PNG, 255 = foreground, 0 = background (the convention of the dataset masks)."""
    with outputs.atomic_path(path) as temp:
        Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(temp, format="PNG")


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as ``data.load_rgb`` returns it (EXIF rotation applied)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return height, width
