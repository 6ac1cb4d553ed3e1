"""The trained networks where users look for them: MLflow models and the model registry.

Each training stage logs its checkpoint's network as an MLflow PyTorch model of its stage run
(``log_checkpoint``); evaluate registers the fine-tuned one as a new version of
``tracking.REGISTERED_MODEL``, tagged with the git commit, the DVC experiment and the test mAP
(``register_checkpoint``). The logged network is the one in the checkpoint file, loaded back, so
its embeddings are the checkpoint's (not the last epoch's weights, not bf16).

    mlflow.pytorch.load_model("models:/retrieval-embedding/latest")   # images -> embeddings
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retrieval import embed, models, outputs
from retrieval.cache import ImageCache
from retrieval.tracking import StageRun, git_commit

EXAMPLE_IMAGES = 2  # the input example; one image would fix the exported batch axis to 1


def checkpoint_tags(checkpoint: Path) -> dict[str, str]:
    """What identifies a logged model: the checkpoint file's hash, which evaluate looks up."""
    return {"checkpoint_sha256": outputs.file_digest(checkpoint)}


def log_checkpoint(run: StageRun, checkpoint: Path, images: ImageCache, rows: np.ndarray,
                   writer: str) -> str:
    """Log the network of ``checkpoint`` (written by stage ``writer``) as ``run``'s MLflow model,
    with the first cached images of ``rows`` as its input example; its ``models:/`` URI."""
    net, stored = models.load_model(checkpoint)  # fp32, CPU, eval
    example = embed.model_inputs(images, rows[:EXAMPLE_IMAGES], stored["image_size"],
                                 net.normalization).numpy()
    tags = {**checkpoint_tags(checkpoint), "stage": writer,
            "image_size": stored["image_size"], "threshold": stored.get("threshold", "")}
    return run.log_model(net, example, tags)


def register_checkpoint(run: StageRun, checkpoint: Path, writer: str, test_map: float,
                        images: ImageCache, rows: np.ndarray,
                        threshold: float | None = None) -> str:
    """A new registry version of the network in ``checkpoint``: the model its training stage
    logged, or, when this store has none (the checkpoint came from a DVC cache or remote), one
    logged now by ``run``. ``threshold``: evaluate's decision threshold for it, tagged on the
    version (the logged model's ``threshold`` tag is the checkpoint's, from training). Returns
    the version."""
    model_uri = run.logged_model(checkpoint_tags(checkpoint)) or log_checkpoint(
        run, checkpoint, images, rows, writer)
    return run.register_model(model_uri, {
        "git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "test_map": f"{test_map:.6f}", **checkpoint_tags(checkpoint),
        **({} if threshold is None else {"decision_threshold": repr(float(threshold))})})
