"""embed_viz: seeded subsampling, class highlighting, 2-D projections, silhouette, figures."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from retrieval import compared, embed_viz, evaluation, metrics
from retrieval.outputs import UserError
from retrieval.plots import evaluation as evaluation_plots


def clusters(n_classes=4, per_class=15, spread=0.05, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat([f"c{i:03d}" for i in range(n_classes)], per_class)
    vectors = centres[np.repeat(np.arange(n_classes), per_class)] + rng.normal(
        0, spread, (len(labels), dim))
    return metrics.l2_normalize(vectors), labels


def test_subsample_is_seeded_sorted_and_capped():
    picked = embed_viz.sample(1000, 100, seed=1)
    assert len(picked) == 100 and len(set(picked)) == 100 and (np.diff(picked) > 0).all()
    np.testing.assert_array_equal(picked, embed_viz.sample(1000, 100, seed=1))
    assert not np.array_equal(picked, embed_viz.sample(1000, 100, seed=2))
    np.testing.assert_array_equal(embed_viz.sample(50, 100, seed=1), np.arange(50))


def test_highlighted_classes_are_the_largest_ties_by_name():
    labels = np.array(["b"] * 3 + ["a"] * 3 + ["c"] * 5 + ["d"])
    assert embed_viz.highlighted_classes(labels, 2) == ["c", "a"]
    assert embed_viz.highlighted_classes(labels, 10) == ["c", "a", "b", "d"]


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projections_are_seeded_2d(method):
    vectors, _ = clusters(dim=64)  # > 50 dimensions: t-SNE runs on 50 PCA components
    points = embed_viz.project_2d(vectors, method, seed=0, perplexity=10)
    assert points.shape == (len(vectors), 2) and np.isfinite(points).all()
    np.testing.assert_allclose(points, embed_viz.project_2d(vectors, method, 0, 10))


def test_tsne_works_on_a_handful_of_points():
    vectors, _ = clusters(n_classes=4, per_class=2)  # perplexity 30 is capped to (8 - 1) / 3
    assert embed_viz.project_2d(vectors, "tsne", seed=0, perplexity=30).shape == (8, 2)
    assert embed_viz.perplexity_used(8, 30) == pytest.approx(7 / 3)
    with pytest.raises(UserError, match=">= 3 points"):
        embed_viz.project_2d(vectors[:2], "pca", seed=0)
    with pytest.raises(ValueError, match="method"):
        embed_viz.project_2d(vectors, "umap", seed=0)


def test_silhouette_rises_with_separation():
    tight, labels = clusters(spread=0.05)
    loose, _ = clusters(spread=3.0)
    assert embed_viz.silhouette(tight, labels) > 0.8 > embed_viz.silhouette(loose, labels)
    assert embed_viz.silhouette(tight, np.array(["one"] * len(tight))) is None


def test_split_embeddings_must_cover_the_same_images(tmp_path):
    vectors, labels = clusters(n_classes=2, per_class=3)
    splits = np.array(["test"] * 5 + ["val"])
    paths = {}
    for name, rows in (("a", np.arange(6)), ("b", np.arange(6)), ("c", np.arange(1, 7))):
        evaluation.Embeddings(rows, vectors, labels, splits, labels).save(tmp_path / f"{name}.npz")
        paths[name] = tmp_path / f"{name}.npz"
    same = embed_viz.load_split_embeddings({k: paths[k] for k in "ab"}, "test")
    assert [len(e.rows) for e in same.values()] == [5, 5]
    with pytest.raises(UserError, match="different images"):
        embed_viz.load_split_embeddings(paths, "test")
    with pytest.raises(UserError, match="need >= 3"):
        embed_viz.load_split_embeddings({"a": paths["a"]}, "val")


def test_scatter_with_many_classes_colours_only_the_largest():
    vectors, labels = clusters(n_classes=102, per_class=3, dim=4)
    labels[3:6] = "c000"  # c000 (6 images) is the largest class, 101 classes in all
    highlighted = embed_viz.highlighted_classes(labels, 10)
    points = {name: embed_viz.project_2d(vectors, "pca", 0) for name in compared.MODELS}
    figure = evaluation_plots.embedding_scatter(points, labels, highlighted, "PCA", "PC",
                                                {"baseline": "silhouette 0.1"})
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[0] == "c000" and len(legend) == 11 and legend[-1] == "91 other classes"
    assert [ax.get_title() for ax in figure.axes] == ["baseline\nsilhouette 0.1", "frozen",
                                                      "unfrozen"]
    plt.close(figure)


def test_two_dimensional_embeddings_are_plotted_directly():
    vectors, labels = clusters(n_classes=3, dim=2)
    figure = evaluation_plots.embedding_scatter({"frozen": vectors}, labels, ["c000"], "2-D",
                                                "embedding")
    ax = figure.axes[0]
    assert ax.get_xlabel() == "embedding 1" and ax.get_aspect() == 1.0
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(np.sort(offsets, axis=0), np.sort(vectors, axis=0), atol=1e-6)
    plt.close(figure)


def test_figure_titles_name_the_models_before_and_after_training():
    assert embed_viz.before_and_after() == "before training (baseline) and after (frozen, unfrozen)"


def spokes(n_classes=4, per_class=40, seed=0):
    """Cross entropy's 2-D geometry: each class along a ray from the origin."""
    rng = np.random.default_rng(seed)
    angles = np.repeat(np.arange(n_classes) * 2 * np.pi / n_classes, per_class)
    radius = rng.uniform(1, 10, len(angles))
    angles = angles + rng.normal(0, 0.05, len(angles))
    labels = np.repeat([f"c{i}" for i in range(n_classes)], per_class)
    return np.column_stack([radius * np.cos(angles), radius * np.sin(angles)]), labels


