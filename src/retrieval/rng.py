"""Every named random stream in one place, so no two draws share a stream by accident.

Sampling draws from ``np.random.default_rng([seed, epoch, stream])``: the seed from params.yaml,
the epoch (a new sample each epoch) and one fixed stream number per kind of draw, so, e.g., the
shuffle of ``sampling.sample_hard_pairs`` does not replay the draws of the ``sample_pairs`` call
it wraps. Samples that must be the same in every epoch (validation pairs) use a fixed "epoch"
far above any real epoch count.

The numbers are part of every result: changing one changes which pairs, triplets and batches a
run sees. Add new streams; never renumber old ones.

Torch draws have two streams (``TorchStream``), both reseeded at the start of every epoch with
``torch_epoch_seed``: augmentation (``transforms.BatchAugment``'s own ``torch.Generator``) and
dropout (torch's global RNG, which nothing else draws from while a stage trains).
"""

from __future__ import annotations

import enum

import numpy as np


@enum.unique
class Stream(enum.IntEnum):
    """The third word of a sampler's seed: one per kind of draw in ``sampling``."""

    PAIRS = 0  # sample_pairs: classes, members, negative partners, the shuffle
    HARD_PAIRS_SHUFFLE = 1  # sample_hard_pairs: the order of the kept pairs
    HARD_NEGATIVE_PICK = 2  # mine_hard_negatives: which of the k nearest other-class images
    RANDOM_NEGATIVES = 3  # random_negatives
    TRIPLETS = 4  # sample_triplets: positives and the shuffle
    CLASS_BALANCED_BATCHES = 5  # class_balanced_batches
    VIEW_BATCHES = 6  # view_batches: the shuffle of the images


@enum.unique
class Subsample(enum.IntEnum):
    """The second word of a seeded subsample's seed (``subsample``): one per caller."""

    SEGMENT_TRAIN = 0  # gradcam_segment: the images scored, per split
    SEGMENT_VAL = 1
    SEGMENT_TEST = 2
    RETRIEVAL_EXAMPLES = 7  # evaluate: the queries shown in the example figures
    SEGMENT_PRIOR_MASKS = 9  # gradcam_segment: train masks behind the foreground-fraction prior
    EMBED_VIZ_POINTS = 11  # embed_viz: the points t-SNE and PCA draw
    SEGMENT_OVERLAYS = 12  # gradcam_segment: the test images in the overlay figures
    VERIFY_NORMALIZATION = 13  # verify_normalization: the train images measured


# Fixed "epochs" for samples that never change during a run. Real epochs count from 1.
VAL_EPOCH = 1_000_000  # training: validation pairs (and triplets, and NT-Xent's views)
TRAIN_EVAL_EPOCH = 1_000_001  # training: the train-split pairs that train_* metrics use
EVALUATE_VAL_EPOCH = 2_000_000  # evaluation: val pairs the decision threshold is chosen on
EVALUATE_TEST_EPOCH = 2_000_001  # evaluation: test pairs

@enum.unique
class TorchStream(enum.IntEnum):
    """Torch generators that ``training.fit`` reseeds every epoch."""

    AUGMENT = 0  # transforms.BatchAugment: crops, flips, colour jitter
    DROPOUT = 1  # torch's global RNG: dropout in the head


# seed * this + epoch (+ the stream's offset), so a resumed run continues exactly like an
# uninterrupted one. A prime, so that (seed, epoch) pairs do not collide for any realistic number
# of epochs; the offset (2**48) keeps the two streams apart for seeds below ~2.8e9.
_TORCH_EPOCH_MULTIPLIER = 100_003
_TORCH_STREAM_OFFSET = 2**48


def sampler(seed: int, epoch: int, stream: Stream) -> np.random.Generator:
    """The generator of one kind of draw (``stream``) for one epoch of one seeded run."""
    return np.random.default_rng([seed, epoch, int(stream)])


def subsample(count: int, limit: int, seed: int, stream: Subsample) -> np.ndarray:
    """Sorted positions of a seeded uniform choice of ``min(count, limit)`` of ``count`` items
    (all of them, in order, when ``count <= limit``)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, int(stream)]).choice(count, limit, replace=False))


def torch_epoch_seed(seed: int, epoch: int, stream: TorchStream) -> int:
    """The seed ``fit`` gives torch generator ``stream`` at the start of ``epoch``."""
    return seed * _TORCH_EPOCH_MULTIPLIER + epoch + int(stream) * _TORCH_STREAM_OFFSET
