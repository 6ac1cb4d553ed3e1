"""Samplers and the hard-negative miner: balance, determinism, no leakage, errors."""

import numpy as np
import pytest

from retrieval import sampling
from retrieval.sampling import (
    class_balanced_batches,
    mine_hard_negatives,
    nearest_other_class,
    random_negatives,
    sample_hard_pairs,
    sample_pairs,
    sample_triplets,
)

# 5 classes of unequal size, one singleton (class 4), labels not sorted and not 0..C-1
LABELS = np.array([7, 3, 3, 7, 9, 9, 9, 3, 7, 1, 1, 9, 9, 5])


def same_class(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return labels[rows[:, 0]] == labels[rows[:, 1]]


# --- sample_pairs -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_pairs", [2, 100, 101])
def test_sample_pairs_balance_and_flags(n_pairs):
    pairs = sample_pairs(LABELS, n_pairs, seed=0, epoch=0)
    assert pairs.shape == (n_pairs, 3) and pairs.dtype == np.int64
    assert (pairs[:, 2] == 1).sum() == n_pairs // 2  # odd n: negatives get the extra row
    assert np.array_equal(same_class(LABELS, pairs), pairs[:, 2] == 1)
    assert np.all(pairs[:, 0] != pairs[:, 1])


def test_sample_pairs_indices_stay_inside_labels():
    # the caller passes the train split only: no index may point past it
    pairs = sample_pairs(LABELS, 1000, seed=3, epoch=2)
    assert pairs[:, :2].min() >= 0 and pairs[:, :2].max() < len(LABELS)
    positives = pairs[pairs[:, 2] == 1]
    assert not np.isin(positives[:, :2], [13]).any()  # the singleton has no positive partner


def test_sample_pairs_deterministic_per_seed_and_epoch():
    a = sample_pairs(LABELS, 64, seed=5, epoch=1)
    assert np.array_equal(a, sample_pairs(LABELS, 64, seed=5, epoch=1))
    assert not np.array_equal(a, sample_pairs(LABELS, 64, seed=5, epoch=2))
    assert not np.array_equal(a, sample_pairs(LABELS, 64, seed=6, epoch=1))


def test_sample_pairs_rows_are_shuffled():
    pairs = sample_pairs(LABELS, 200, seed=0, epoch=0)
    assert 0 < pairs[:100, 2].sum() < 100  # positives are not all first


def test_sample_pairs_positive_classes_weighted_by_pair_count():
    # class sizes 2 and 10 -> 1 and 45 unordered pairs: the small class gets ~1/46 of positives
    labels = np.array([0] * 2 + [1] * 10)
    pairs = sample_pairs(labels, 2 * 4600, seed=0, epoch=0)
    pos = pairs[pairs[:, 2] == 1]
    assert abs((labels[pos[:, 0]] == 0).mean() - 1 / 46) < 0.01


@pytest.mark.parametrize(
    ("labels", "n_pairs", "match"),
    [
        (np.array([1, 1, 1]), 10, "at least 2 classes"),
        (np.array([1, 2, 3]), 10, "2 or more images"),
        (LABELS, 1, "n_pairs must be >= 2"),
        (LABELS.reshape(2, 7), 10, r"shape \(N,\)"),
    ],
)
def test_sample_pairs_errors(labels, n_pairs, match):
    with pytest.raises(ValueError, match=match):
        sample_pairs(labels, n_pairs, seed=0, epoch=0)


# --- sample_hard_pairs ------------------------------------------------------------------------


def test_sample_hard_pairs_keeps_the_hardest_of_the_pool():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    emb = rng.standard_normal((200, 8)).astype(np.float32)
    n_pairs, pool = 50, 4
    hard = sample_hard_pairs(emb, labels, n_pairs, seed=1, epoch=2, pool=pool)
    assert hard.shape == (n_pairs, 3) and (hard[:, 2] == 1).sum() == 25
    assert np.array_equal(same_class(labels, hard), hard[:, 2] == 1)
    assert np.array_equal(hard, sample_hard_pairs(emb, labels, n_pairs, 1, 2, pool=pool))

    def d2(rows):
        return ((emb[rows[:, 0]] - emb[rows[:, 1]]) ** 2).sum(1)

    pool_pairs = sample_pairs(labels, pool * n_pairs, seed=1, epoch=2)
    pool_pos, pool_neg = pool_pairs[pool_pairs[:, 2] == 1], pool_pairs[pool_pairs[:, 2] == 0]
    hard_pos, hard_neg = hard[hard[:, 2] == 1], hard[hard[:, 2] == 0]
    # kept positives are the 25 farthest of the pool, kept negatives the 25 closest
    assert np.allclose(np.sort(d2(hard_pos)), np.sort(d2(pool_pos))[-25:])
    assert np.allclose(np.sort(d2(hard_neg)), np.sort(d2(pool_neg))[:25])
    assert d2(hard_pos).mean() > d2(pool_pos).mean()
    assert d2(hard_neg).mean() < d2(pool_neg).mean()


def test_sample_hard_pairs_errors():
    emb = np.zeros((len(LABELS), 4), dtype=np.float32)
    with pytest.raises(ValueError, match="N = len"):
        sample_hard_pairs(emb[:-1], LABELS, 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="pool must be >= 1"):
        sample_hard_pairs(emb, LABELS, 10, seed=0, epoch=0, pool=0)


# --- nearest_other_class / mine_hard_negatives ------------------------------------------------


@pytest.fixture(scope="module")
def random_data():
    rng = np.random.default_rng(42)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 500)
    return emb, labels


