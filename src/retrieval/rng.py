"""Every named random stream in one place, so no two draws share a stream by accident.

Sampling draws from ``np.random.default_rng([seed, epoch, stream])``: the seed from params.yaml,
the epoch (a new sample each epoch) and one fixed stream number per kind of draw, so, e.g., the
shuffle of ``sampling.sample_hard_pairs`` does not replay the draws of the ``sample_pairs`` call
it wraps. Samples that must be the same in every epoch (validation pairs) use a fixed "epoch"
far above any real epoch count.

The numbers are part of every result: changing one changes which pairs, triplets and batches a
run sees. Add new streams; never renumber old ones.

Not a stream of its own: augmentation (``BatchAugment``) and dropout draw from torch's global
RNG, which ``training.fit`` reseeds at the start of every epoch with ``torch_epoch_seed``.
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


# Fixed "epochs" for samples that never change during a run. Real epochs count from 1.
VAL_EPOCH = 1_000_000  # training: validation pairs (and validation triplets)
TRAIN_EVAL_EPOCH = 1_000_001  # training: the train-split pairs that train_* metrics use
EVALUATE_VAL_EPOCH = 2_000_000  # evaluation: val pairs the decision threshold is chosen on
EVALUATE_TEST_EPOCH = 2_000_001  # evaluation: test pairs

# Torch's global RNG (dropout, augmentation) is reseeded every epoch with seed * this + epoch,
# so a resumed run continues exactly like an uninterrupted one. A prime, so that (seed, epoch)
# pairs do not collide for any realistic number of epochs.
_TORCH_EPOCH_MULTIPLIER = 100_003


def sampler(seed: int, epoch: int, stream: Stream) -> np.random.Generator:
    """The generator of one kind of draw (``stream``) for one epoch of one seeded run."""
    return np.random.default_rng([seed, epoch, int(stream)])


def torch_epoch_seed(seed: int, epoch: int) -> int:
    """What ``fit`` passes to ``torch.manual_seed`` at the start of ``epoch``."""
    return seed * _TORCH_EPOCH_MULTIPLIER + epoch
