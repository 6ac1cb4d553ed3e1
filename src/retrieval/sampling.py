"""Pairs, triplets, class-balanced batches, unlabelled view batches and hard-negative mining
for metric learning.

Everything here is a pure function of its arguments: randomness comes from
``rng.sampler(seed, epoch, stream)`` (one named stream per function, see ``retrieval.rng``), so
a run is reproducible and each epoch draws a new sample; no global random state is touched.
Indices always point into the ``labels`` array the caller passes (the train split), so nothing
outside it can leak in. Every sampler returns its rows in random order, ready to be cut into
minibatches.

Mining uses FAISS exact search on squared Euclidean distances and never builds an N x N matrix.
"""

import faiss
import numpy as np

from retrieval.outputs import UserError
from retrieval.rng import Stream, sampler


class InfeasibleSampleError(UserError):
    """The data cannot supply what the params ask for (e.g. more classes per batch than exist).

    A ValueError, like every argument error here; as a UserError a stage reports it in one line
    with exit code 2 instead of a traceback."""

# Rows of sample_pairs / sample_hard_pairs: [i, j, same] with same = 1 for a same-class pair
# (the convention of losses.ContrastiveLoss).
PAIR_COLUMNS = ("i", "j", "same")
TRIPLET_COLUMNS = ("anchor", "positive", "negative")

# Queries per FAISS call: bounds the (chunk, k) result buffers; FAISS tiles the distance
# computation itself.
_QUERY_CHUNK = 16384
# Small classes are searched together in groups of at least this many rows: FAISS's BLAS
# path is ~2x slower per query with 100 queries a call than with 1000, and with fewer than
# 20 it falls back to a loop without BLAS.
_GROUP_ROWS = 1024


