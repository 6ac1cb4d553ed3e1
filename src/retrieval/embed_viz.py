"""How the classes lie in each compared model's embedding space (the embed_viz stage).

The saved embeddings of one split (``load_split_embeddings``), a seeded subsample of them
(``sample``), their 2-D projections by PCA or t-SNE for the figures (``project_2d``) and the
numbers worth comparing, all in the full embedding space: the silhouette score of the classes
(``silhouette``), leave-one-out kNN accuracy and P@1 (``knn_scores``) and the shape of the
classes (``geometry``: radial spokes or compact clusters, for a raw, un-normalised embedding
such as the course's 2-D one). The t-SNE layout only goes into a plot. Nothing here knows about
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
from sklearn.neighbors import NearestNeighbors

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


def silhouette(vectors: np.ndarray, labels: np.ndarray,
               metric: str = "euclidean") -> float | None:
    """Silhouette score of the classes in embedding space (Euclidean, or ``cosine``: by
    direction only); None if undefined."""
    n_classes = len(np.unique(labels))
    if not 2 <= n_classes <= len(labels) - 1:
        return None
    return float(silhouette_score(vectors, labels, metric=metric))


def knn_scores(vectors: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float | None]:
    """Leave-one-out classification by the Euclidean neighbours among these points:
    ``knn_accuracy`` (majority of the k nearest, ties to the nearer class) and ``p_at_1`` (the
    nearest one's class). None when there are not k + 1 points."""
    labels = np.asarray(labels).astype(str)
    if len(labels) <= k:
        return {"knn_accuracy": None, "p_at_1": None}
    # Without a query argument, kneighbors leaves each point out of its own neighbours.
    neighbours = NearestNeighbors(n_neighbors=k).fit(vectors).kneighbors(
        return_distance=False)  # (N, k), nearest first
    voted = labels[neighbours]
    predicted = []
    for row in voted:
        names, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = counts == counts.max()
        predicted.append(names[best][np.argmin(first[best])])  # a tie goes to the nearer class
    return {"knn_accuracy": float(np.mean(np.array(predicted) == labels)),
            "p_at_1": float(np.mean(voted[:, 0] == labels))}


# The spread along a class's direction, over the spread across it, above which its points lie
# on a radial spoke from the origin rather than in a compact cluster.
SPOKE_ELONGATION = 2.0
# Below this silhouette, by position and by direction alike, the classes overlap: no shape.
SEPARATED_SILHOUETTE = 0.1


def geometry(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float | str | None]:
    """How the classes lie around the origin: ``radial_elongation``, the median over classes of
    the standard deviation of the points along the class's mean direction over that across it
    (per dimension), ``silhouette_cosine`` and ``class_shape`` in words. Cross entropy spreads
    a class along a ray (elongation >> 1, cosine silhouette above the Euclidean one); a
    distance loss packs it into a blob (about 1). Unit vectors (``unit_length``) have no radial
    spread: their elongation and shape are None, as when no class has 3 points."""
    vectors = np.asarray(vectors, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    norms = np.linalg.norm(vectors, axis=1)
    elongations = []
    if vectors.shape[1] >= 2 and norms.std() > 1e-3 * max(norms.mean(), 1e-12):
        for name in np.unique(labels):
            mine = vectors[labels == name]
            direction = mine.mean(axis=0)
            if len(mine) < 3 or np.linalg.norm(direction) < 1e-12:
                continue
            direction /= np.linalg.norm(direction)
            along = mine @ direction  # (n,)
            across = mine - np.outer(along, direction)  # (n, D), orthogonal to the direction
            spread_across = np.sqrt((across - across.mean(axis=0)).var(axis=0).sum()
                                    / (vectors.shape[1] - 1))
            elongations.append(along.std() / max(spread_across, 1e-12))
    elongation = float(np.median(elongations)) if elongations else None
    unit_length = bool(np.allclose(norms, 1, atol=1e-3))
    by_direction = silhouette(vectors, labels, "cosine")
    separated = max(silhouette(vectors, labels) or -1, by_direction or -1) >= SEPARATED_SILHOUETTE
    return {"radial_elongation": elongation, "silhouette_cosine": by_direction,
            "unit_length": unit_length,
            "class_shape": shape_of_classes(elongation) if separated or elongation is None
            else "overlapping classes"}


def shape_of_classes(elongation: float | None) -> str | None:
    """'radial spokes' or 'compact clusters' (None for unit vectors): the elongation in words
    (``geometry`` says 'overlapping classes' instead when the classes do not separate)."""
    if elongation is None:
        return None
    return "radial spokes" if elongation >= SPOKE_ELONGATION else "compact clusters"


def before_and_after(compared: Sequence[ComparedModel] = COMPARED_MODELS) -> str:
    """'before training (baseline) and after (frozen, unfrozen)': the models of a figure title."""
    before = ", ".join(model.name for model in compared if not model.trained)
    after = ", ".join(model.name for model in compared if model.trained)
    return f"before training ({before}) and after ({after})"
