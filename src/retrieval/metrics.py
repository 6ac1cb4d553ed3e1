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
their mean, ``bootstrap_f1_ci`` does the same for F1 (not a mean of per-pair values).

Also here, because every metric is computed on them: ``l2_normalize`` and ``pair_distances``,
the one normalisation and the one pair distance of the package, and the pairs' cosine similarity
(``pair_cosine_similarities``, normalising both sides itself) with ``cosine_separation``, its
same-class vs different-class summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import auc, roc_curve

from retrieval.outputs import UserError

# The bootstrap draws (n_boot, n) indices; this caps one block of them (~32 MiB of int64).
_BOOTSTRAP_BLOCK_ELEMENTS = 1 << 22

THRESHOLD_CRITERIA = ("f1", "accuracy")
RECALL_KS = (1, 5, 10)  # the k of recall_at_k


# --------------------------------------------------------------------------- embeddings


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (N, D); an all-zero row stays zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)


def pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between row i of ``a`` and row i of ``b`` (both (P, D)), float64 (P,)."""
    return np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1).astype(np.float64)


def pair_cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` and row i of ``b`` (both (P, D)), float64 (P,) in
    [-1, 1].

    Both sides are L2-normalised here (``l2_normalize``), so the vectors need not be unit length;
    a pair with an all-zero row has similarity 0.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be (P, D) of the same shape, found {a.shape} and "
                         f"{b.shape}")
    cosines = np.einsum("pd,pd->p", l2_normalize(a).astype(np.float64),
                        l2_normalize(b).astype(np.float64))
    return np.clip(cosines, -1.0, 1.0)


SIMILARITY_KEYS = ("cosine_same_mean", "cosine_same_std", "cosine_different_mean",
                   "cosine_different_std", "cosine_gap")


def cosine_separation(a: np.ndarray, b: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """How far apart the embedding puts the classes: cosine similarity of same-class vs
    different-class pairs (row i of ``a`` and of ``b`` are pair i; ``same`` (P,) is 1 for a
    same-class pair).

    Returns ``SIMILARITY_KEYS``: the mean and (population) standard deviation of the pairs'
    cosine similarity (``pair_cosine_similarities``: vectors are normalised first) over the
    same-class and over the different-class pairs, and ``cosine_gap`` = same mean - different
    mean (> 0: same-class pairs are more alike than different-class ones). A group without pairs
    gives NaN.
    """
    cosines = pair_cosine_similarities(a, b)
    is_same = _binary("same", same)
    if is_same.shape != cosines.shape:
        raise ValueError(f"same must have one value per pair ({len(cosines)}), found "
                         f"{len(is_same)}")

    def mean_std(values: np.ndarray) -> tuple[float, float]:
        if values.size == 0:
            return float("nan"), float("nan")
        return float(values.mean()), float(values.std())

    same_mean, same_std = mean_std(cosines[is_same])
    different_mean, different_std = mean_std(cosines[~is_same])
    return {"cosine_same_mean": same_mean, "cosine_same_std": same_std,
            "cosine_different_mean": different_mean, "cosine_different_std": different_std,
            "cosine_gap": same_mean - different_mean}


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


def verification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and the confusion counts in one flat dict.

    Accuracy = (tp + tn) / n, precision = tp / (tp + fp), recall = tp / (tp + fn) and
    F1 = 2·tp / (2·tp + fp + fn), each 0.0 where its denominator is 0 (scikit-learn's
    ``zero_division=0``).
    """
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