def brute_force_other_class(emb, labels, k):
    d2 = ((emb[:, None, :].astype(np.float64) - emb[None, :, :]) ** 2).sum(-1)  # (N, N)
    d2[labels[:, None] == labels[None, :]] = np.inf
    idx = np.argsort(d2, axis=1)[:, :k]
    return np.take_along_axis(d2, idx, axis=1), idx


# (rows per class group, queries per FAISS call, elements per in-group distance block): one
# class per group (outside slices only), mixed groups with chunked queries and blocks, and
# everything in one group (in-group search only), in one block and in single-query blocks
SEARCH_LAYOUTS = [(1, 16384, 1 << 24), (120, 50, 1000), (1024, 16384, 1 << 24), (1024, 64, 1)]


@pytest.mark.parametrize(("group_rows", "query_chunk", "block"), SEARCH_LAYOUTS)
def test_nearest_other_class_equals_brute_force(random_data, monkeypatch, group_rows, query_chunk,
                                                block):
    monkeypatch.setattr(sampling, "_GROUP_ROWS", group_rows)
    monkeypatch.setattr(sampling, "_QUERY_CHUNK", query_chunk)
    monkeypatch.setattr(sampling, "_BLOCK_ELEMENTS", block)
    emb, labels = random_data
    dist, idx = nearest_other_class(emb, labels, k=7)
    ref_dist, ref_idx = brute_force_other_class(emb, labels, k=7)
    assert dist.shape == idx.shape == (500, 7)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("group_rows", "query_chunk", "block"), SEARCH_LAYOUTS)
