"""How the classes lie in each compared model's embedding space (the embed_viz stage).

The saved embeddings of one split (``load_split_embeddings``), a seeded subsample of them
(``sample``), their 2-D projections by PCA or t-SNE for the figures (``project_2d``) and the
silhouette score of the classes in the full embedding space (``silhouette``): the score is the
number worth comparing, the t-SNE layout only goes into a plot. Nothing here knows about
params.yaml or folders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from retrieval import rng
from retrieval.compared import COMPARED_MODELS, ComparedModel
from retrieval.evaluation import Embeddings
from retrieval.outputs import UserError


def load_split_embeddings(paths: Mapping[str, str | Path], split: str) -> dict[str, Embeddings]:
    """Each model's saved embeddings of one split; they must cover the same images in order."""
    loaded = {name: Embeddings.load(path).subset(split) for name, path in paths.items()}
    first_name, first = next(iter(loaded.items()))
    if len(first.rows) < 3:
        raise UserError(f"{paths[first_name]} holds {len(first.rows)} {split} image(s): "
                        "need >= 3 to project")
    for name, other in loaded.items():
        if not np.array_equal(other.rows, first.rows):
            raise UserError(f"{paths[name]} and {paths[first_name]} embed different images: "
                            "re-run evaluate")
    return loaded


def sample(n: int, max_points: int, seed: int) -> np.ndarray:
    """At most ``max_points`` of ``n`` positions, a seeded uniform choice, sorted."""
    return rng.subsample(n, max_points, seed, rng.Subsample.EMBED_VIZ_POINTS)


def highlighted_classes(labels: np.ndarray, count: int) -> list[str]:
    """The ``count`` largest classes (ties broken by name): the ones a scatter plot colours."""
    sizes = pd.Series(labels).value_counts()
    frame = pd.DataFrame({"label": sizes.index.astype(str), "size": sizes.to_numpy()})
    return frame.sort_values(["size", "label"], ascending=[False, True],
                             kind="stable")["label"].head(count).tolist()


def perplexity_used(n_points: int, perplexity: float) -> float:
    """t-SNE's perplexity, capped at (N - 1) / 3 so that small samples still work."""
    return min(perplexity, (n_points - 1) / 3)


def project_2d(vectors: np.ndarray, method: str, seed: int,
               perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) coordinates by PCA or t-SNE (seeded, PCA-initialised, on <= 50 PCA dimensions,
    perplexity capped by ``perplexity_used``)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < 3:
        raise UserError(f"a 2-D projection needs >= 3 points, found {len(vectors)}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method != "tsne":
        raise ValueError(f"method must be 'pca' or 'tsne', found {method!r}")
    if vectors.shape[1] > 50:  # the usual speed-up: t-SNE on the top principal components
        vectors = PCA(n_components=min(50, len(vectors)), random_state=seed).fit_transform(vectors)
    tsne = TSNE(n_components=2, perplexity=perplexity_used(len(vectors), perplexity),
                init="pca", learning_rate="auto", random_state=seed, n_jobs=1)
    return tsne.fit_transform(vectors)


def silhouette(vectors: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette score of the classes in embedding space (Euclidean); None if undefined."""
    n_classes = len(np.unique(labels))
    if not 2 <= n_classes <= len(labels) - 1:
        return None
    return float(silhouette_score(vectors, labels, metric="euclidean"))


def before_and_after(compared: Sequence[ComparedModel] = COMPARED_MODELS) -> str:
    """'before training (baseline) and after (frozen, unfrozen)': the models of a figure title."""
    before = ", ".join(model.name for model in compared if not model.trained)
    after = ", ".join(model.name for model in compared if model.trained)
    return f"before training ({before}) and after ({after})"
