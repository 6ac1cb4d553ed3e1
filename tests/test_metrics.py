"""Metrics against scikit-learn, pytorch-metric-learning and hand-worked toy cases."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from retrieval import metrics
from retrieval.outputs import UserError
from retrieval.search import knn

SKLEARN = {
    "accuracy": accuracy_score,
    "precision": lambda t, p: precision_score(t, p, zero_division=0),
    "recall": lambda t, p: recall_score(t, p, zero_division=0),
    "f1": lambda t, p: f1_score(t, p, zero_division=0),
}

# Hand cases, including every zero division: no predicted positives, no true positives, both.
HAND_CASES = [
    ([1, 1, 0, 0], [1, 0, 1, 0]),
    ([1, 1, 1, 1], [0, 0, 0, 0]),  # nothing predicted same: precision 0/0
    ([0, 0, 0, 0], [1, 1, 0, 0]),  # no same pairs: recall 0/0
    ([0, 0, 0], [0, 0, 0]),  # precision, recall and F1 all 0/0
    ([1], [1]),
]


def random_cases(n_cases=20, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n = int(rng.integers(1, 60))
        yield rng.integers(0, 2, n), rng.integers(0, 2, n)


# --------------------------------------------------------------------------- verification


@pytest.mark.parametrize("y_true, y_pred", HAND_CASES + list(random_cases()))
def test_verification_metrics_match_sklearn(y_true, y_pred):
    scores = metrics.verification_scores(y_true, y_pred)
    for name, reference in SKLEARN.items():
        assert scores[name] == pytest.approx(reference(y_true, y_pred))
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    assert metrics.confusion(y_true, y_pred) == {"tp": tp, "tn": tn, "fp": fp, "fn": fn}


def test_confusion_by_hand():
    # pairs: (1,1) tp, (1,0) fn, (0,1) fp, (0,0) tn, (0,0) tn
    assert metrics.confusion([1, 1, 0, 0, 0], [1, 0, 1, 0, 0]) == {
        "tp": 1,
        "tn": 2,
        "fp": 1,
        "fn": 1,
    }


def test_bool_inputs_are_accepted():
    scores = metrics.verification_scores(np.array([True, False]), np.array([True, True]))
    assert scores["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "y_true, y_pred, message",
    [
        ([0, 2], [0, 1], "only 0/1"),
        ([0, 1, 1], [0, 1], "same length"),
        ([[0, 1]], [[0, 1]], "1-D"),
    ],
)
def test_verification_rejects_bad_input(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        metrics.verification_scores(y_true, y_pred)


def test_choose_threshold_hand_case():
    # Same pairs at 0.1 and 0.2, different pairs at 0.8 and 0.9: the cut belongs halfway
    # between 0.2 and 0.8, and it is perfect for both criteria.
    distances = [0.9, 0.1, 0.8, 0.2]
    same = [0, 1, 0, 1]
    assert metrics.choose_threshold(distances, same, "f1") == pytest.approx(0.5)
    assert metrics.choose_threshold(distances, same, "accuracy") == pytest.approx(0.5)


def test_choose_threshold_criteria_can_disagree():
    # d:    0.1 0.2 0.3 0.4 0.5
    # same:  1   0   1   0   0
    # t=0.15: tp1 fp0 fn1 tn3 -> acc 4/5, F1 2/3
    # t=0.35: tp2 fp1 fn0 tn2 -> acc 4/5, F1 4/5
    # Accuracy ties at 0.15 and 0.35 and takes the smaller; F1 prefers 0.35.
    distances = [0.1, 0.2, 0.3, 0.4, 0.5]
    same = [1, 0, 1, 0, 0]
    assert metrics.choose_threshold(distances, same, "accuracy") == pytest.approx(0.15)
    assert metrics.choose_threshold(distances, same, "f1") == pytest.approx(0.35)


def test_choose_threshold_ends():
    # All pairs different: the best accuracy predicts nothing same, a threshold below every d.
    assert metrics.choose_threshold([0.3, 0.7], [0, 0], "accuracy") < 0.3
    # All pairs same: accept everything, t = max(d).
    assert metrics.choose_threshold([0.3, 0.7], [1, 1], "f1") == pytest.approx(0.7)


@pytest.mark.parametrize("criterion", ["f1", "accuracy"])
def test_choose_threshold_is_optimal_on_random_pairs(criterion):
    rng = np.random.default_rng(1)
    same = rng.integers(0, 2, 200)
    distances = np.round(rng.normal(1.0 - 0.5 * same, 0.3), 2)  # rounded: plenty of ties
    def score(y_true, y_pred):
        return metrics.verification_scores(y_true, y_pred)[criterion]

    best = metrics.choose_threshold(distances, same, criterion)
    best_score = score(same, distances <= best)
    for t in np.unique(distances):  # brute force over every distinct cut
        assert score(same, distances <= t) <= best_score + 1e-12


def test_choose_threshold_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion"):
        metrics.choose_threshold([0.1], [1], "precision")


def test_roc_hand_case():
    # d:    0.1 0.2 0.3 0.4
    # same:  1   0   1   0
    # Same pairs beat different ones in 3 of 4 (same, different) comparisons: AUC = 0.75.
    # Accepting d <= 0.2 gives FMR = 1/2 and FNMR = 1/2: EER = 0.5.
    distances, same = [0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0]
    curve = metrics.roc(distances, same)
    assert curve["auc"] == pytest.approx(0.75)
    assert curve["auc"] == pytest.approx(roc_auc_score(same, -np.asarray(distances)))
    np.testing.assert_allclose(curve["fpr"], [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(curve["tpr"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(curve["thresholds"][1:], [0.1, 0.2, 0.3, 0.4])
    assert metrics.equal_error_rate(distances, same) == pytest.approx(0.5)
    # FMR <= 0: only d <= 0.1 accepted, half of the same pairs rejected.
    assert metrics.fnmr_at_fmr(distances, same, 0.0) == pytest.approx(0.5)
    assert metrics.fnmr_at_fmr(distances, same, 0.5) == pytest.approx(0.0)


def test_eer_interpolates_between_roc_points():
    # d:    0.1 0.2 0.3
    # same:  1   0   0   -> ROC (fpr, fnr): (0, 1), (0, 0), (0.5, 0), (1, 0); crossing at 0.
    assert metrics.equal_error_rate([0.1, 0.2, 0.3], [1, 0, 0]) == pytest.approx(0.0)
    # d:    0.1 0.2
    # same:  0   1   -> (fpr, fnr): (0, 1), (1, 1), (1, 0); FNMR - FMR goes 1, 0 -> EER = 1.
    assert metrics.equal_error_rate([0.1, 0.2], [0, 1]) == pytest.approx(1.0)


def test_separable_pairs():
    rng = np.random.default_rng(0)
    distances = np.concatenate([rng.uniform(0, 1, 50), rng.uniform(2, 3, 50)])
    same = np.repeat([1, 0], 50)
    assert metrics.roc(distances, same)["auc"] == pytest.approx(1.0)
    assert metrics.equal_error_rate(distances, same) == pytest.approx(0.0)
    assert metrics.fnmr_at_fmr(distances, same, 0.0) == pytest.approx(0.0)
    threshold = metrics.choose_threshold(distances, same)
    assert distances[:50].max() < threshold < distances[50:].min()


def test_random_auc_matches_sklearn():
    rng = np.random.default_rng(2)
    same = rng.integers(0, 2, 300)
    distances = rng.normal(1.0 - 0.3 * same, 0.5)
    assert metrics.roc(distances, same)["auc"] == pytest.approx(roc_auc_score(same, -distances))


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="both same and different"):
        metrics.roc([0.1, 0.2], [1, 1])


# --------------------------------------------------------------------------- retrieval

# Three queries, five neighbours each.
#   q0 label 0, neighbours 0 1 0 1 1, 2 relevant in the gallery:
#       relevance 1 0 1 0 0 -> AP = (1/1 + 2/3) / 2 = 0.8333; AP@R (R=2) = (1/1) / 2 = 0.5
#   q1 label 1, neighbours 0 1 1 1 0, 3 relevant:
#       relevance 0 1 1 1 0 -> AP = (1/2 + 2/3 + 3/4) / 3 = 0.6389; AP@R (R=3) = (1/2 + 2/3) / 3
#   q2 label 2, neighbours 0 0 0 0 0, 0 relevant: cannot be scored, excluded.
TOY_NEIGHBORS = np.array([[0, 1, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
TOY_QUERIES = np.array([0, 1, 2])
TOY_N_RELEVANT = np.array([2, 3, 0])


def test_retrieval_metrics_toy_matrix():
    per_query = metrics.per_query_retrieval(TOY_NEIGHBORS, TOY_QUERIES, TOY_N_RELEVANT,
                                            ks=(1, 2, 5))
    np.testing.assert_array_equal(per_query["precision_at_1"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(per_query["found_all"], [True, True, True])
    result = metrics.retrieval_metrics(per_query)
    assert result["n_queries"] == 2
    assert result["n_queries_without_relevant"] == 1
    assert result["precision_at_1"] == pytest.approx(0.5)  # q0 hit, q1 miss
    assert result["precision_at_5"] == pytest.approx((2 / 5 + 3 / 5) / 2)
    assert result["recall_at_1"] == pytest.approx(0.5)
    assert result["recall_at_2"] == pytest.approx(1.0)  # both have a relevant item in the top 2
    assert result["recall_at_5"] == pytest.approx(1.0)
    ap = [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 3 / 4) / 3]
    assert result["map"] == pytest.approx(np.mean(ap))
    ap_at_r = [1 / 2, (1 / 2 + 2 / 3) / 3]
    assert result["map_at_r"] == pytest.approx(np.mean(ap_at_r))
    assert result["map_exact"] is True


def test_retrieval_scores_of_the_top_k_when_fewer_columns_than_k():
    # q0 relevance 1 0 (2 relevant): P@5 counts the two columns there are, recall@10 the top 2;
    # the second relevant item is beyond K = 2, so its AP is AP@2 and not exact.
    per_query = metrics.per_query_retrieval(np.array([[0, 1]]), np.array([0]), np.array([2]))
    assert per_query["precision_at_5"][0] == 0.5 and per_query["recall_at_10"][0] == 1.0
    assert per_query["ap"][0] == pytest.approx(1 / 2)
    assert not metrics.retrieval_metrics(per_query)["map_exact"]


def test_per_query_average_precision_marks_unscorable_queries():
    ap = metrics.per_query_average_precision(TOY_NEIGHBORS, TOY_QUERIES, TOY_N_RELEVANT)
    np.testing.assert_allclose(ap[:2], [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 3 / 4) / 3])
    assert np.isnan(ap[2])


def test_average_precision_counts_relevant_items_beyond_k():
    # relevance 1 0 1 with 4 relevant in the gallery: two were never retrieved, so AP@3 is
    # (1/1 + 2/3) / 4, not divided by the 2 that were found.
    ap = metrics.per_query_average_precision(np.array([[7, 0, 7]]), np.array([7]), np.array([4]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 4)


def test_count_relevant():
    gallery = np.array([3, 1, 3, 3, 2])
    np.testing.assert_array_equal(metrics.count_relevant(np.array([3, 2, 9]), gallery), [3, 1, 0])
    np.testing.assert_array_equal(
        metrics.count_relevant(gallery, gallery, exclude_self=True), [2, 0, 2, 2, 0]
    )


def test_retrieval_metrics_reject_inconsistent_n_relevant():
    # q0's top 5 holds 2 relevant items but n_relevant says 1: the query counted itself wrongly.
    with pytest.raises(ValueError, match="more relevant neighbours"):
        metrics.per_query_retrieval(TOY_NEIGHBORS, TOY_QUERIES, np.array([1, 3, 0]))


def test_retrieval_metrics_need_a_scorable_query():
    per_query = metrics.per_query_retrieval(TOY_NEIGHBORS[2:], TOY_QUERIES[2:], np.zeros(1, int))
    with pytest.raises(UserError, match="no query has a relevant"):
        metrics.retrieval_metrics(per_query)


def clustered_embeddings(n_classes, per_class, dim, seed):
    """Noisy class clusters, with a few singleton classes that have no relevant item."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    labels = np.concatenate([labels, [n_classes, n_classes + 1]])  # two lone queries
    centres = rng.normal(size=(n_classes + 2, dim))
    embeddings = centres[labels] + rng.normal(scale=1.5, size=(len(labels), dim))
    return embeddings.astype(np.float32), labels


