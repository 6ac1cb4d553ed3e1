"""FAISS search against brute-force numpy distances."""

import numpy as np
import pytest

from retrieval import search


def unit_vectors(n, dim=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries, gallery):
    """All Euclidean distances (Q, N) in float64 and the full argsort."""
    d = np.linalg.norm(queries[:, None, :].astype(np.float64) - gallery[None], axis=2)
    return d, np.argsort(d, axis=1, kind="stable")


def test_knn_matches_brute_force():
    queries, gallery = unit_vectors(50, seed=1), unit_vectors(300, seed=2)
    distances, indices = search.knn(queries, gallery, k=7)
    all_distances, order = brute_force(queries, gallery)
    assert distances.shape == indices.shape == (50, 7)
    np.testing.assert_array_equal(indices, order[:, :7])  # random data: no ties
    np.testing.assert_allclose(distances, np.take_along_axis(all_distances, indices, 1), atol=1e-5)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_knn_returns_euclidean_not_squared_distances():
    gallery = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    distances, indices = search.knn(np.zeros((1, 2), np.float32), gallery, k=2)
    np.testing.assert_allclose(distances, [[0.0, 5.0]], atol=1e-6)
    np.testing.assert_array_equal(indices, [[0, 1]])


def test_knn_chunking_does_not_change_the_result():
    queries, gallery = unit_vectors(103, seed=3), unit_vectors(200, seed=4)
    whole = search.knn(queries, gallery, k=5, chunk_size=10_000)
    for chunk_size in (1, 7, 50):
        chunked = search.knn(queries, gallery, k=5, chunk_size=chunk_size)
        np.testing.assert_array_equal(chunked[1], whole[1])
        np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)


def test_knn_clips_k_to_the_gallery():
    distances, indices = search.knn(unit_vectors(4), unit_vectors(3, seed=1), k=10)
    assert distances.shape == indices.shape == (4, 3)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile([0, 1, 2], (4, 1)))


def test_knn_exclude_self_matches_brute_force():
    x = unit_vectors(120, seed=5)
    distances, indices = search.knn(x, x, k=4, exclude_self=True, chunk_size=32)
    all_distances, order = brute_force(x, x)
    np.testing.assert_array_equal(indices, order[:, 1:5])  # column 0 is the query itself
    np.testing.assert_allclose(distances, np.take_along_axis(all_distances, indices, 1), atol=1e-5)


def test_knn_exclude_self_with_duplicates():
    # Items 0, 1, 2 are the same vector, so each has two neighbours at distance 0 and may come
    # after one of them in faiss's order; it must still never be its own neighbour.
    base = unit_vectors(6, seed=6)
    x = np.concatenate([np.repeat(base[:1], 3, axis=0), base[1:]])  # (8, D)
    distances, indices = search.knn(x, x, k=3, exclude_self=True)
    assert indices.shape == (8, 3)
    assert not (indices == np.arange(8)[:, None]).any()
    for i in range(3):
        assert set(indices[i, :2]) == {0, 1, 2} - {i}
        np.testing.assert_allclose(distances[i, :2], 0.0, atol=1e-3)
    # k clipped to N - 1 when excluding self
    assert search.knn(x, x, k=50, exclude_self=True)[1].shape == (8, 7)


def test_knn_exclude_self_when_duplicates_outnumber_k():
    # Five copies, k=1: the search returns 2 of the copies, possibly not the query itself.
    x = np.concatenate([np.ones((5, 4), np.float32), np.zeros((1, 4), np.float32)])
    distances, indices = search.knn(x, x, k=1, exclude_self=True)
    assert indices.shape == (6, 1)
    assert not (indices[:, 0] == np.arange(6)).any()
    np.testing.assert_allclose(distances[:5], 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "queries, gallery, kwargs, message",
    [
        (np.zeros((2, 3)), np.zeros((5, 4)), {"k": 1}, "dimension 3 but the gallery has 4"),
        (np.zeros(3), np.zeros((5, 3)), {"k": 1}, "2-D"),
        (np.zeros((2, 3)), np.zeros((5, 3)), {"k": 0}, "k must be >= 1"),
        (np.zeros((2, 3)), np.zeros((5, 3)), {"k": 1, "exclude_self": True}, "query set"),
        (np.zeros((1, 3)), np.zeros((1, 3)), {"k": 1, "exclude_self": True}, "other than"),
        (np.full((1, 3), np.nan), np.zeros((5, 3)), {"k": 1}, "NaN"),
    ],
)
def test_knn_rejects_bad_input(queries, gallery, kwargs, message):
    with pytest.raises(ValueError, match=message):
        search.knn(queries, gallery, **kwargs)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_kinds_find_the_exact_neighbours_on_easy_data(kind):
    gallery, queries = unit_vectors(2000, seed=7), unit_vectors(40, seed=8)
    exact_distances, exact = search.knn(queries, gallery, k=10)
    index = search.build_index(gallery, kind, nlist=16, nprobe=16)  # ivf: probe every cell
    distances, indices = search.search_index(index, queries, k=10)
    assert search.recall_against_exact(indices, exact, k=10) >= (1.0 if kind != "hnsw" else 0.95)
    if kind != "hnsw":
        np.testing.assert_allclose(distances, exact_distances, atol=1e-5)


def test_auto_kind_switches_on_size():
    gallery = unit_vectors(500, seed=9)
    assert isinstance(search.build_index(gallery), search.faiss.IndexFlatL2)
    index = search.build_index(gallery, flat_max_items=100)
    assert isinstance(index, search.faiss.IndexIVFFlat)
    assert index.ntotal == 500


def test_search_index_clips_k():
    index = search.build_index(unit_vectors(3), "flat")
    assert search.search_index(index, unit_vectors(2, seed=1), k=10)[1].shape == (2, 3)


def test_save_load_round_trip(tmp_path):
    gallery, queries = unit_vectors(500, seed=10), unit_vectors(20, seed=11)
    index = search.build_index(gallery, "ivf", nlist=8, nprobe=3)
    path = tmp_path / "nested" / "gallery.faiss"
    search.save_index(index, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["gallery.faiss"]  # no temp left
    loaded = search.load_index(path)
    assert loaded.ntotal == 500 and loaded.nprobe == 3
    for before, after in zip(
        search.search_index(index, queries, 5), search.search_index(loaded, queries, 5), strict=True
    ):
        np.testing.assert_array_equal(before, after)


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "gallery.faiss"
    search.save_index(search.build_index(unit_vectors(5), "flat"), path)
    search.save_index(search.build_index(unit_vectors(9), "flat"), path)
    assert search.load_index(path).ntotal == 9


def test_load_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FAISS index at"):
        search.load_index(tmp_path / "missing.faiss")


def test_load_bad_file(tmp_path):
    path = tmp_path / "not_an_index.faiss"
    path.write_bytes(b"this is not a faiss index")
    with pytest.raises(ValueError, match="is not a readable FAISS index") as error:
        search.load_index(path)
    assert "\n" not in str(error.value)


def test_build_index_rejects_bad_options():
    with pytest.raises(ValueError, match="kind must be one of"):
        search.build_index(unit_vectors(5), "lsh")
    with pytest.raises(ValueError, match="nlist"):
        search.build_index(unit_vectors(5), "ivf", nlist=10)


def test_recall_against_exact():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    approx = np.array([[2, 0, 9], [-1, 4, 3]])  # 2 of 3 found in each row
    assert search.recall_against_exact(approx, exact, k=3) == pytest.approx(2 / 3)
    assert search.recall_against_exact(approx, exact, k=1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least k=4 columns"):
        search.recall_against_exact(approx, exact, k=4)