class _Classes:
    """Labels regrouped by class: ``order`` lists indices class by class, class ``c`` occupying
    ``order[start[c]:start[c] + size[c]]``; ``of[i]`` is the class number of index ``i``."""

    def __init__(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(
                f"expected labels of shape (N,), found {labels.shape}: pass one label per image"
            )
        _, self.of, self.size = np.unique(labels, return_inverse=True, return_counts=True)
        self.order = np.argsort(self.of, kind="stable")
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        self.n = len(labels)

    def members(self, c: int) -> np.ndarray:
        return self.order[self.start[c] : self.start[c] + self.size[c]]

    def other_class(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniform random index of another class for each anchor index."""
        c = self.of[anchors]
        # Positions outside the anchor's block [start, start + size) of ``order``: draw among
        # n - size of them and skip over the block.
        r = rng.integers(0, self.n - self.size[c])
        r = np.where(r >= self.start[c], r + self.size[c], r)
        return self.order[r]

    def same_class(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniform random index of the same class, other than the anchor (size >= 2)."""
        c = self.of[anchors]
        # Position of each anchor inside its block, then draw among the size - 1 others.
        rank = np.empty(self.n, dtype=np.int64)
        rank[self.order] = np.arange(self.n) - np.repeat(self.start, self.size)
        r = rng.integers(0, self.size[c] - 1)
        r = np.where(r >= rank[anchors], r + 1, r)
        return self.order[self.start[c] + r]


def _check_sampleable(classes: _Classes) -> None:
    if len(classes.size) < 2:
        raise InfeasibleSampleError(
            f"expected labels with at least 2 classes, found {len(classes.size)}: "
            "check the train split"
        )
    if classes.size.max() < 2:
        raise InfeasibleSampleError(
            "expected at least one class with 2 or more images, found only singletons: "
            "check the train split"
        )


def sample_pairs(labels: np.ndarray, n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """``n_pairs`` random pairs, half same-class, as an (n_pairs, 3) int64 array ``[i, j, same]``.

    ``n_pairs // 2`` rows are same-class (``same = 1``) and the rest different-class
    (``same = 0``), so for odd ``n_pairs`` the negatives get the extra row. Always ``i != j``.

    Same-class pairs are uniform over all unordered same-class pairs: a class is chosen with
    probability proportional to its number of pairs ``n_c (n_c - 1) / 2``, then two distinct
    members. Different-class pairs are uniform over ordered different-class pairs. Pairs are
    drawn with replacement, so a pair can repeat.
    """
    classes = _Classes(labels)
    _check_sampleable(classes)
    if n_pairs < 2:
        raise ValueError(f"n_pairs must be >= 2, found {n_pairs}: increase the number of pairs")
    rng = sampler(seed, epoch, Stream.PAIRS)
    n_pos = n_pairs // 2
    n_neg = n_pairs - n_pos
    size = classes.size

    n_class_pairs = size * (size - 1)  # proportional to unordered pairs per class
    c = rng.choice(len(size), size=n_pos, p=n_class_pairs / n_class_pairs.sum())
    a = rng.integers(0, size[c])
    b = rng.integers(0, size[c] - 1)
    b = np.where(b >= a, b + 1, b)  # distinct from a
    pos_i = classes.order[classes.start[c] + a]
    pos_j = classes.order[classes.start[c] + b]

    # Anchor weighted by its number of other-class partners, then a uniform partner: every
    # ordered different-class pair gets the same probability.
    partners = classes.n - size[classes.of]  # (N,)
    neg_i = rng.choice(classes.n, size=n_neg, p=partners / partners.sum())
    neg_j = classes.other_class(neg_i, rng)

    pairs = np.empty((n_pairs, 3), dtype=np.int64)
    pairs[:n_pos] = np.stack([pos_i, pos_j, np.ones(n_pos, dtype=np.int64)], axis=1)
    pairs[n_pos:] = np.stack([neg_i, neg_j, np.zeros(n_neg, dtype=np.int64)], axis=1)
    return pairs[rng.permutation(n_pairs)]


def _check_embeddings(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise ValueError(
            f"expected embeddings of shape (N, D) with N = len(labels) = {len(labels)}, "
            f"found {embeddings.shape}: embed exactly the images the labels describe"
        )
    return embeddings


def sample_hard_pairs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_pairs: int,
    seed: int,
    epoch: int,
    pool: int = 4,
) -> np.ndarray:
    """Like ``sample_pairs`` but keeps the hardest pairs under the current ``embeddings`` (N, D).

    Draws ``pool * n_pairs`` candidates with ``sample_pairs``, then keeps the ``n_pairs // 2``
    same-class pairs that are farthest apart and the ``n_pairs - n_pairs // 2`` different-class
    pairs that are closest. ``pool = 1`` is plain random sampling; larger pools are harder
    (and noisier: mislabelled images end up in the hard set first).
    """
    embeddings = _check_embeddings(embeddings, np.asarray(labels))
    if pool < 1:
        raise ValueError(f"pool must be >= 1, found {pool}: 1 means no mining, 4 is typical")
    candidates = sample_pairs(labels, pool * n_pairs, seed, epoch)
    diff = embeddings[candidates[:, 0]] - embeddings[candidates[:, 1]]  # (pool * n_pairs, D)
    d2 = np.einsum("ij,ij->i", diff, diff)  # (pool * n_pairs,)
    pos = np.flatnonzero(candidates[:, 2] == 1)
    neg = np.flatnonzero(candidates[:, 2] == 0)
    n_pos = n_pairs // 2
    hard_pos = pos[np.argsort(-d2[pos], kind="stable")[:n_pos]]
    hard_neg = neg[np.argsort(d2[neg], kind="stable")[: n_pairs - n_pos]]
    keep = np.concatenate([hard_pos, hard_neg])
    order = sampler(seed, epoch, Stream.HARD_PAIRS_SHUFFLE).permutation(n_pairs)
    return candidates[keep[order]]


def _class_groups(size: np.ndarray, min_rows: int) -> list[tuple[int, int]]:
    """Consecutive classes merged into ``[lo, hi)`` row ranges of at least ``min_rows`` rows
    (except the last); a class that big on its own is a group by itself."""
    groups, lo, hi = [], 0, 0
    for n in size:
        hi += n
        if hi - lo >= min_rows:
            groups.append((lo, hi))
            lo = hi
    if hi > lo:
        groups.append((lo, hi))
    return groups


# Elements of one in-group distance block (queries x group rows): 64 MiB of float32.
_BLOCK_ELEMENTS = 1 << 24


def _other_class_block_knn(
    queries: np.ndarray, query_class: np.ndarray, base: np.ndarray, base_class: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``base`` of another class than each query, by squared distance:
    ``(distances, indices)``, (n, min(k, len(base))), padded with (inf, -1) where too few."""
    k = min(k, len(base))
    distances = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    base_norms = np.einsum("ij,ij->i", base, base)
    step = max(1, _BLOCK_ELEMENTS // len(base))
    for q0 in range(0, len(queries), step):
        q = queries[q0:q0 + step]
        d = np.einsum("ij,ij->i", q, q)[:, None] + base_norms[None, :] - 2 * (q @ base.T)
        np.maximum(d, 0, out=d)  # rounding can make an exact duplicate's distance negative
        d[query_class[q0:q0 + step, None] == base_class[None, :]] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < len(base) else \
            np.broadcast_to(np.arange(len(base)), d.shape)
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.argsort(part_d, axis=1, kind="stable")
        distances[q0:q0 + step] = np.take_along_axis(part_d, order, axis=1)
        found = np.take_along_axis(part, order, axis=1)
        indices[q0:q0 + step] = np.where(np.isfinite(distances[q0:q0 + step]), found, -1)
    return distances, indices


def _knn_merge(
    dist: list[np.ndarray], idx: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidate lists (n, k_part) into the k best per row, padded with (inf, -1)."""
    d = np.concatenate(dist, axis=1)
    i = np.concatenate(idx, axis=1)
    if d.shape[1] < k:  # fewer than k candidates in total
        pad = k - d.shape[1]
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    best = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, best, axis=1), np.take_along_axis(i, best, axis=1)


def nearest_other_class(
    embeddings: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row that belong to another class.

    Returns ``(distances, indices)``, both (N, k), sorted by increasing *squared* Euclidean
    distance (FAISS ``IndexFlatL2`` convention); where fewer than ``k`` other-class images
    exist, the row is padded with ``inf`` and ``-1``.

    Exact search, never an N x N matrix. The rows are regrouped class by class and consecutive
    classes merged into groups of at least ``_GROUP_ROWS`` rows (so that each FAISS call has
    enough queries for its BLAS path, even with thousands of tiny classes). Everything outside a
    group is two contiguous slices, searched with ``faiss.knn`` for ``k`` neighbours each; inside
    the group, distances are computed block by block, same-class entries masked, and the k
    smallest kept (a FAISS search there would need ``k + largest class`` neighbours, whose deep
    heaps cost 8x a top-30 search); the candidate lists are merged. Cost: one N x N x D
    distance computation; memory O(N k) plus one bounded block.

    Timings: see ``mine_hard_negatives``.
    """
    classes = _Classes(labels)
    embeddings = _check_embeddings(embeddings, classes.of)
    if k < 1:
        raise ValueError(f"k must be >= 1, found {k}: 30 is typical")
    if len(classes.size) < 2:
        raise ValueError(
            f"expected labels with at least 2 classes, found {len(classes.size)}: "
            "check the train split"
        )
    grouped = embeddings[classes.order]  # (N, D), class blocks contiguous
    grouped_class = classes.of[classes.order]  # (N,)
    distances = np.empty((classes.n, k), dtype=np.float32)
    indices = np.empty((classes.n, k), dtype=np.int64)
    for lo, hi in _class_groups(classes.size, _GROUP_ROWS):
        # (row offset, base) pairs; slices are views, not copies
        outside = [
            (off, base) for off, base in ((0, grouped[:lo]), (hi, grouped[hi:])) if len(base)
        ]
        group_classes = np.unique(grouped_class[lo:hi])
        for q0 in range(lo, hi, _QUERY_CHUNK):
            q1 = min(q0 + _QUERY_CHUNK, hi)
            queries = grouped[q0:q1]  # (n, D)
            dist, idx = [], []
            for offset, base in outside:
                d, i = faiss.knn(queries, base, min(k, len(base)))  # (n, <=k)
                dist.append(d)
                idx.append(i + offset)
            if len(group_classes) > 1:
                d, i = _other_class_block_knn(queries, grouped_class[q0:q1], grouped[lo:hi],
                                              grouped_class[lo:hi], k)
                dist.append(d)
                idx.append(np.where(i >= 0, i + lo, -1))
            d, i = _knn_merge(dist, idx, k)
            rows = classes.order[q0:q1]
            distances[rows] = d
            indices[rows] = np.where(i >= 0, classes.order[np.maximum(i, 0)], -1)
    return distances, indices


def mine_hard_negatives(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int = 30,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """For each anchor, a negative drawn uniformly from its ``k`` nearest other-class images.

    Returns (N,) int64 indices into ``labels``. Drawing among the top k rather than taking the
    nearest keeps a mislabelled or duplicate image from being every anchor's negative. The
    search is ``nearest_other_class``.

    Timings (2-core AMD EPYC dev VM, D = 128, 100 classes, k = 30, Gaussian data), measured
    while another process kept 1.2-1.6 cores busy, so they are upper bounds:

    - N = 10^4: 0.63-0.66 s with 1 FAISS thread; 0.65 s (load ~1) to 2.2 s with 2 (default)
    - N = 10^5: 47 s with 1 FAISS thread; 117-120 s with 2

    A plain FAISS self-search of the same 10^5 x 10^5 took ~20 s with 2 threads (extrapolated
    from 1000 queries at low load) and 32 s with 1 thread under load; this function adds
    15-30 % to that (split bases, the in-group search). On a busy CPU OpenMP threads wait on
    each other: there ``faiss.omp_set_num_threads(1)`` is 2-3x faster.
    """
    _, indices = nearest_other_class(embeddings, labels, k)  # (N, k)
    n_valid = (indices >= 0).sum(axis=1)  # (N,) >= 1; padding (-1) sits at the end of a row
    pick = sampler(seed, epoch, Stream.HARD_NEGATIVE_PICK).integers(0, n_valid)
    return indices[np.arange(len(indices)), pick]


def random_negatives(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """For each anchor, a uniformly random index of another class, shape (N,)."""
    classes = _Classes(labels)
    if len(classes.size) < 2:
        raise InfeasibleSampleError(
            f"expected labels with at least 2 classes, found {len(classes.size)}: "
            "check the train split"
        )
    return classes.other_class(np.arange(classes.n),
                               sampler(seed, epoch, Stream.RANDOM_NEGATIVES))


def sample_triplets(labels: np.ndarray, negatives: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Triplets ``[anchor, positive, negative]`` as an (M, 3) int64 array in random order.

    Every anchor whose class has at least 2 images appears once, with a uniformly random
    positive of its class (never itself) and its negative ``negatives[anchor]`` (from
    ``random_negatives`` or ``mine_hard_negatives``). Anchors of singleton classes are skipped.
    """
    classes = _Classes(labels)
    _check_sampleable(classes)
    negatives = np.asarray(negatives)
    if negatives.shape != (classes.n,):
        raise ValueError(
            f"expected negatives of shape ({classes.n},), one per label, found "
            f"{negatives.shape}: use random_negatives or mine_hard_negatives on the same labels"
        )
    if negatives.min() < 0 or negatives.max() >= classes.n:
        raise ValueError(
            f"expected negatives in [0, {classes.n}), found values in "
            f"[{negatives.min()}, {negatives.max()}]: mine on the same labels"
        )
    if np.any(classes.of[negatives] == classes.of):
        raise ValueError(
            "expected every negative to be of another class than its anchor, found same-class "
            "negatives: mine on the same labels"
        )
    rng = sampler(seed, epoch, Stream.TRIPLETS)
    anchors = np.flatnonzero(classes.size[classes.of] >= 2)
    positives = classes.same_class(anchors, rng)
    triplets = np.stack([anchors, positives, negatives[anchors]], axis=1).astype(np.int64)
    return triplets[rng.permutation(len(triplets))]


def class_balanced_batches(
    labels: np.ndarray,
    batch_size: int,
    images_per_class: int,
    seed: int,
    epoch: int,
) -> list[np.ndarray]:
    """One epoch of batches of P = batch_size / images_per_class classes x K = images_per_class.

    For in-batch losses (supcon, inbatch_contrastive), which need positives inside each batch.
    Each class's images are shuffled and cut into groups of K; the n_c mod K left over sit
    out this epoch (different ones each epoch). A class with 2 <= n_c < K gives one group
    filled up by drawing its images with replacement; singleton classes are left out (no
    positive). Each batch takes P groups of P distinct classes, chosen with probability
    proportional to the groups each class has left, until fewer than P classes have groups
    left. Every batch has exactly ``batch_size`` indices into ``labels``.
    """
    if images_per_class < 2:
        raise ValueError(
            f"images_per_class must be >= 2 (in-batch losses need positives), found "
            f"{images_per_class}: change images_per_class in params.yaml"
        )
    if batch_size % images_per_class != 0:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of images_per_class "
            f"({images_per_class}): change batch_size or images_per_class in params.yaml"
        )
    per_batch = batch_size // images_per_class
    if per_batch < 2:
        raise ValueError(
            f"batch_size ({batch_size}) must hold at least 2 classes of images_per_class "
            f"({images_per_class}) images, or no batch has a negative: increase batch_size"
        )
    classes = _Classes(labels)
    usable = np.flatnonzero(classes.size >= 2)
    if len(usable) < per_batch:
        raise InfeasibleSampleError(
            f"batch_size / images_per_class = {per_batch} classes per batch, but only "
            f"{len(usable)} classes have 2 or more images: lower train.batch_size (or raise "
            "train.images_per_class) in params.yaml"
        )
    rng = sampler(seed, epoch, Stream.CLASS_BALANCED_BATCHES)
    k = images_per_class
    groups: list[list[np.ndarray]] = []  # groups[u] = the K-image groups of class usable[u]
    for c in usable:
        members = rng.permutation(classes.members(c))
        if len(members) < k:
            groups.append([rng.choice(members, size=k, replace=True)])
        else:
            groups.append(list(members[: len(members) // k * k].reshape(-1, k)))
    left = np.array([len(g) for g in groups])
    batches = []
    while np.count_nonzero(left) >= per_batch:
        chosen = rng.choice(len(groups), size=per_batch, replace=False, p=left / left.sum())
        left[chosen] -= 1
        batches.append(np.concatenate([groups[u][left[u]] for u in chosen]))
    return batches


def view_batches(n_images: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch of NT-Xent steps: a seeded shuffle of ``range(n_images)`` cut into steps of
    ``batch_size // 2`` images, each of which training embeds twice (two augmentations), so a
    step is ``batch_size`` rows.

    No labels are taken: two images of one class in a step are negatives of each other, as in
    SimCLR. Every image is in exactly one step, except that a last step of a single image (it
    would have no negative) is dropped. Deterministic per (seed, epoch), a new order each epoch.
    """
    if batch_size < 4:
        raise ValueError(f"batch_size must be >= 4 (two views of at least 2 images), found "
                         f"{batch_size}: increase batch_size")
    per_step = batch_size // 2
    order = sampler(seed, epoch, Stream.VIEW_BATCHES).permutation(n_images)
    steps = [order[i:i + per_step] for i in range(0, n_images, per_step)]
    return [s for s in steps if len(s) >= 2]
