"""FAISS search against brute-force numpy distances."""

import faiss
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


def test_iter_knn_yields_the_chunks_of_knn():
    x = unit_vectors(50, seed=12)
    for exclude_self in (False, True):
        distances, indices = search.knn(x, x, k=4, exclude_self=exclude_self)
        chunks = list(search.iter_knn(x, x, k=4, exclude_self=exclude_self, chunk_size=16))
        assert [start for start, _, _ in chunks] == [0, 16, 32, 48]
        np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), indices)
        np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), distances)
        assert not exclude_self or not (indices == np.arange(50)[:, None]).any()


def test_iter_knn_checks_its_arguments_before_searching():
    with pytest.raises(ValueError, match="query set"):
        search.iter_knn(np.zeros((2, 3)), np.zeros((5, 3)), k=1, exclude_self=True)


def test_index_finds_the_exact_neighbours():
    gallery, queries = unit_vectors(2000, seed=7), unit_vectors(40, seed=8)
    exact_distances, exact = search.knn(queries, gallery, k=10)
    index = search.build_index(gallery)
    assert isinstance(index, search.faiss.IndexFlatL2) and index.ntotal == 2000
    distances, indices = search.search_index(index, queries, k=10, chunk_size=16)
    np.testing.assert_array_equal(indices, exact)
    np.testing.assert_allclose(distances, exact_distances, atol=1e-5)


def test_search_index_clips_k():
    index = search.build_index(unit_vectors(3))
    assert search.search_index(index, unit_vectors(2, seed=1), k=10)[1].shape == (2, 3)


def test_save_load_round_trip(tmp_path):
    gallery, queries = unit_vectors(500, seed=10), unit_vectors(20, seed=11)
    index = search.build_index(gallery)
    path = tmp_path / "nested" / "gallery.faiss"
    search.save_index(index, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["gallery.faiss"]  # no temp left
    loaded = search.load_index(path)
    assert loaded.ntotal == 500
    for before, after in zip(
        search.search_index(index, queries, 5), search.search_index(loaded, queries, 5), strict=True
    ):
        np.testing.assert_array_equal(before, after)


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "gallery.faiss"
    search.save_index(search.build_index(unit_vectors(5)), path)
    search.save_index(search.build_index(unit_vectors(9)), path)
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


def test_build_index_rejects_an_empty_gallery():
    with pytest.raises(ValueError, match="empty"):
        search.build_index(np.zeros((0, 4), np.float32))


# --- approximate indexes --------------------------------------------------------------------


def test_default_factory_sizes_ivf_to_the_gallery():
    assert search.default_factory(10**6) == "IVF4000,Flat"  # 4·sqrt(N)
    assert search.default_factory(10_000) == "IVF256,Flat"  # N / 39: enough to train
    assert search.default_factory(600) is None  # fewer than 16 lists: exact instead


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16"])
def test_tuned_approximate_index_reaches_the_target_recall(factory):
    gallery, queries = unit_vectors(3000, dim=8), unit_vectors(100, seed=1, dim=8)
    index = search.build_index(gallery, factory)
    _, truth = search.knn(queries, gallery, 10)
    params, recall = search.tune_search_params(index, queries, truth, 0.95)
    assert recall >= 0.95 and set(params) == {search.search_parameter(index)}
    _, found = search.search_index(index, queries, 10, params=params)
    assert search.recall_at_k(found, truth) == pytest.approx(recall)


@pytest.mark.parametrize("factory", ["HNSW16", "PCA4,HNSW16"])
def test_hnsw_is_built_with_a_longer_candidate_list(factory):
    index = search.build_index(unit_vectors(300, dim=8), factory)
    graph = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform)
                                 else index)
    assert graph.hnsw.efConstruction == search.HNSW_EF_CONSTRUCTION > 40  # faiss's default


def test_recall_leaves_out_the_query_itself():
    truth = np.array([[7, 1, 2], [3, 8, 4]])
    found = np.array([[7, 1, 9], [8, 9, 9]])
    assert search.recall_at_k(found, truth) == pytest.approx(3 / 6)
    # Own ids 7 and 8: the others of truth are [1, 2] and [3, 4]; found has 1 of them.
    assert search.recall_at_k(found, truth, own=np.array([7, 8])) == pytest.approx(1 / 4)


@pytest.mark.parametrize(("factory", "size", "message"), [
    ("IVFzz", 100, "is not usable"),
    ("IVF64,Flat", 20, "has 64 inverted lists but only 20 vectors"),
])
def test_build_index_refuses_a_bad_factory(factory, size, message):
    with pytest.raises(ValueError, match=message):
        search.build_index(unit_vectors(size, dim=8), factory)
