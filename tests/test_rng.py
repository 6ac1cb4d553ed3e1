"""The named random streams: their numbers are part of every result, so they are pinned here."""

import numpy as np

from retrieval import rng, sampling


def test_stream_numbers_and_fixed_epochs_never_change():
    # Renumbering a stream changes which pairs, triplets and batches every run sees.
    assert {s.name: s.value for s in rng.Stream} == {
        "PAIRS": 0, "HARD_PAIRS_SHUFFLE": 1, "HARD_NEGATIVE_PICK": 2, "RANDOM_NEGATIVES": 3,
        "TRIPLETS": 4, "CLASS_BALANCED_BATCHES": 5, "VIEW_BATCHES": 6}
    assert (rng.VAL_EPOCH, rng.TRAIN_EVAL_EPOCH) == (1_000_000, 1_000_001)
    assert (rng.EVALUATE_VAL_EPOCH, rng.EVALUATE_TEST_EPOCH) == (2_000_000, 2_000_001)
    assert {s.name: s.value for s in rng.Subsample} == {
        "SEGMENT_TRAIN": 0, "SEGMENT_VAL": 1, "SEGMENT_TEST": 2, "RETRIEVAL_EXAMPLES": 7,
        "SEGMENT_PRIOR_MASKS": 9, "EMBED_VIZ_POINTS": 11, "SEGMENT_OVERLAYS": 12,
        "VERIFY_NORMALIZATION": 13}
    assert rng.torch_epoch_seed(42, 3, rng.TorchStream.AUGMENT) == 42 * 100_003 + 3
    assert rng.torch_epoch_seed(42, 3, rng.TorchStream.DROPOUT) == 42 * 100_003 + 3 + 2**48


def test_subsample_is_seeded_sorted_capped_and_apart_per_caller():
    picks = rng.subsample(100, 10, seed=3, stream=rng.Subsample.SEGMENT_VAL)
    assert len(picks) == 10 and (np.diff(picks) > 0).all()
    np.testing.assert_array_equal(picks, rng.subsample(100, 10, 3, rng.Subsample.SEGMENT_VAL))
    assert not np.array_equal(picks, rng.subsample(100, 10, 3, rng.Subsample.SEGMENT_TEST))
    np.testing.assert_array_equal(rng.subsample(5, 10, 3, rng.Subsample.SEGMENT_VAL),
                                  np.arange(5))


def test_a_sampler_stream_is_numpys_generator_seeded_with_seed_epoch_stream():
    ours = rng.sampler(7, 3, rng.Stream.TRIPLETS).integers(0, 1 << 30, 5)
    assert ours.tolist() == np.random.default_rng([7, 3, 4]).integers(0, 1 << 30, 5).tolist()


def test_fixed_epochs_lie_beyond_any_real_epoch_and_apart():
    fixed = [rng.VAL_EPOCH, rng.TRAIN_EVAL_EPOCH, rng.EVALUATE_VAL_EPOCH, rng.EVALUATE_TEST_EPOCH]
    assert len(set(fixed)) == len(fixed) and min(fixed) > 10_000


def test_samplers_draw_from_their_own_stream():
    # sample_hard_pairs wraps sample_pairs: its shuffle must not replay sample_pairs's draws.
    labels = np.arange(40) % 4
    emb = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    plain = sampling.sample_pairs(labels, 20, seed=1, epoch=2)
    hard_pool_1 = sampling.sample_hard_pairs(emb, labels, 20, seed=1, epoch=2, pool=1)
    # pool = 1 keeps every candidate: the same rows, in an order of their own.
    assert sorted(map(tuple, plain)) == sorted(map(tuple, hard_pool_1))
    assert not np.array_equal(plain, hard_pool_1)