def per_query_retrieval(
    neighbor_labels: np.ndarray,
    query_labels: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, np.ndarray]:
    """Every retrieval score of each query from a (Q, K) nearest-neighbour label matrix, (Q,) each.

    ``n_relevant`` (the input, passed through), ``precision_at_1``, ``precision_at_5`` (fraction
    of the top 5 that is relevant), ``recall_at_{k}`` for each k in ``ks``, ``ap`` and ``ap_at_r``
    (``per_query_average_precision``; NaN where ``n_relevant == 0``) and ``found_all`` (every
    relevant item is among the K, so ``ap`` is exact AP, not AP@K). Rows are independent, so the
    matrix can be scored in chunks of queries.

    ``recall_at_k`` follows the metric-learning convention (Recall@K in the CUB/SOP/In-shop
    papers): 1.0 if *at least one* relevant item is in the top k, not the fraction of all
    relevant items retrieved. Where K < 5 or K < k (a gallery that small), the scores at 5 and k
    are those of the top K.
    """
    relevant = _relevance(neighbor_labels, query_labels)  # (Q, K)
    counts = _checked_n_relevant(n_relevant, relevant)  # (Q,)
    if relevant.shape[1] == 0:
        raise ValueError("neighbor_labels has no columns: search with k >= 1")
    if min(ks, default=1) < 1:
        raise ValueError(f"ks must be positive ranks, found {list(ks)}")
    scores = {"n_relevant": counts,
              "precision_at_1": relevant[:, 0].astype(np.float64),
              "precision_at_5": relevant[:, :5].mean(axis=1)}
    for k in ks:
        scores[f"recall_at_{k}"] = relevant[:, :k].any(axis=1).astype(np.float64)
    scores["ap"] = per_query_average_precision(neighbor_labels, query_labels, counts)
    scores["ap_at_r"] = per_query_average_precision(neighbor_labels, query_labels, counts,
                                                    at_r=True)
    scores["found_all"] = relevant.sum(axis=1) == counts
    return scores


def retrieval_metrics(per_query: Mapping[str, np.ndarray]) -> dict[str, float | int | bool]:
    """Headline retrieval metrics: the means of ``per_query_retrieval``'s scores over the queries
    that have a relevant gallery item (``per_query`` may be that dict or a DataFrame of it).

    Returns ``precision_at_1``, ``precision_at_5``, each ``recall_at_{k}``, ``map``, ``map_at_r``,
    ``map_exact`` (every scored query found all its relevant items: ``map`` is exact mAP, not
    mAP@K), ``n_queries`` (scored) and ``n_queries_without_relevant`` (excluded).
    """
    scored = np.asarray(per_query["n_relevant"]) > 0  # (Q,)
    if not scored.any():
        raise UserError("no query has a relevant gallery item (n_relevant is 0 everywhere): "
                        "queries and gallery share no class")

    def mean(name: str) -> float:
        return float(np.asarray(per_query[name])[scored].mean())

    recalls = [name for name in per_query if str(name).startswith("recall_at_")]
    summary: dict[str, float | int | bool] = {
        name: mean(name) for name in ("precision_at_1", "precision_at_5", *recalls)}
    summary["map"] = mean("ap")
    summary["map_at_r"] = mean("ap_at_r")
    summary["map_exact"] = bool(np.asarray(per_query["found_all"])[scored].all())
    summary["n_queries"] = int(scored.sum())
    summary["n_queries_without_relevant"] = int((~scored).sum())
    return summary


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


def bootstrap_auc_ci(distances: np.ndarray, same: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC over resampled pairs (smaller distance means
    more similar). Resamples that draw a single class (no AUC) are skipped."""
    from sklearn.metrics import roc_auc_score

    scores, same = -np.asarray(distances, dtype=np.float64), np.asarray(same).astype(int)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        draw = rng.integers(0, same.size, size=same.size)
        if 0 < same[draw].sum() < same.size:
            values.append(roc_auc_score(same[draw], scores[draw]))
    if not values:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_f1_ci(same: np.ndarray, predicted: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of F1 over resampled pairs (F1 is not a mean of per-pair
    values, so ``bootstrap_ci`` does not apply); the threshold stays fixed."""
    same, predicted = np.asarray(same).astype(bool), np.asarray(predicted).astype(bool)
    tp, fp, fn = same & predicted, ~same & predicted, same & ~predicted
    rng = np.random.default_rng(seed)
    n = same.size
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    values = []
    for start in range(0, n_boot, block):
        draw = rng.integers(0, n, size=(min(block, n_boot - start), n))  # (B, n)
        n_tp, n_fp, n_fn = tp[draw].sum(1), fp[draw].sum(1), fn[draw].sum(1)
        denominator = 2 * n_tp + n_fp + n_fn
        values.append(np.where(denominator > 0, 2 * n_tp / np.maximum(denominator, 1), 0.0))
    low, high = np.quantile(np.concatenate(values), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
