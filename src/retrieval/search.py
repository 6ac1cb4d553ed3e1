"""Exact k-nearest-neighbour search with FAISS, in Euclidean distance, at any gallery size.

``knn`` needs no index: it runs faiss's brute-force L2 kernel (the one behind ``IndexFlatL2``)
directly on the gallery array, so the gallery is not copied, and feeds the queries in chunks, so
memory is O(N·D + chunk·k) and an N×N distance matrix is never formed; ``iter_knn`` hands the
chunks over one at a time to a caller that scores them as they come. L2 rather than inner product
keeps it correct for embeddings that are not unit-normalised; on unit vectors the ranking is the
same as cosine similarity because d² = 2 − 2·cos. Distances returned everywhere are true
Euclidean distances (faiss works with squared ones).

``build_index`` returns the same exact search as a FAISS index that ``save_index``/``load_index``
persist and ``search_index`` queries. Exact (``IndexFlatL2``) is the default everywhere, and the
only search the metrics use: an approximate index would change the neighbours, and with them
the scores. For a large gallery that `retrieval index --approximate` builds, ``build_index`` also
takes a ``faiss.index_factory`` string (IVF or HNSW, optionally compressed, e.g. "IVF4096,Flat",
"HNSW32", "OPQ32,IVF16384,PQ32"); ``default_factory`` picks an IVF size for N items,
``tune_search_params`` the smallest nprobe (IVF) or efSearch (HNSW) that reaches a target
recall@k against exact search, and ``search_index(..., params=)`` applies it (the gallery card
stores it, see retrieval.gallery). Measured by hand for exact search (2 shared CPU cores,
faiss-cpu 1.15.1, 10^4 queries, k=10, 128-d unit vectors; peak RSS of the whole process, data
included)::

    gallery  search time  peak RSS
    10^4     0.2 s        0.08 GiB
    10^5     1.9 s        0.15 GiB
    10^6     46 s         1.02 GiB

The 1.02 GiB at 10^6 is the 0.48 GiB gallery plus a temporary of the data generation; the search
itself adds a few MiB. Batched exact search is BLAS matrix products, which is why it beat HNSW at
10^5 for 10^4 queries in the same measurements; an IVF index pays off from about 10^6 items
(benchmark row 16, bench/ann.py, has the approximate figures).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np

from retrieval.outputs import atomic_path

# --------------------------------------------------------------------------- validation


def _as_matrix(name: str, x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, D) array (no copy if it already is one)."""
    array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, D) array, found shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(
            f"{name} has dimension {array.shape[1]} but the gallery has {dim}: embed both "
            "with the same model"
        )
    # A float64 sum checks for NaN/inf without allocating an (n, D) mask.
    if not np.isfinite(array.sum(dtype=np.float64)):
        raise ValueError(f"{name} contains NaN or inf: check the embedding step")
    return array


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, found {value}")


def _euclidean(squared: np.ndarray) -> np.ndarray:
    # faiss computes ||q||² + ||g||² − 2·q·g, which can dip just below 0 for duplicates.
    return np.sqrt(np.maximum(squared, 0.0))


# --------------------------------------------------------------------------- exact search


def _search_chunks(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray, k: int, chunk_size: int,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, Euclidean distances, indices)`` of ``search(chunk, k) -> (squared distances,
    indices)``, one chunk of queries at a time."""
    for start in range(0, len(queries), chunk_size):
        squared, indices = search(queries[start:start + chunk_size], k)
        yield start, _euclidean(squared), indices


def _gather(chunks: Iterator[tuple[int, np.ndarray, np.ndarray]], n_queries: int,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    distances = np.empty((n_queries, k), dtype=np.float32)  # (Q, k)
    indices = np.empty((n_queries, k), dtype=np.int64)  # (Q, k)
    for start, chunk_distances, chunk_indices in chunks:
        stop = start + len(chunk_indices)
        distances[start:stop], indices[start:stop] = chunk_distances, chunk_indices
    return distances, indices


def _drop_self(
    distances: np.ndarray, indices: np.ndarray, own: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own gallery index ``own`` (C,) from its k+1 results, leaving ``width``
    columns.

    Dropping by index rather than "the first column" matters with duplicates: another item at
    distance 0 may rank before the query itself. If the own index is not among the results at all
    (more than k+1 duplicates), the last column goes instead.
    """
    mask = indices == own[:, None]  # (C, k+1)
    mask[~mask.any(axis=1), -1] = True
    keep = ~mask
    return distances[keep].reshape(-1, width), indices[keep].reshape(-1, width)