def test_nearest_other_class_pads_when_too_few_others(monkeypatch, group_rows, query_chunk,
                                                      block):
    monkeypatch.setattr(sampling, "_GROUP_ROWS", group_rows)
    monkeypatch.setattr(sampling, "_QUERY_CHUNK", query_chunk)
    monkeypatch.setattr(sampling, "_BLOCK_ELEMENTS", block)
    # class 0 has 3 others, class 1 has 2: k = 4 leaves padding
    emb = np.array([[0.0], [1.0], [5.0], [6.0], [7.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    dist, idx = nearest_other_class(emb, labels, k=4)
    assert idx[0].tolist() == [2, 3, 4, -1]
    assert dist[0].tolist() == [25.0, 36.0, 49.0, np.inf]
    assert idx[2].tolist() == [1, 0, -1, -1]
    # the miner draws among the valid entries only
    for seed in range(5):
        neg = mine_hard_negatives(emb, labels, k=4, seed=seed)
        assert np.all(neg >= 0) and np.all(labels[neg] != labels)


def test_mined_negative_is_other_class_and_in_top_k(random_data):
    emb, labels = random_data
    k = 5
    neg = mine_hard_negatives(emb, labels, k=k, seed=0, epoch=0)
    _, ref_idx = brute_force_other_class(emb, labels, k=k)
    assert neg.shape == (500,)
    assert np.all(labels[neg] != labels)
    assert all(neg[i] in ref_idx[i] for i in range(500))
    # the draw uses the whole top-k, not just the nearest
    assert len({int(np.flatnonzero(ref_idx[i] == neg[i])[0]) for i in range(500)}) == k


def test_mine_hard_negatives_deterministic(random_data):
    emb, labels = random_data
    a = mine_hard_negatives(emb, labels, k=10, seed=3, epoch=1)
    assert np.array_equal(a, mine_hard_negatives(emb, labels, k=10, seed=3, epoch=1))
    assert not np.array_equal(a, mine_hard_negatives(emb, labels, k=10, seed=3, epoch=2))


def test_miner_errors(random_data):
    emb, labels = random_data
    with pytest.raises(ValueError, match="at least 2 classes"):
        nearest_other_class(emb, np.zeros(500, dtype=int), k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        nearest_other_class(emb, labels, k=0)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        mine_hard_negatives(emb[:10], labels, k=5)


# --- random_negatives / sample_triplets -------------------------------------------------------


def test_random_negatives_other_class_and_deterministic():
    neg = random_negatives(LABELS, seed=0, epoch=0)
    assert neg.shape == LABELS.shape
    assert np.all(LABELS[neg] != LABELS)
    assert np.array_equal(neg, random_negatives(LABELS, seed=0, epoch=0))
    many = np.stack([random_negatives(LABELS, seed=0, epoch=e) for e in range(50)])
    # every other-class image shows up as a negative of anchor 0 (label 7) over 50 epochs
    assert set(many[:, 0]) == set(np.flatnonzero(LABELS != 7))


def test_random_negatives_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        random_negatives(np.array([4, 4, 4]), seed=0, epoch=0)


def test_sample_triplets():
    neg = random_negatives(LABELS, seed=0, epoch=0)
    trip = sample_triplets(LABELS, neg, seed=0, epoch=0)
    # every anchor except the singleton (index 13, label 5), once each
    assert trip.shape == (13, 3) and trip.dtype == np.int64
    assert sorted(trip[:, 0]) == [i for i in range(14) if i != 13]
    assert np.all(trip[:, 0] != trip[:, 1])
    assert np.all(LABELS[trip[:, 0]] == LABELS[trip[:, 1]])
    assert np.array_equal(trip[:, 2], neg[trip[:, 0]])
    assert trip.max() < len(LABELS)
    assert np.array_equal(trip, sample_triplets(LABELS, neg, seed=0, epoch=0))
    assert not np.array_equal(trip, sample_triplets(LABELS, neg, seed=0, epoch=1))


def test_sample_triplets_rejects_bad_negatives():
    neg = random_negatives(LABELS, seed=0, epoch=0)
    with pytest.raises(ValueError, match="one per label"):
        sample_triplets(LABELS, neg[:-1], seed=0, epoch=0)
    with pytest.raises(ValueError, match="expected negatives in"):
        sample_triplets(LABELS, np.full_like(neg, len(LABELS)), seed=0, epoch=0)
    same = neg.copy()
    same[0] = 3  # label 7 like anchor 0
    with pytest.raises(ValueError, match="another class"):
        sample_triplets(LABELS, same, seed=0, epoch=0)


# --- class_balanced_batches -------------------------------------------------------------------


def test_class_balanced_batches_p_by_k():
    labels = np.repeat(np.arange(10), [12, 9, 8, 8, 8, 8, 8, 8, 3, 1])
    batches = class_balanced_batches(labels, batch_size=12, images_per_class=4, seed=0, epoch=0)
    assert len(batches) > 0
    seen = np.concatenate(batches)
    assert seen.max() < len(labels) and 9 not in labels[seen]  # singleton class left out
    for batch in batches:
        assert batch.shape == (12,)
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 3 and np.all(counts == 4)
    # without the small class (which is filled with replacement) no image repeats in an epoch
    full = seen[labels[seen] != 8]
    assert len(np.unique(full)) == len(full)


def test_class_balanced_batches_deterministic():
    labels = np.repeat(np.arange(6), 10)
    a = class_balanced_batches(labels, 8, 4, seed=1, epoch=0)
    b = class_balanced_batches(labels, 8, 4, seed=1, epoch=0)
    c = class_balanced_batches(labels, 8, 4, seed=1, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_class_balanced_batches_errors():
    labels = np.repeat(np.arange(6), 10)
    with pytest.raises(
        ValueError,
        match=r"^batch_size \(30\) must be a multiple of images_per_class \(4\): change ",
    ):
        class_balanced_batches(labels, 30, 4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_balanced_batches(labels, 4, 4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="images_per_class must be >= 2"):
        class_balanced_batches(labels, 4, 1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="only 6 classes"):
        class_balanced_batches(labels, 32, 4, seed=0, epoch=0)


@pytest.mark.parametrize("group_rows", [25, 1024])
def test_nearest_other_class_many_tiny_classes(monkeypatch, group_rows):
    # retrieval datasets often have thousands of classes of 2-5 images (and singletons)
    monkeypatch.setattr(sampling, "_GROUP_ROWS", group_rows)
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((300, 8)).astype(np.float32)
    labels = rng.integers(0, 120, 300)
    dist, idx = nearest_other_class(emb, labels, k=4)
    ref_dist, ref_idx = brute_force_other_class(emb, labels, k=4)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
