"""The embedding network outside this project: TorchScript and ONNX files, with their preprocessing.

Both files take what ``EmbeddingNet`` takes, (B, 3, S, S) float32 RGB already normalised, NCHW,
with a free batch size, and return what ``net(images)`` returns in eval mode: the
(B, D) embedding, L2-normalised unless the model's ``normalize`` is false. ``preprocessing.json``
beside them says how an image file becomes that input (the pipeline's own rule:
``transforms.eval_pil_transform``) and which checkpoint and decision threshold they come from
(``threshold.resolve``: evaluate's, since the export stage runs after evaluate).
``max_differences`` runs both files on real images against PyTorch in float32; an export is
only trusted within the stage's tolerances (``check_tolerances``).

Exporters (both measured on timm's tf_efficientnet_lite0, whose TF "same" padding is computed
from the input's size at run time, at 48, 97 and 160 px, batch 1 and 5: differences <= 3e-6):

* ONNX: ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter that torch
  maintains (the default since torch 2.9; the TorchScript-based one is deprecated and due for
  removal). torch.export captures the padding arithmetic symbolically and the batch axis as a
  declared dynamic dimension, so batch sizes other than the example's are checked, not assumed.
  It costs ~7-10 s for EfficientNet-Lite0 on 2 cores (the legacy exporter ~1 s).
* TorchScript: ``torch.jit.trace``, the only producer of TorchScript files; deprecated in
  favour of torch.export, whose files (.pt2) are not TorchScript. Tracing (not scripting):
  ``EmbeddingNet.forward`` reads a dataclass config, which ``torch.jit.script`` cannot compile;
  the padding's size arithmetic is recorded as graph operations, so other batch sizes (and
  sizes) run the same arithmetic as eager PyTorch.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retrieval import threshold
from retrieval.models import EmbeddingNet
from retrieval.outputs import UserError, atomic_path, file_digest
from retrieval.transforms import cache_size, eval_crop, normalize

if TYPE_CHECKING:
    import pandas as pd

    from retrieval.cache import ImageCache

ONNX_FILE = "embedding.onnx"
TORCHSCRIPT_FILE = "embedding.torchscript.pt"
PREPROCESSING_FILE = "preprocessing.json"
FORMATS = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
# torch.export specialises dimensions of size 0 and 1: the example batch must be larger for
# the batch axis to stay free.
EXAMPLE_BATCH = 2


class ExportMismatch(UserError):
    """An exported file's embeddings differ from PyTorch's by more than the tolerance."""


def _frozen_copy(net: EmbeddingNet) -> EmbeddingNet:
    """The network as exported: float32, eval mode, on the CPU, contiguous NCHW parameters
    (the caller's network is left as it is)."""
    return copy.deepcopy(net).float().cpu().eval().to(memory_format=torch.contiguous_format)


def example_input(image_size: int) -> torch.Tensor:
    """A fixed example batch (EXAMPLE_BATCH, 3, S, S): tracing records operations, not values."""
    return torch.zeros(EXAMPLE_BATCH, 3, image_size, image_size)


def export_torchscript(net: EmbeddingNet, image_size: int, path: str | Path) -> str:
    """Write ``net`` as a traced TorchScript module (``torch.jit.load(path)``); the SHA-256 of
    the bytes written, which ``load_torchscript`` demands."""
    model = _frozen_copy(net)
    with warnings.catch_warnings(), torch.no_grad():
        # The deprecation notices of torch.jit.trace/save: see the module docstring.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated",
                                category=FutureWarning)
        traced = torch.jit.trace(model, example_input(image_size), check_trace=False)
        # Through a file object: given a path, the archive's inner folder would be named after
        # the (random) temporary file and two identical exports would differ byte for byte.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    with atomic_path(path) as temp:
        temp.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def export_onnx(net: EmbeddingNet, image_size: int, path: str | Path, opset: int) -> None:
    """Write ``net`` as one self-contained ONNX file (weights inside, no external data), with
    a dynamic batch axis named "batch"."""
    model = _frozen_copy(net)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.onnx.export(model, (example_input(image_size),), None, dynamo=True,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), opset_version=opset,
                                    verbose=False)
    with atomic_path(path) as temp:
        temp.write_bytes(program.model_proto.SerializeToString())


def preprocessing_card(net: EmbeddingNet, checkpoint: dict, checkpoint_path: str | Path,
                       image_size: int, opset: int) -> dict[str, Any]:
    """What a user of the exported files needs to turn an image into the input and read the
    output: the pipeline's own rule (``transforms.eval_pil_transform``), stated in numbers."""
    norm = net.normalization
    low = [(0.0 - m) / s for m, s in zip(norm.mean, norm.std, strict=True)]
    high = [(1.0 - m) / s for m, s in zip(norm.mean, norm.std, strict=True)]
    resize = cache_size(image_size)
    decision = threshold.resolve(checkpoint_path, checkpoint)
    return {
        "files": dict(FORMATS),
        "onnx_opset": opset,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "channel_order": "RGB",
        "batch": "dynamic (axis 0)",
        "image_size": image_size,
        "decode": "8-bit RGB, EXIF orientation applied, transparency composited on white "
                  "(retrieval.data.load_rgb)",
        "resize_size": resize,
        "resize": (f"shorter side resized to {resize} px (round(image_size * 8 / 7); bilinear "
                   f"with antialiasing, on the uint8 image), centre crop {resize} x {resize}, "
                   f"then centre crop {image_size} x {image_size}"),
        "scale": "pixel / 255 (uint8 0..255 to 0..1)",
        "normalization": norm.name,
        "mean": list(norm.mean),
        "std": list(norm.std),
        "formula": "input = (pixel / 255 - mean) / std, per channel",
        "value_range": {"min": low, "max": high},
        "output_dim": net.embedding_dim,
        "normalised": bool(net.config.normalize),
        "distance": ("Euclidean between L2-normalised embeddings" if net.config.normalize
                     else "Euclidean between raw head outputs"),
        # The one threshold `retrieval compare` and the search page use for this checkpoint
        # (evaluate's when chosen for these bytes: the export stage runs after evaluate).
        "threshold": decision.value,
        "threshold_source": decision.source,
        "backbone": net.config.backbone,
        "checkpoint": Path(checkpoint_path).as_posix(),
        "checkpoint_sha256": file_digest(checkpoint_path),
    }