def _checked(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool,
             chunk_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(queries, gallery) as float32 matrices and the number of neighbours each query gets."""
    _check_positive("k", k)
    _check_positive("chunk_size", chunk_size)
    gallery = _as_matrix("gallery", gallery)
    queries = _as_matrix("queries", queries, dim=gallery.shape[1])
    n = len(gallery)
    if exclude_self and len(queries) != n:
        raise ValueError(
            f"exclude_self=True needs the query set to be the gallery, found {len(queries)} "
            f"queries and {n} gallery items: pass exclude_self=False"
        )
    width = min(k, n - 1 if exclude_self else n)
    if width < 1:
        raise ValueError(
            f"the gallery has {n} items, so there is no neighbour to return"
            + (" other than the query itself" if exclude_self else "")
        )
    return queries, gallery, width


def _knn_chunks(queries: np.ndarray, gallery: np.ndarray, width: int, exclude_self: bool,
                chunk_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    def search(chunk: np.ndarray, n_results: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(chunk, gallery, n_results, metric=faiss.METRIC_L2)

    for start, distances, indices in _search_chunks(search, queries, width + int(exclude_self),
                                                    chunk_size):
        if exclude_self:
            own = np.arange(start, start + len(indices))
            distances, indices = _drop_self(distances, indices, own, width)
        yield start, distances, indices


def knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest gallery items of each query: ``(distances (Q, k'), indices (Q, k'))``.

    Distances are Euclidean and increasing along each row. ``k' = min(k, available)``: a k larger
    than the gallery is clipped rather than padded. ``exclude_self=True`` is for "the query set is
    the gallery" (row i of ``queries`` is gallery item i): each query's own index is removed, so
    k' = min(k, N - 1). ``chunk_size`` queries are searched at a time, which bounds the working
    memory and does not change the result.
    """
    queries, gallery, width = _checked(queries, gallery, k, exclude_self, chunk_size)
    return _gather(_knn_chunks(queries, gallery, width, exclude_self, chunk_size),
                   len(queries), width)


def iter_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 4096,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``knn`` one chunk of queries at a time, for a caller that scores each chunk and keeps
    little of it: yields ``(start, distances (C, k'), indices (C, k'))`` for the queries
    ``start .. start + C``. The arguments are checked here, before anything is searched."""
    queries, gallery, width = _checked(queries, gallery, k, exclude_self, chunk_size)
    return _knn_chunks(queries, gallery, width, exclude_self, chunk_size)


# --------------------------------------------------------------------------- persistent indexes


EXACT = "Flat"  # the factory string of exact search, as the gallery card records it
# IVF k-means wants about this many training points per list (faiss warns below 39).
TRAINING_PER_LIST = 39
MIN_LISTS = 16  # fewer inverted lists than this is no index worth its approximation
# Tuning candidates, cheapest first: each doubles the work of the one before.
TUNED = {"nprobe": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
         "efSearch": [16, 32, 64, 128, 256, 512, 1024, 2048]}
# An HNSW graph is built with this candidate list (efConstruction) instead of faiss's 40, which
# is less than the 2·M links an HNSW-M node keeps on the base layer (64 for HNSW32): the graph
# is then short of good links. At 10^6 clustered 128-d vectors (benchmark row 16) HNSW32 built
# at 40 needed efSearch 256 for recall@10 0.95; built at 128, efSearch 24 reached 0.98, ~14x the
# QPS, for about twice the build time.
HNSW_EF_CONSTRUCTION = 128


def build_index(gallery: np.ndarray, factory: str = EXACT, training_size: int = 262_144,
                seed: int = 0) -> faiss.Index:
    """A FAISS L2 index over ``gallery`` (N, D); row i gets id i.

    ``factory`` "Flat" (default): exact ``IndexFlatL2``. Anything else is a
    ``faiss.index_factory`` string; the index is trained on at most ``training_size`` seeded
    rows of the gallery (k-means and PQ subsample anyway) before all rows are added; an HNSW
    graph is built with efConstruction ``HNSW_EF_CONSTRUCTION``. A string FAISS cannot parse, or
    a gallery too small to train it, is a ValueError.
    """
    gallery = _as_matrix("gallery", gallery)
    if len(gallery) == 0:
        raise ValueError("gallery is empty: need at least one item to index")
    if factory == EXACT:
        index = faiss.IndexFlatL2(gallery.shape[1])
    else:
        index = new_index(factory, gallery.shape[1])
        if search_parameter(index) == "efSearch":
            faiss.ParameterSpace().set_index_parameter(index, "efConstruction",
                                                       HNSW_EF_CONSTRUCTION)
        if not index.is_trained:
            rows = np.random.default_rng(seed).permutation(len(gallery))[:training_size]
            train_index(index, gallery[np.sort(rows)], factory)
    index.add(gallery)
    return index


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty L2 index of ``faiss.index_factory``; a ValueError when FAISS cannot parse it."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as error:
        reason = str(error).split(":")[-1].strip() or "not an index_factory string"
        raise ValueError(f"index factory '{factory}' is not usable for {dim}-d vectors "
                         f"({reason}): see the faiss wiki, 'The index factory'") from None


def train_index(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    """Train ``index`` on ``sample``; too few points for its lists is a ValueError."""
    lists = ivf_lists(index)
    if lists and len(sample) < lists:
        raise ValueError(f"index factory '{factory}' has {lists} inverted lists but only "
                         f"{len(sample)} vectors to train them: use fewer lists or exact search")
    if lists:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            # index_factory turns on polysemous training, a Hamming pre-filter that search
            # never enables here; it made PQ training 15x slower.
            ivf.do_polysemous_training = False
    try:
        index.train(_as_matrix("training sample", sample, dim=index.d))
    except RuntimeError as error:
        raise ValueError(f"index factory '{factory}' cannot be trained on {len(sample)} "
                         f"vectors: {str(error).splitlines()[0][-160:]}") from None


def ivf_lists(index: faiss.Index) -> int:
    """Number of inverted lists of an IVF index (inside any pre-transform), else 0."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 0


def default_factory(items: int) -> str | None:
    """An IVF index for ``items`` vectors: about 4·sqrt(N) lists (the FAISS guideline), at most
    N / 39 so that k-means has enough points; None when that leaves fewer than ``MIN_LISTS``
    lists (exact search is then as fast and has nothing to train)."""
    lists = min(int(4 * np.sqrt(items)), items // TRAINING_PER_LIST)
    return f"IVF{lists},Flat" if lists >= MIN_LISTS else None


def search_parameter(index: faiss.Index) -> str | None:
    """The knob that trades speed for recall: "nprobe" (IVF), "efSearch" (HNSW), else None."""
    if ivf_lists(index):
        return "nprobe"
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform)
                                 else index)
    return "efSearch" if isinstance(inner, faiss.IndexHNSW) else None


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply {"nprobe": 32} or {"efSearch": 64} (as a gallery card stores them) to ``index``."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise ValueError(f"search parameter {name}={value} does not apply to this index "
                             f"({type(index).__name__})") from None


