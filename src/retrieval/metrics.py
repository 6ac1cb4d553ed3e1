"""Evaluation metrics as pure functions over numpy arrays.

Two families, both independent of how the inputs were produced:

* **Pair verification**: ``y_true``/``y_pred`` are 0/1 arrays (1 = same class) and distances are
  Euclidean distances between the two embeddings of a pair. Accuracy, precision, recall and F1
  follow scikit-learn with ``zero_division=0``; ROC/EER/FNMR@FMR treat a *smaller* distance as
  more "same", i.e. the score is ``-distance``.
* **Retrieval**: functions of a precomputed nearest-neighbour label matrix
  (``neighbor_labels[q, j]`` = label of the j-th nearest gallery item of query q), kept separate
  from the search itself as in pytorch-metric-learning. ``n_relevant[q]`` is the number of gallery
  items that share the label of query q over the *whole* gallery (see ``count_relevant``);
  queries with ``n_relevant == 0`` cannot be scored and are excluded and counted.

``bootstrap_ci`` turns any per-item values (per pair or per query) into a confidence interval for
their mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import auc, roc_curve

# The bootstrap draws (n_boot, n) indices; this caps one block of them (~32 MiB of int64).
_BOOTSTRAP_BLOCK_ELEMENTS = 1 << 22

THRESHOLD_CRITERIA = ("f1", "accuracy")


# --------------------------------------------------------------------------- validation


def _binary(name: str, values: np.ndarray) -> np.ndarray:
    """Return ``values`` as a 1-D bool array, or raise if it is not made of 0/1."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, found shape {array.shape}: pass one value per pair")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            found = np.unique(array[~np.isin(array, (0, 1))])[:5]
            raise ValueError(
                f"{name} must contain only 0/1 (1 = same class), found {found.tolist()}: "
                "binarise the labels first"
            )
        array = array.astype(bool)
    return array


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true, pred = _binary("y_true", y_true), _binary("y_pred", y_pred)
    if true.shape != pred.shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, found {len(true)} and {len(pred)}"
        )
    return true, pred


def _distances_and_same(distances: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64)
    s = _binary("same", same)
    if d.ndim != 1 or d.shape != s.shape:
        raise ValueError(
            f"distances and same must be 1-D arrays of equal length, found shapes {d.shape} "
            f"and {s.shape}"
        )
    if d.size == 0:
        raise ValueError("distances is empty: need at least one pair")
    if not np.isfinite(d).all():
        raise ValueError("distances contains NaN or inf: check the embeddings for NaNs")
    return d, s


def _both_classes(same: np.ndarray) -> None:
    # A ROC curve needs both kinds of pair; sklearn would only warn and return NaNs.
    n_same = int(same.sum())
    if n_same == 0 or n_same == same.size:
        raise ValueError(
            f"ROC needs both same and different pairs, found {n_same} same of {same.size}: "
            "evaluate on a pair set that contains both"
        )