def pml_accuracy(query, query_labels, reference=None, reference_labels=None):
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision", "mean_average_precision_at_r"),
        k=None,  # all references, so mean_average_precision is exact
        device=torch.device("cpu"),
    )
    return calculator.get_accuracy(query, query_labels, reference, reference_labels)


def test_matches_pytorch_metric_learning_query_is_gallery():
    embeddings, labels = clustered_embeddings(n_classes=8, per_class=12, dim=16, seed=0)
    _, indices = knn(embeddings, embeddings, k=len(labels), exclude_self=True)
    n_relevant = metrics.count_relevant(labels, labels, exclude_self=True)
    ours = metrics.retrieval_metrics(
        metrics.per_query_retrieval(labels[indices], labels, n_relevant))
    theirs = pml_accuracy(embeddings, labels)
    assert ours["n_queries_without_relevant"] == 2
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"])
    assert ours["map"] == pytest.approx(theirs["mean_average_precision"])
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"])
    assert 0.05 < ours["map_at_r"] < 0.95  # neither trivial nor hopeless


def test_matches_pytorch_metric_learning_separate_gallery():
    embeddings, labels = clustered_embeddings(n_classes=6, per_class=15, dim=8, seed=1)
    query = np.ascontiguousarray(embeddings[::3])  # faiss-on-torch needs contiguous tensors
    gallery = np.delete(embeddings, np.s_[::3], axis=0)
    query_labels, gallery_labels = labels[::3], np.delete(labels, np.s_[::3])
    # Only R = max class size columns are needed for MAP@R.
    n_relevant = metrics.count_relevant(query_labels, gallery_labels)
    _, indices = knn(query, gallery, k=int(n_relevant.max()))
    ours = metrics.per_query_average_precision(
        gallery_labels[indices], query_labels, n_relevant, at_r=True
    )
    theirs = pml_accuracy(query, query_labels, gallery, gallery_labels)
    assert np.nanmean(ours) == pytest.approx(theirs["mean_average_precision_at_r"])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.7, 0.1, 500)
    low, high = metrics.bootstrap_ci(values, n_boot=2000)
    # Standard error 0.1 / sqrt(500) = 0.0045: a 95% interval is about +-0.009 wide.
    assert low < values.mean() < high
    assert 0.012 < high - low < 0.024