def write_card(card: dict, path: str | Path) -> None:
    """JSON at full precision (``outputs.write_json`` rounds floats to 6 digits: the mean and
    std must come out exactly as the pipeline uses them)."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def export_model(net: EmbeddingNet, checkpoint: dict, checkpoint_path: str | Path,
                 image_size: int, folder: str | Path, opset: int) -> dict[str, Path]:
    """Both exports and preprocessing.json (with the TorchScript file's SHA-256) into
    ``folder``; their paths by format (and "preprocessing")."""
    folder = Path(folder)
    written = {name: folder / file for name, file in FORMATS.items()}
    export_onnx(net, image_size, written["onnx"], opset)
    sha256 = export_torchscript(net, image_size, written["torchscript"])
    written["preprocessing"] = folder / PREPROCESSING_FILE
    card = preprocessing_card(net, checkpoint, checkpoint_path, image_size, opset)
    write_card({**card, "torchscript_sha256": sha256}, written["preprocessing"])
    return written


def recorded_sha256(folder: str | Path) -> str:
    """The TorchScript file's SHA-256 as ``export_model`` recorded it in preprocessing.json."""
    card = Path(folder) / PREPROCESSING_FILE
    try:
        return json.loads(card.read_text())["torchscript_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{card} does not record the TorchScript file's SHA-256 "
                        f"({type(error).__name__}): re-create it with `dvc repro --force "
                        f"export`") from error


def verification_images(images: ImageCache, table: pd.DataFrame, count: int,
                        image_size: int, net: EmbeddingNet) -> torch.Tensor:
    """``count`` test images of the split table (evenly spaced over them; every split if it has
    no test images), as evaluate sees them: centre crop, the network's normalisation."""
    rows = np.flatnonzero(table["split"].to_numpy() == "test")
    rows = rows if len(rows) else np.arange(len(table))
    chosen = rows[np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)]
    return normalize(eval_crop(image_size)(images.batch(np.unique(chosen))), net.normalization)


def load_torchscript(path: str | Path, sha256: str) -> torch.jit.ScriptModule:
    """Load a TorchScript file this project exported, refusing any other bytes. A TorchScript
    archive carries code (its graph) and pickled constants, so it is only opened when its
    SHA-256 is the one recorded when it was written (``export_torchscript``'s return value);
    the checked bytes are the ones loaded."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"refusing to load {path}: its SHA-256 is not the one recorded when it "
                        f"was exported (a TorchScript file runs code when loaded); re-create "
                        f"it with `dvc repro --force export`")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated",
                                category=FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def onnx_session(path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime session on the CPU (``threads`` 0: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed_torch(net: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return net(images).float().numpy()


def embed_onnx(session: Any, images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(array,
                                                                        dtype=np.float32)})[0]


def max_differences(net: EmbeddingNet, files: dict[str, Path], images: torch.Tensor,
                    torchscript_sha256: str) -> dict[str, float]:
    """Max |embedding difference| of each exported file against ``net`` in float32 on
    ``images`` (normalised, (N, 3, S, S)), run as one batch of N and as N batches of one:
    the dynamic batch axis at two sizes, neither of them the example's."""
    reference = embed_torch(_frozen_copy(net), images)
    session = onnx_session(files["onnx"])
    module = load_torchscript(files["torchscript"], torchscript_sha256)
    runners = {"onnx": lambda x: embed_onnx(session, x),
               "torchscript": lambda x: embed_torch(module, x)}
    found = {}
    for name, embed in runners.items():
        whole = embed(images)
        single = np.concatenate([embed(images[i:i + 1]) for i in range(len(images))])
        found[name] = float(max(np.abs(whole - reference).max(),
                                np.abs(single - reference).max()))
    return found


def check_tolerances(differences: dict[str, float], tolerances: dict[str, float],
                     keys: dict[str, str] | None = None) -> None:
    """Raise ExportMismatch (one line) for the first format whose difference exceeds its
    tolerance; ``keys`` names the params key of each tolerance."""
    for name, difference in differences.items():
        if not difference <= tolerances[name]:  # NaN fails too
            where = f" ({keys[name]})" if keys and name in keys else ""
            raise ExportMismatch(
                f"the {name} export differs from PyTorch by {difference:.3g} (max |embedding "
                f"difference|), above the tolerance {tolerances[name]:g}{where}: the exported "
                f"file does not compute this model; check the exporter's warnings above or "
                f"raise the tolerance if the difference is acceptable")