def test_knn_scores_leave_each_point_out_and_match_scikit_learn():
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    vectors, labels = clusters(n_classes=5, per_class=12, spread=0.6, dim=3, seed=4)
    for k in (1, 5):
        found = embed_viz.knn_scores(vectors, labels, k)
        predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=k), vectors, labels,
                                      cv=LeaveOneOut())
        # Ties may break differently; with these well-mixed points a handful differ at most.
        assert abs(found["knn_accuracy"] - np.mean(predicted == labels)) <= 2 / len(labels)
        one = cross_val_predict(KNeighborsClassifier(n_neighbors=1), vectors, labels,
                                cv=LeaveOneOut())
        assert found["p_at_1"] == pytest.approx(np.mean(one == labels))
    # By hand on a line: 0, 1 (a) and 10, 11, 13 (b); 13's nearest other point is 11 (b).
    line = np.array([[0.0], [1.0], [10.0], [11.0], [13.0]])
    assert embed_viz.knn_scores(line, np.array(list("aabbb")), 1) == {"knn_accuracy": 1.0,
                                                                      "p_at_1": 1.0}
    # k = 3: each a's neighbours are the other a and two b's: both a's are outvoted.
    assert embed_viz.knn_scores(line, np.array(list("aabbb")), 3)["knn_accuracy"] == 0.6
    assert embed_viz.knn_scores(line[:2], np.array(list("ab")), 3)["knn_accuracy"] is None


def test_geometry_tells_spokes_from_clusters():
    ray, labels = spokes()
    found = embed_viz.geometry(ray, labels)
    assert found["radial_elongation"] > 5
    assert found["silhouette_cosine"] > embed_viz.silhouette(ray, labels) + 0.2
    assert found["class_shape"] == "radial spokes"
    # Contrastive's geometry: round blobs of radius ~0.3 around centres 3 from the origin.
    rng = np.random.default_rng(1)
    centres = 3 * np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])
    labels = np.repeat([f"c{i}" for i in range(4)], 40)
    blobs = centres[np.repeat(np.arange(4), 40)] + rng.normal(0, 0.3, (160, 2))
    found = embed_viz.geometry(blobs, labels)
    assert 0.5 < found["radial_elongation"] < embed_viz.SPOKE_ELONGATION
    assert found["class_shape"] == "compact clusters"
    # Unit vectors have no radial spread: no shape to name.
    unit, labels = clusters(n_classes=3, dim=2)
    assert embed_viz.geometry(unit, labels)["radial_elongation"] is None
    # Classes that do not separate have no shape, however elongated each one is.
    mixed = ray.copy()
    np.random.default_rng(2).shuffle(mixed)
    found = embed_viz.geometry(mixed, spokes()[1])
    assert found["class_shape"] == "overlapping classes"
    assert embed_viz.shape_of_classes(None) is None


def test_raw_two_dimensional_embeddings_are_plotted_around_the_origin():
    ray, labels = spokes()
    figure = evaluation_plots.embedding_scatter({"frozen": ray}, labels, ["c0"], "2-D",
                                                "embedding")
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    assert low == -high and high > 9 and ax.get_ylim() == (low, high)  # not the unit circle
    assert ax.get_aspect() == 1.0 and len(ax.get_xticks()) > 2
    plt.close(figure)


def test_geometry_of_a_raw_embedding_with_too_few_points_per_class():
    raw = np.array([[3.0, 0.1], [2.0, 0.2], [0.1, 4.0], [0.2, 1.0]])
    found = embed_viz.geometry(raw, np.array(list("aabb")))
    assert found["unit_length"] is False and found["radial_elongation"] is None
    assert found["class_shape"] is None
    assert embed_viz.geometry(metrics.l2_normalize(raw), np.array(list("aabb")))["unit_length"]