def test_bootstrap_ci_is_reproducible_and_blocked():
    values = np.random.default_rng(1).integers(0, 2, 3000).astype(float)
    assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(values, seed=3)
    assert metrics.bootstrap_ci(values, seed=3) != metrics.bootstrap_ci(values, seed=4)
    # More replicates than fit in one block of indices still yield a sensible interval.
    low, high = metrics.bootstrap_ci(values, n_boot=3000)
    assert low < values.mean() < high


def test_bootstrap_ci_of_a_constant():
    assert metrics.bootstrap_ci(np.ones(10)) == (1.0, 1.0)


@pytest.mark.parametrize(
    "values, kwargs, message",
    [
        ([], {}, "non-empty"),
        ([0.5, np.nan], {}, "NaN"),
        ([0.5], {"n_boot": 0}, "n_boot"),
        ([0.5], {"alpha": 1.0}, "alpha"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.bootstrap_ci(np.asarray(values, dtype=float), **kwargs)


def test_bootstrap_f1_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    same, predicted = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    low, high = metrics.bootstrap_f1_ci(same, predicted, n_boot=300, seed=5)
    draws = np.random.default_rng(5).integers(0, 40, size=(300, 40))
    values = [f1_score(same[d], predicted[d], zero_division=0) for d in draws]
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))
    assert metrics.bootstrap_f1_ci(same, predicted, 300, 5) == (low, high)


# --------------------------------------------------------------------------- embeddings


def test_l2_normalize_and_pair_distances():
    # (3, 4) has length 5; the zero row stays zero instead of dividing by 0.
    unit = metrics.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
    # Unit vectors 90 degrees apart are sqrt(2) apart; a vector is 0 from itself.
    a = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    b = np.array([[0.0, 1.0], [0.6, 0.8]], np.float32)
    distances = metrics.pair_distances(a, b)
    assert distances.dtype == np.float64
    np.testing.assert_allclose(distances, [np.sqrt(2), 0.0], atol=1e-7)


def test_bootstrap_auc_ci_brackets_the_auc_and_shrinks_with_more_pairs():
    from sklearn.metrics import roc_auc_score

    from retrieval.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(0)
    for n, width_below in ((200, 0.2), (4000, 0.05)):
        same = rng.integers(0, 2, n)
        distances = rng.normal(1.0 - 0.5 * same, 0.4)  # same-class pairs are closer
        auc = roc_auc_score(same, -distances)
        low, high = bootstrap_auc_ci(distances, same, 300, seed=1)
        assert low < auc < high and high - low < width_below
    assert np.isnan(bootstrap_auc_ci(np.ones(4), np.ones(4), 50)[0])  # one class: no AUC


# --------------------------------------------------------------------------- cosine similarity


# Four pairs by hand: (1,0)·(2,0) -> 1 and (3,4)·(4,3) -> 24/25 = 0.96 (same class);
# (1,0)·(0,5) -> 0 and (1,0)·(-1,0) -> -1 (different classes).
COSINE_A = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0], [1.0, 0.0]])
COSINE_B = np.array([[2.0, 0.0], [4.0, 3.0], [0.0, 5.0], [-1.0, 0.0]])
COSINE_SAME = np.array([1, 1, 0, 0])