def _divide(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is 0 (sklearn's zero_division=0)."""
    return float(numerator) / float(denominator) if denominator else 0.0


# --------------------------------------------------------------------------- pair verification


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """Confusion counts ``{"tp", "tn", "fp", "fn"}`` with 1 (same class) as the positive class."""
    true, pred = _pair(y_true, y_pred)
    return {
        "tp": int(np.sum(true & pred)),
        "tn": int(np.sum(~true & ~pred)),
        "fp": int(np.sum(~true & pred)),
        "fn": int(np.sum(true & ~pred)),
    }


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of pairs predicted correctly (0.0 for no pairs)."""
    c = confusion(y_true, y_pred)
    return _divide(c["tp"] + c["tn"], sum(c.values()))


def precision(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """tp / (tp + fp); 0.0 when nothing is predicted positive."""
    c = confusion(y_true, y_pred)
    return _divide(c["tp"], c["tp"] + c["fp"])


def recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """tp / (tp + fn); 0.0 when there are no positive pairs."""
    c = confusion(y_true, y_pred)
    return _divide(c["tp"], c["tp"] + c["fn"])


def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """2·tp / (2·tp + fp + fn), the harmonic mean of precision and recall; 0.0 when undefined."""
    c = confusion(y_true, y_pred)
    return _divide(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])


def verification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and the confusion counts in one flat dict."""
    c = confusion(y_true, y_pred)
    return {
        "accuracy": _divide(c["tp"] + c["tn"], sum(c.values())),
        "precision": _divide(c["tp"], c["tp"] + c["fp"]),
        "recall": _divide(c["tp"], c["tp"] + c["fn"]),
        "f1": _divide(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
        **c,
    }


def choose_threshold(distances: np.ndarray, same: np.ndarray, criterion: str = "f1") -> float:
    """The distance threshold ``t`` (predict "same" when ``d <= t``) that maximises ``criterion``.

    Pick it on validation pairs and apply it unchanged to test pairs. Candidates are the midpoints
    between consecutive sorted unique distances (the most robust cut between two observed values)
    plus the two ends: ``min(d) - 1`` (no pair predicted same) and ``max(d)`` (all pairs same).
    Ties go to the smallest threshold. Every candidate is scored at once from cumulative counts,
    so this is O(n log n) for n pairs.
    """
    if criterion not in THRESHOLD_CRITERIA:
        raise ValueError(f"criterion must be one of {THRESHOLD_CRITERIA}, found {criterion!r}")
    d, s = _distances_and_same(distances, same)
    unique, group = np.unique(d, return_inverse=True)  # (m,), (n,)
    # Candidate i predicts "same" for the first i unique distances, i = 0..m.
    predicted_same = np.concatenate([[0], np.cumsum(np.bincount(group))])  # (m+1,)
    tp = np.concatenate([[0], np.cumsum(np.bincount(group, weights=s))])  # (m+1,)
    fp = predicted_same - tp
    fn = s.sum() - tp
    if criterion == "f1":
        denominator = 2 * tp + fp + fn
        score = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    else:
        tn = (s.size - s.sum()) - fp
        score = (tp + tn) / s.size
    candidates = np.concatenate([[unique[0] - 1.0], (unique[:-1] + unique[1:]) / 2, [unique[-1]]])
    return float(candidates[int(np.argmax(score))])  # argmax returns the first, smallest t


def roc(distances: np.ndarray, same: np.ndarray) -> dict[str, np.ndarray | float]:
    """ROC curve of "same" pairs scored by ``-distance``.

    Returns ``fpr``, ``tpr`` and ``thresholds`` (on distance, increasing; the first is ``-inf``:
    nothing predicted same) and ``auc``. Every threshold is kept (no ``drop_intermediate``) so
    that ``fnmr_at_fmr`` can read exact operating points off the curve.
    """
    d, s = _distances_and_same(distances, same)
    _both_classes(s)
    fpr, tpr, score_thresholds = roc_curve(s, -d, drop_intermediate=False)
    return {
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": -score_thresholds,
        "auc": float(auc(fpr, tpr)),
    }


def equal_error_rate(distances: np.ndarray, same: np.ndarray) -> float:
    """The rate at which false matches equal false non-matches (FMR = FNMR).

    Interpolated linearly between the two ROC points where ``FNMR - FMR`` changes sign;
    0.0 for perfectly separable pairs.
    """
    curve = roc(distances, same)
    fpr, fnr = curve["fpr"], 1.0 - curve["tpr"]
    gap = fnr - fpr  # starts at 1 (nothing accepted), ends at -1 (everything accepted)
    i = int(np.argmax(gap <= 0))  # first crossing; i >= 1 because gap[0] == 1
    weight = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + weight * (fpr[i] - fpr[i - 1]))


def fnmr_at_fmr(distances: np.ndarray, same: np.ndarray, fmr: float) -> float:
    """False non-match rate at the best threshold whose false match rate is at most ``fmr``.

    E.g. ``fmr=1e-3`` answers "how many genuine pairs are rejected if at most 0.1% of impostor
    pairs may be accepted?". Needs enough different pairs for ``fmr`` to be resolvable
    (1/fmr of them or more).
    """
    if not 0.0 <= fmr <= 1.0:
        raise ValueError(f"fmr must be in [0, 1], found {fmr}")
    curve = roc(distances, same)
    allowed = curve["fpr"] <= fmr  # always true at the first point (fpr = 0)
    return float(1.0 - curve["tpr"][allowed].max())


# --------------------------------------------------------------------------- retrieval


def count_relevant(
    query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool = False
) -> np.ndarray:
    """Number of gallery items sharing each query's label, shape (Q,).

    Use ``exclude_self=True`` when the query set *is* the gallery (and the search excluded each
    query's own index), so that a query does not count itself as relevant.
    """
    queries, gallery = np.asarray(query_labels), np.asarray(gallery_labels)
    if queries.ndim != 1 or gallery.ndim != 1:
        raise ValueError(f"labels must be 1-D, found shapes {queries.shape} and {gallery.shape}")
    if exclude_self and queries.shape != gallery.shape:
        raise ValueError(
            f"exclude_self=True needs the query set to be the gallery, found {len(queries)} "
            f"queries and {len(gallery)} gallery items: pass exclude_self=False"
        )
    if gallery.size == 0:
        raise ValueError("gallery_labels is empty: need at least one gallery item")
    unique, counts = np.unique(gallery, return_counts=True)  # sorted, so searchsorted works
    position = np.minimum(np.searchsorted(unique, queries), len(unique) - 1)  # (Q,)
    n_relevant = np.where(unique[position] == queries, counts[position], 0)
    return n_relevant - int(exclude_self)


def _relevance(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Boolean (Q, K) matrix: does the j-th neighbour of query q share its label?"""
    neighbors, queries = np.asarray(neighbor_labels), np.asarray(query_labels)
    if neighbors.ndim != 2 or queries.ndim != 1 or len(neighbors) != len(queries):
        raise ValueError(
            "neighbor_labels must be (Q, K) and query_labels (Q,), found shapes "
            f"{neighbors.shape} and {queries.shape}"
        )
    return neighbors == queries[:, None]


def _checked_n_relevant(n_relevant: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    counts = np.asarray(n_relevant)
    if counts.shape != relevant.shape[:1]:
        raise ValueError(
            f"n_relevant must have one count per query ({relevant.shape[0]}), "
            f"found shape {counts.shape}"
        )
    if (counts < 0).any():
        raise ValueError("n_relevant must be >= 0, found negative counts")
    too_small = int((relevant.sum(axis=1) > counts).sum())
    if too_small:
        # The classic cause: counting the query itself in the gallery, or not, inconsistently.
        raise ValueError(
            f"{too_small} queries have more relevant neighbours in the top K than n_relevant: "
            "count relevant items over the whole gallery, excluding the query itself only if "
            "the search excluded it (count_relevant(..., exclude_self=...))"
        )
    return counts


def per_query_precision_at_1(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """1.0 where the nearest neighbour shares the query's label, else 0.0, shape (Q,)."""
    relevant = _relevance(neighbor_labels, query_labels)
    if relevant.shape[1] == 0:
        raise ValueError("neighbor_labels has no columns: search with k >= 1")
    return relevant[:, 0].astype(np.float64)


def per_query_average_precision(
    neighbor_labels: np.ndarray,
    query_labels: np.ndarray,
    n_relevant: np.ndarray,
    at_r: bool = False,
) -> np.ndarray:
    """Average precision of each query's ranking, shape (Q,); NaN where ``n_relevant == 0``.

    AP = (1/R) · Σ_j P@j · rel_j with R = ``n_relevant`` over the ranks j = 1..K given. This is
    exact AP when K covers the whole gallery and AP@K otherwise (relevant items beyond K count as
    never retrieved). With ``at_r=True`` only ranks j <= R count: AP@R from MAP@R
    (Musgrave et al. 2020, "A Metric Learning Reality Check"); exact when K >= max(R).
    Drop the NaNs (``v[~np.isnan(v)]``) before averaging or bootstrapping.
    """
    relevant = _relevance(neighbor_labels, query_labels)  # (Q, K)
    counts = _checked_n_relevant(n_relevant, relevant)  # (Q,)
    ranks = np.arange(1, relevant.shape[1] + 1)  # (K,)
    if at_r:
        relevant = relevant & (ranks[None, :] <= counts[:, None])
    precision_at_rank = np.cumsum(relevant, axis=1) / ranks  # (Q, K)
    summed = np.sum(precision_at_rank * relevant, axis=1)  # (Q,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, summed / counts, np.nan)


def retrieval_metrics(
    neighbor_labels: np.ndarray,
    query_labels: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float | int]:
    """Headline retrieval metrics from a (Q, K) nearest-neighbour label matrix.

    Returns ``precision_at_1``, ``precision_at_5`` (fraction of the top 5 that is relevant),
    ``recall_at_{k}`` for each k in ``ks``, ``map``, ``map_at_r``, ``n_queries`` (scored) and
    ``n_queries_without_relevant`` (excluded because ``n_relevant == 0``).

    ``recall_at_k`` follows the metric-learning convention (Recall@K in the CUB/SOP/In-shop
    papers): the fraction of queries with *at least one* relevant item in the top k, not the
    fraction of all relevant items retrieved. ``map`` is exact when K covers the whole gallery and
    mAP@K otherwise (see ``per_query_average_precision``); ``map_at_r`` is exact when
    K >= max(n_relevant).
    """
    relevant = _relevance(neighbor_labels, query_labels)  # (Q, K)
    counts = _checked_n_relevant(n_relevant, relevant)
    needed = max([5, *ks])
    if min(ks, default=1) < 1:
        raise ValueError(f"ks must be positive ranks, found {list(ks)}")
    if relevant.shape[1] < needed:
        raise ValueError(
            f"neighbor_labels has K={relevant.shape[1]} columns but these metrics need {needed} "
            "(max of ks and 5): search with a larger k or pass smaller ks"
        )
    scored = counts > 0
    if not scored.any():
        raise ValueError(
            "no query has a relevant gallery item (n_relevant is 0 everywhere): check that "
            "queries and gallery share labels"
        )
    neighbors = np.asarray(neighbor_labels)[scored]
    queries = np.asarray(query_labels)[scored]
    relevant, counts = relevant[scored], counts[scored]

    results: dict[str, float | int] = {
        "precision_at_1": float(relevant[:, 0].mean()),
        "precision_at_5": float(relevant[:, :5].mean()),
    }
    for k in ks:
        results[f"recall_at_{k}"] = float(relevant[:, :k].any(axis=1).mean())
    results["map"] = float(per_query_average_precision(neighbors, queries, counts).mean())
    results["map_at_r"] = float(
        per_query_average_precision(neighbors, queries, counts, at_r=True).mean()
    )
    results["n_queries"] = int(scored.sum())
    results["n_queries_without_relevant"] = int((~scored).sum())
    return results


def per_class_precision_at_1(
    neighbor_labels: np.ndarray,
    query_labels: np.ndarray,
    n_relevant: np.ndarray | None = None,
) -> dict[object, float]:
    """Precision@1 averaged over the queries of each class, keyed by label (sorted).

    Pass ``n_relevant`` to leave out queries that have no relevant gallery item, as
    ``retrieval_metrics`` does; classes left with no query are then omitted.
    """
    hits = per_query_precision_at_1(neighbor_labels, query_labels)  # (Q,)
    labels = np.asarray(query_labels)
    if n_relevant is not None:
        keep = _checked_n_relevant(n_relevant, _relevance(neighbor_labels, query_labels)) > 0
        hits, labels = hits[keep], labels[keep]
    classes, group = np.unique(labels, return_inverse=True)
    means = np.bincount(group, weights=hits, minlength=len(classes)) / np.bincount(
        group, minlength=len(classes)
    )
    # Plain Python keys so the dict goes straight into JSON / MLflow.
    keys = [c.item() if isinstance(c, np.generic) else c for c in classes]
    return dict(zip(keys, means.tolist(), strict=True))


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    per_item_values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval for the mean of ``per_item_values`` (n,).

    Items (pairs or queries) are resampled with replacement ``n_boot`` times; the interval covers
    ``1 - alpha`` of the resampled means. Replicates are drawn in blocks so memory stays bounded
    for large n.
    """
    values = np.asarray(per_item_values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"per_item_values must be a non-empty 1-D array, found shape {values.shape}"
        )
    if not np.isfinite(values).all():
        raise ValueError(
            "per_item_values contains NaN or inf: drop unscored items first (v[~np.isnan(v)])"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, found {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), found {alpha}")
    rng = np.random.default_rng(seed)
    n = values.size
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(block, n_boot - start), n))].mean(axis=1)
            for start in range(0, n_boot, block)
        ]
    )  # (n_boot,)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
