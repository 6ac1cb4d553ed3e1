"""Every file the stages hand each other, in one place (dvc.yaml declares the same paths as deps
and outs; tests/test_dag.py checks that no other module spells one out).

All paths are relative to the repository root, where DVC runs the stages. Library functions take
their paths as arguments; the stage scripts pass these.
"""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")  # prepare: the indexed dataset
INDEX_CSV = PREPARED / "index.csv"  # path, label, mask of every usable image
DATASET_JSON = PREPARED / "dataset.json"  # the dataset card (root, digest, counts)
EXCLUDED_CSV = PREPARED / "excluded.csv"  # files prepare could not use, and why
SPLIT_CSV = Path("data/split.csv")  # split: one row per image, train | val | test

EVAL = Path("data/eval")  # evaluate: the seeded pairs, queries and gallery
EMBEDDINGS = Path("data/embeddings")  # evaluate: <model>.npz for embed_viz and the CLI
GALLERY_INDEX = Path("data/index/gallery.faiss")  # evaluate: `retrieval search`'s index
GRADCAM = Path("data/gradcam")  # gradcam_segment: masks, prototypes, per-image scores

EXPORT = Path("models/export")  # export: embedding.onnx, .torchscript.pt, preprocessing.json
REPORT = Path("report")  # report: report.html, Report.pdf, report.md and its figures
METRICS = Path("metrics")
PLOTS = Path("plots")
# evaluate: the decision threshold it chose for a checkpoint, saved beside it (retrieval.threshold)
THRESHOLD_FILE = "threshold.json"


def checkpoint(stage: str) -> Path:
    """A training stage's best weights and the threshold chosen on its training-time val pairs."""
    return Path("models") / stage / "best.pt"


def threshold(stage: str) -> Path:
    """evaluate: the decision threshold chosen for a training stage's checkpoint, beside it."""
    return checkpoint(stage).with_name(THRESHOLD_FILE)


# metrics/ holds three kinds of JSON (retrieval.headline): dvc.yaml declares only the headline
# files as `metrics`, so `dvc metrics show/diff` and `dvc exp show` stay readable; the details
# and the wall-clock numbers are plain outputs beside them.
DETAILS = METRICS / "details"  # every number each stage measured: the report reads these


def metrics(stage: str) -> Path:
    """A stage's headline metrics (a DVC metric): the few numbers compared across experiments."""
    return METRICS / f"{stage}.json"


def model_metrics(stage: str, model: str) -> Path:
    """A stage's headline metrics of one compared model (a DVC metric): one row per model in
    `dvc metrics show`, its metrics as the columns."""
    return METRICS / stage / f"{model}.json"


def details(stage: str) -> Path:
    """Everything a stage measured (identical across identical runs); not a DVC metric."""
    return DETAILS / f"{stage}.json"


def timing(stage: str) -> Path:
    """A stage's wall-clock numbers, apart from its metrics; not a DVC metric."""
    return METRICS / "timing" / f"{stage}.json"


def plots(stage: str) -> Path:
    """A stage's figures and tables."""
    return PLOTS / stage


def embeddings(model: str) -> Path:
    return EMBEDDINGS / f"{model}.npz"


def prototypes(model: str) -> Path:
    """gradcam_segment: the class prototypes and chosen binarisation of one compared model."""
    return GRADCAM / "prototypes" / f"{model}.npz"