def test_cosine_separation_hand_case():
    np.testing.assert_allclose(metrics.pair_cosine_similarities(COSINE_A, COSINE_B),
                               [1.0, 0.96, 0.0, -1.0], atol=1e-6)
    found = metrics.cosine_separation(COSINE_A, COSINE_B, COSINE_SAME)
    assert set(found) == set(metrics.SIMILARITY_KEYS)
    assert found["cosine_same_mean"] == pytest.approx(0.98, abs=1e-6)
    assert found["cosine_same_std"] == pytest.approx(0.02, abs=1e-6)
    assert found["cosine_different_mean"] == pytest.approx(-0.5, abs=1e-6)
    assert found["cosine_different_std"] == pytest.approx(0.5, abs=1e-6)
    assert found["cosine_gap"] == pytest.approx(1.48, abs=1e-6)


def test_cosine_separation_normalises_the_vectors_itself():
    # Scaling any vector by a positive factor changes no cosine: the stored vectors need not be
    # unit length. Unit vectors give the same numbers, and 1 - d^2 / 2 of their distances.
    scale = np.random.default_rng(0).uniform(0.01, 100.0, (4, 1))
    reference = metrics.cosine_separation(COSINE_A, COSINE_B, COSINE_SAME)
    for a, b in ((COSINE_A * scale, COSINE_B), (COSINE_A, COSINE_B * scale[::-1]),
                 (metrics.l2_normalize(COSINE_A), metrics.l2_normalize(COSINE_B))):
        assert metrics.cosine_separation(a, b, COSINE_SAME) == pytest.approx(reference, abs=1e-6)
    unit_a, unit_b = metrics.l2_normalize(COSINE_A), metrics.l2_normalize(COSINE_B)
    np.testing.assert_allclose(metrics.pair_cosine_similarities(COSINE_A * scale, COSINE_B),
                               1 - metrics.pair_distances(unit_a, unit_b) ** 2 / 2, atol=1e-6)


def test_cosine_separation_edge_cases():
    # A zero vector has similarity 0 with anything; a group without pairs gives NaN.
    zero = metrics.pair_cosine_similarities(np.zeros((1, 3)), np.ones((1, 3)))
    np.testing.assert_array_equal(zero, [0.0])
    only_same = metrics.cosine_separation(COSINE_A[:2], COSINE_B[:2], [1, 1])
    assert only_same["cosine_same_mean"] == pytest.approx(0.98, abs=1e-6)
    assert np.isnan(only_same["cosine_different_mean"]) and np.isnan(only_same["cosine_gap"])
    with pytest.raises(ValueError, match="same shape"):
        metrics.pair_cosine_similarities(COSINE_A, COSINE_B[:3])
    with pytest.raises(ValueError, match="one value per pair"):
        metrics.cosine_separation(COSINE_A, COSINE_B, [1, 0])
    with pytest.raises(ValueError, match="only 0/1"):
        metrics.cosine_separation(COSINE_A, COSINE_B, [1, 2, 0, 0])