def recall_at_k(found: np.ndarray, truth: np.ndarray, own: np.ndarray | None = None) -> float:
    """Mean share of the exact neighbours ``truth`` (Q, k) that ``found`` (Q, k') also holds.

    ``own`` (Q,): each query's own gallery id when the queries are gallery items; it is dropped
    from both sides (finding itself is no achievement) and truth's first k - 1 others count.
    """
    hits, total = 0, 0
    for row, (f, t) in enumerate(zip(found, truth, strict=True)):
        expected, got = t.tolist(), set(f.tolist())
        if own is not None:
            expected = [i for i in expected if i != own[row]][:truth.shape[1] - 1]
            got.discard(int(own[row]))
        hits += len(got.intersection(expected))
        total += len(expected)
    return hits / max(total, 1)


def tune_search_params(index: faiss.Index, queries: np.ndarray, truth: np.ndarray,
                       target: float, own: np.ndarray | None = None) -> tuple[dict, float]:
    """The cheapest {"nprobe"|"efSearch": value} whose recall of ``queries`` against their exact
    neighbours ``truth`` (Q, k) reaches ``target`` (``recall_at_k``, with ``own`` ids), and
    that recall; the largest value tried when none does ({} and 1.0 for an exact index)."""
    name = search_parameter(index)
    if name is None:
        return {}, 1.0
    candidates = TUNED[name]
    if name == "nprobe":
        candidates = [v for v in candidates if v < ivf_lists(index)] + [ivf_lists(index)]
    for value in candidates:
        set_search_params(index, {name: value})
        _, found = search_index(index, queries, truth.shape[1])
        recall = recall_at_k(found, truth, own)
        if recall >= target:
            break
    return {name: value}, recall


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` atomically: a crash never leaves a half-written file."""
    with atomic_path(path) as temp:
        faiss.write_index(index, str(temp))


def load_index(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by ``save_index``; one-line errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no FAISS index at {path}: build and save one first (build_index, save_index)"
        )
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        # faiss's own message is a multi-line C++ trace; ours says what to do.
        raise ValueError(
            f"{path} is not a readable FAISS index: rebuild it with build_index and save_index"
        ) from None


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, chunk_size: int = 4096,
    params: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest items in ``index``: ``(distances (Q, k'), indices (Q, k'))``, k' = min(k, N).

    Distances are Euclidean and increasing along each row, as in ``knn``. ``params`` (e.g. a
    gallery card's {"nprobe": 32}) are applied first. An approximate index may find fewer than
    k' items for a query: those columns hold index -1.
    """
    _check_positive("k", k)
    _check_positive("chunk_size", chunk_size)
    if index.metric_type != faiss.METRIC_L2:
        raise ValueError(
            f"expected an L2 index, found metric_type {index.metric_type}: build it with "
            "build_index"
        )
    if index.ntotal == 0:
        raise ValueError("the index is empty: build it from a non-empty gallery")
    queries = _as_matrix("queries", queries, dim=index.d)
    if params:
        set_search_params(index, params)
    width = min(k, index.ntotal)
    return _gather(_search_chunks(index.search, queries, width, chunk_size), len(queries), width)
