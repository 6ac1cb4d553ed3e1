"""Evaluation: retrieval on toy galleries with hand-worked answers, thresholds from validation,
pairs and lists that never change, embeddings of a tiny model, tables and figures."""


import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from retrieval import compared, evaluation, metrics, models, search, transforms
from retrieval.cache import ImageCache
from retrieval.config import EvaluateConfig, ModelConfig
from retrieval.outputs import UserError


def at_angles(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


# Six unit vectors on a circle. Ranking by angle (Euclidean distance grows with the angle):
#   A0:   A10 (10°), A80 (80°), B92, B100, C210       relevant at ranks 1, 2  -> AP 1
#   A10:  A0 (10°), A80 (70°), B92, B100, C210        relevant at ranks 1, 2  -> AP 1
#   A80:  B92 (12°), B100 (20°), A10 (70°), A0 (80°)  relevant at ranks 3, 4
#         -> AP = (1/3 + 2/4) / 2 = 5/12, AP@R (R = 2) = 0, P@1 = 0, P@5 = 2/5
#   B92:  B100 (8°) first -> AP 1, P@5 = 1/5;   B100: B92 (8°) first -> AP 1, P@5 = 1/5
#   C210: no other C: unscored (n_relevant = 0)
TOY_ANGLES = [0, 10, 80, 92, 100, 210]
TOY_LABELS = np.array(["A", "A", "A", "B", "B", "C"])
TOY_EXPECTED = {
    "precision_at_1": 4 / 5,
    "precision_at_5": (0.4 + 0.4 + 0.4 + 0.2 + 0.2) / 5,
    "recall_at_1": 4 / 5, "recall_at_5": 1.0, "recall_at_10": 1.0,  # only 5 neighbours exist
    "map": (1 + 1 + 5 / 12 + 1 + 1) / 5,
    "map_at_r": (1 + 1 + 0 + 1 + 1) / 5,
    "n_queries": 5, "n_queries_without_relevant": 1, "map_exact": True,
}


@pytest.mark.parametrize("chunk_size", [1, 2, 2048])
def test_retrieval_on_a_toy_gallery_with_known_answers(chunk_size):
    vectors = at_angles(TOY_ANGLES)
    result = evaluation.retrieve(vectors, TOY_LABELS, vectors, TOY_LABELS, same_set=True,
                                 max_rank=1000, chunk_size=chunk_size)
    summary = metrics.retrieval_metrics(result.per_query)
    assert summary == pytest.approx(TOY_EXPECTED)
    assert result.per_query["ap"].iloc[2] == pytest.approx(5 / 12)
    assert result.ranks == 5
    np.testing.assert_array_equal(result.neighbors[2, :4], [3, 4, 1, 0])  # A80: B92 B100 A10 A0
    assert (np.diff(result.distances, axis=1) >= 0).all()


def test_chunked_retrieval_agrees_with_one_whole_ranking():
    rng = np.random.default_rng(0)
    vectors = metrics.l2_normalize(rng.normal(size=(60, 4)))
    labels = rng.integers(0, 5, 60).astype(str)
    result = evaluation.retrieve(vectors, labels, vectors, labels, same_set=True, max_rank=1000,
                                 chunk_size=7)
    _, indices = search.knn(vectors, vectors, k=59, exclude_self=True)
    expected = metrics.per_query_retrieval(
        labels[indices], labels, metrics.count_relevant(labels, labels, exclude_self=True))
    pd.testing.assert_frame_equal(result.per_query.drop(columns="label"),
                                  pd.DataFrame(expected))


def test_retrieval_against_a_separate_gallery_and_a_capped_rank():
    gallery, gallery_labels = at_angles([0, 5, 90, 95, 180]), np.array(list("AABBC"))
    queries, query_labels = at_angles([2, 93, 270]), np.array(list("ABD"))
    result = evaluation.retrieve(queries, query_labels, gallery, gallery_labels, same_set=False,
                                 max_rank=10)
    summary = metrics.retrieval_metrics(result.per_query)
    # A at 2° finds A0, A5 first; B at 93° finds B95, B90 first; D has no relevant item.
    assert summary["precision_at_1"] == 1.0 and summary["map"] == 1.0
    assert summary["n_queries"] == 2 and summary["n_queries_without_relevant"] == 1
    capped = evaluation.retrieve(queries, query_labels, gallery, gallery_labels, False,
                                 max_rank=1)
    assert capped.ranks == 1 and not metrics.retrieval_metrics(capped.per_query)["map_exact"]


def test_own_index_is_dropped_even_behind_a_duplicate():
    vectors = at_angles([0, 0, 90])  # items 0 and 1 are identical
    result = evaluation.retrieve(vectors, np.array(list("AAB")), vectors, np.array(list("AAB")),
                                 same_set=True, max_rank=10)
    assert result.neighbors[0, 0] == 1 and result.neighbors[1, 0] == 0
    assert result.per_query["precision_at_1"].tolist() == [1.0, 1.0, 0.0]


# --------------------------------------------------------------------------- verification


def test_threshold_is_chosen_on_validation_and_applied_to_test():
    # Validation: same pairs at 0.2, different at 0.6 -> a threshold in between (0.4).
    # Test: everything is farther (same 0.9, different 1.3); a threshold chosen on test would
    # sit near 1.1 and score 100%; the validation threshold calls every test pair "different".
    val_d = np.array([0.2] * 10 + [0.6] * 10)
    test_d = np.array([0.9] * 10 + [1.3] * 10)
    same = np.array([1] * 10 + [0] * 10)
    result = evaluation.verify(val_d, same, test_d, same, "f1", n_boot=0, seed=0)
    assert 0.2 < result.metrics["threshold"] < 0.6
    assert result.metrics["accuracy"] == 0.5 and result.metrics["tp"] == 0
    assert result.metrics["roc_auc"] == 1.0  # ranking on test is still perfect


def test_evaluate_model_takes_the_threshold_from_the_val_pairs():
    # Rows 0-3 are val, 4-7 test. Val same-class pairs are close, test ones far apart.
    vectors = at_angles([0, 10, 90, 100, 0, 60, 90, 150])
    labels = np.array(list("AABBAABB"))
    splits = np.array(["val"] * 4 + ["test"] * 4)
    emb = evaluation.Embeddings(np.arange(8), vectors, labels, splits, np.array(list("abcdefgh")))
    pairs = pd.DataFrame({"split": ["val"] * 4 + ["test"] * 4,
                          "i": [0, 2, 0, 1, 4, 6, 4, 5], "j": [1, 3, 2, 3, 5, 7, 6, 7],
                          "same": [1, 1, 0, 0, 1, 1, 0, 0]})
    rows = pd.DataFrame({"row": [4, 5, 6, 7], "label": list("AABB")})
    cfg = EvaluateConfig(bootstrap=0)
    result = evaluation.evaluate_model(emb, pairs, rows, rows, cfg, seed=0)
    val = pairs[pairs["split"] == "val"]
    val_d = metrics.pair_distances(emb.take(val["i"]), emb.take(val["j"]))
    expected = metrics.choose_threshold(val_d, [1, 1, 0, 0], "f1")
    assert result.metrics["threshold"] == pytest.approx(expected)
    swapped = pairs.assign(split=["test"] * 4 + ["val"] * 4)
    other = evaluation.evaluate_model(emb, swapped, rows, rows, cfg, seed=0)
    assert other.metrics["threshold"] != pytest.approx(expected)


def test_verification_numbers_match_scikit_learn():
    rng = np.random.default_rng(3)
    same = rng.integers(0, 2, 300)
    d = np.clip(rng.normal(0.8 - 0.3 * same, 0.25), 0, 2)
    val_same = rng.integers(0, 2, 300)
    val_d = np.clip(rng.normal(0.8 - 0.3 * val_same, 0.25), 0, 2)
    result = evaluation.verify(val_d, val_same, d, same, "accuracy", n_boot=200, seed=1)
    m = result.metrics
    predicted = (d <= m["threshold"]).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(same, predicted))
    assert m["f1"] == pytest.approx(f1_score(same, predicted))
    tn, fp, fn, tp = confusion_matrix(same, predicted, labels=[0, 1]).ravel()
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (tp, tn, fp, fn)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(same, -d))
    assert result.report["same"]["precision"] == pytest.approx(m["precision"])
    assert result.report["same"]["recall"] == pytest.approx(m["recall"])
    assert "same" in result.report_text and "different" in result.report_text
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    assert m["f1_ci_low"] <= m["f1"] <= m["f1_ci_high"]
    assert set(evaluation.FMRS) == {"1e-2", "1e-3"} and "fnmr_at_fmr_1e-3" in m


# --------------------------------------------------------------------------- pairs and lists


def split_table(per_class=6, classes="ABCD"):
    rows = []
    for label in classes:
        for i in range(per_class):
            split = "train" if i < per_class - 4 else ("val" if i < per_class - 2 else "test")
            rows.append((f"{label}/{i}.png", label, split))
    table = pd.DataFrame(rows, columns=["path", "label", "split"])
    table["file"] = "root/" + table["path"]
    return table


def test_evaluation_pairs_are_seeded_balanced_and_within_their_split():
    table = split_table()
    pairs = evaluation.evaluation_pairs(table, 50, 41, seed=3)
    assert (pairs["split"] == "val").sum() == 50 and (pairs["split"] == "test").sum() == 41
    for split, part in pairs.groupby("split"):
        assert (table["split"].to_numpy()[part[["i", "j"]].to_numpy()] == split).all()
        same = table["label"].to_numpy()[part["i"]] == table["label"].to_numpy()[part["j"]]
        np.testing.assert_array_equal(same, part["same"] == 1)
        assert part["same"].sum() == len(part) // 2
    assert (pairs["path_i"] == table["path"].to_numpy()[pairs["i"]]).all()
    pd.testing.assert_frame_equal(pairs, evaluation.evaluation_pairs(table, 50, 41, seed=3))
    assert not pairs.equals(evaluation.evaluation_pairs(table, 50, 41, seed=4))


def test_evaluation_pairs_need_two_classes_in_the_split():
    table = split_table(classes="A")
    with pytest.raises(UserError, match="val split"):
        evaluation.evaluation_pairs(table, 10, 10, seed=0)


def test_query_gallery_lists():
    table = split_table()
    queries, gallery = evaluation.query_gallery(table, "test")
    assert queries.equals(gallery) and len(queries) == 8
    assert list(queries.columns) == ["row", "path", "label", "file"]
    _, train = evaluation.query_gallery(table, "train")
    assert (table["split"].to_numpy()[train["row"]] == "train").all()
    disjoint = table.assign(label=np.where(table["split"] == "test", "unseen",
                                           table["label"]))
    with pytest.raises(UserError, match="evaluate.gallery"):
        evaluation.query_gallery(disjoint, "train")


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def tiny_nets():
    torch.manual_seed(0)
    config = ModelConfig(weights="none",
                         backbone="cifar_resnet", cifar_n=1, hidden_dim=16, embedding_dim=8)
    return models.EmbeddingNet(config).eval(), models.EmbeddingNet(config).eval()


def test_embed_models_computes_the_three_embeddings(tiny_nets):
    frozen, unfrozen = tiny_nets
    size = 32
    side = transforms.cache_size(size)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 3, side, side), dtype=np.uint8)
    table = split_table(per_class=3, classes="AB")
    rows = np.array([5, 0, 3])  # any order in, sorted out
    nets = {"train_frozen": frozen, "train_unfrozen": unfrozen}
    assert compared.checkpoints() == tuple(nets)
    found = evaluation.embed_models(nets, ImageCache(pixels), table, rows, size,
                                    torch.device("cpu"), "fp32")
    assert set(found) == set(compared.MODELS)
    x = transforms.normalize(transforms.eval_crop(size)(torch.from_numpy(pixels[[0, 3, 5]])),
                             transforms.NORMALIZATIONS["imagenet"])
    with torch.no_grad():
        expected = {"baseline": F.normalize(frozen.features(x), dim=1), "frozen": frozen(x),
                    "unfrozen": unfrozen(x)}
    for name, emb in found.items():
        np.testing.assert_array_equal(emb.rows, [0, 3, 5])
        np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(emb.vectors, expected[name].numpy(), atol=1e-4)
        assert emb.labels.tolist() == table["label"].iloc[[0, 3, 5]].tolist()
    assert found["baseline"].vectors.shape[1] == 128 and found["frozen"].vectors.shape[1] == 8


def test_a_fourth_model_is_one_registry_entry(tiny_nets):
    # The fine-tuned network's own pooled backbone, as a fourth model: one ComparedModel.
    frozen, unfrozen = tiny_nets
    four = (*compared.COMPARED_MODELS,
            compared.ComparedModel("unfrozen_backbone", "train_unfrozen", "backbone",
                                   "unfrozen backbone"))
    side = transforms.cache_size(32)
    pixels = np.random.default_rng(1).integers(0, 256, (6, 3, side, side), dtype=np.uint8)
    table = split_table(per_class=3, classes="AB")
    found = evaluation.embed_models({"train_frozen": frozen, "train_unfrozen": unfrozen},
                                    ImageCache(pixels), table, np.arange(6), 32,
                                    torch.device("cpu"), "fp32", four)
    assert list(found) == [*compared.MODELS, "unfrozen_backbone"]
    x = transforms.normalize(transforms.eval_crop(32)(torch.from_numpy(pixels)),
                             transforms.NORMALIZATIONS["imagenet"])
    with torch.no_grad():
        expected = F.normalize(unfrozen.features(x), dim=1).numpy()
    np.testing.assert_allclose(found["unfrozen_backbone"].vectors, expected, atol=1e-4)
    assert compared.checkpoints(four) == ("train_frozen", "train_unfrozen")
    # Its metrics get a column and a difference from each model before it.
    table = evaluation.comparison_table({m.name: {"map": i / 10} for i, m in enumerate(four)})
    assert [c for c in table.columns if c.startswith("unfrozen_backbone - ")] == [
        "unfrozen_backbone - baseline", "unfrozen_backbone - frozen",
        "unfrozen_backbone - unfrozen"]


def test_a_compared_model_needs_a_known_view():
    with pytest.raises(ValueError, match="view must be one of"):
        compared.ComparedModel("mine", "train_frozen", "logits", "mine")


def test_embeddings_save_load_and_take(tmp_path):
    emb = evaluation.Embeddings(np.array([2, 5, 9]), at_angles([0, 90, 180]),
                                np.array(list("ABA")), np.array(["val", "test", "test"]),
                                np.array(["a.png", "b.png", "c.png"]))
    emb.save(tmp_path / "e.npz")
    loaded = evaluation.Embeddings.load(tmp_path / "e.npz")
    for name in ("rows", "vectors", "labels", "splits", "paths"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(emb, name))
    np.testing.assert_array_equal(loaded.take([9, 2]), emb.vectors[[2, 0]])
    assert loaded.subset("test").rows.tolist() == [5, 9]
    with pytest.raises(UserError, match="row 3"):
        loaded.take([3])
    with pytest.raises(UserError, match="does not exist"):
        evaluation.Embeddings.load(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- whole model, tables


def toy_results(seed=0):
    """Three fake models on 4 classes x 6 images: better and better separated."""
    table = split_table()
    labels = table["label"].to_numpy()
    centres = {label: at_angles([i * 90])[0] for i, label in enumerate("ABCD")}
    rng = np.random.default_rng(seed)
    pairs = evaluation.evaluation_pairs(table, 60, 60, seed)
    queries, gallery = evaluation.query_gallery(table, "test")
    results = {}
    for noise, name in ((2.0, "baseline"), (0.6, "frozen"), (0.2, "unfrozen")):
        vectors = np.stack([centres[label] for label in labels]) + rng.normal(
            0, noise, (len(labels), 2))
        emb = evaluation.Embeddings(np.arange(len(table)), metrics.l2_normalize(vectors),
                                    labels, table["split"].to_numpy(), table["path"].to_numpy())
        results[name] = evaluation.evaluate_model(emb, pairs, queries, gallery,
                                                  EvaluateConfig(bootstrap=100), seed)
    return results, table, queries, gallery


def test_evaluate_model_reports_every_metric():
    results, *_ = toy_results()
    required = {"accuracy", "precision", "recall", "f1", "tp", "tn", "fp", "fn", "roc_auc",
                "eer", "fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "precision_at_1",
                "precision_at_5", "recall_at_1", "recall_at_5", "recall_at_10", "map",
                "map_at_r", "threshold", "worst_classes"}
    required |= {f"{m}_ci_{end}" for m in evaluation.WITH_CI for end in ("low", "high")}
    for result in results.values():
        assert required <= set(result.metrics)
        for name in evaluation.WITH_CI:
            m = result.metrics
            assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]
    assert results["unfrozen"].metrics["map"] > results["baseline"].metrics["map"]
    for result in results.values():  # cosine similarity of the test pairs, same vs different
        m, cosines = result.metrics, result.test_similarities
        same = result.verification.test_same.astype(bool)
        # Unit vectors: cos = 1 - d^2 / 2 of the pair distances verification used.
        np.testing.assert_allclose(cosines, 1 - result.verification.test_distances ** 2 / 2,
                                   atol=1e-5)
        assert m["cosine_same_mean"] == pytest.approx(cosines[same].mean())
        assert m["cosine_different_mean"] == pytest.approx(cosines[~same].mean())
        assert m["cosine_gap"] == pytest.approx(m["cosine_same_mean"]
                                                - m["cosine_different_mean"])
    # Less noise, classes further apart: the gap widens from baseline to unfrozen.
    assert results["unfrozen"].metrics["cosine_gap"] > results["baseline"].metrics["cosine_gap"]
    again, *_ = toy_results()
    assert again["frozen"].metrics == results["frozen"].metrics  # deterministic


def test_cosine_metrics_do_not_assume_unit_vectors():
    # The same directions at lengths 0.1 to 10: every cosine metric is unchanged.
    vectors = at_angles([0, 10, 90, 100, 0, 60, 90, 150])
    lengths = np.array([0.1, 3.0, 10.0, 0.5, 2.0, 0.2, 7.0, 1.0], np.float32)[:, None]
    labels, splits = np.array(list("AABBAABB")), np.array(["val"] * 4 + ["test"] * 4)
    pairs = pd.DataFrame({"split": ["val"] * 4 + ["test"] * 4,
                          "i": [0, 2, 0, 1, 4, 6, 4, 5], "j": [1, 3, 2, 3, 5, 7, 6, 7],
                          "same": [1, 1, 0, 0, 1, 1, 0, 0]})
    rows = pd.DataFrame({"row": [4, 5, 6, 7], "label": list("AABB")})
    found = {}
    for name, v in (("unit", vectors), ("scaled", vectors * lengths)):
        emb = evaluation.Embeddings(np.arange(8), v, labels, splits, np.array(list("abcdefgh")))
        found[name] = evaluation.evaluate_model(emb, pairs, rows, rows,
                                                EvaluateConfig(bootstrap=0), seed=0)
    # Test pairs: (0°, 60°) and (90°, 150°) same class, (0°, 90°) and (60°, 150°) different.
    expected = {"cosine_same_mean": 0.5, "cosine_different_mean": 0.0, "cosine_gap": 0.5,
                "cosine_same_std": 0.0, "cosine_different_std": 0.0}
    for result in found.values():
        assert {k: result.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(found["scaled"].test_similarities,
                               found["unit"].test_similarities, atol=1e-6)


def test_comparison_and_per_class_tables():
    results, *_ = toy_results()
    scores = {name: r.metrics for name, r in results.items()}
    table = evaluation.comparison_table(scores)
    assert table["metric"].tolist() == list(evaluation.COMPARED)
    assert list(table.columns[-3:]) == ["frozen - baseline", "unfrozen - baseline",
                                        "unfrozen - frozen"]
    row = table.set_index("metric").loc["map"]
    assert row["unfrozen - frozen"] == pytest.approx(row["unfrozen"] - row["frozen"])
    gap = table.set_index("metric").loc["cosine_gap"]
    assert gap["better"] == "higher" and gap["unfrozen"] == scores["unfrozen"]["cosine_gap"]
    markdown = evaluation.comparison_markdown(table, scores)
    assert markdown.count("\n") == len(table) + 2 and "| map | higher |" in markdown
    assert f"[{scores['unfrozen']['map_ci_low']:.3f}," in markdown
    per_class = evaluation.per_class_table(results)
    assert list(per_class.columns) == ["class", "queries", "baseline", "frozen", "unfrozen"]
    assert per_class["unfrozen"].is_monotonic_increasing and per_class["queries"].sum() == 8
    roc = evaluation.roc_table(results)
    assert list(roc.columns) == ["model", "fpr", "tpr"] and set(roc["model"]) == set(results)
    flat = evaluation.flat_metrics(scores)
    assert "unfrozen.map" in flat and not any(k.endswith("worst_classes") for k in flat)
    assert flat["unfrozen.cosine_gap"] == scores["unfrozen"]["cosine_gap"]  # logged to MLflow


def test_example_and_worst_queries():
    results, *_ = toy_results()
    per_query = results["baseline"].retrieval.per_query
    worst = evaluation.worst_queries(per_query, 3)
    assert per_query["ap"].iloc[worst].max() <= per_query["ap"].drop(index=worst).min()


def test_figures_are_drawn():
    results, table, queries, gallery = toy_results()
    side = transforms.cache_size(32)
    images = ImageCache(np.random.default_rng(0).integers(
        0, 256, (len(table), 3, side, side), dtype=np.uint8))
    drawn = evaluation.figures(results, images, queries, gallery, examples=2, seed=0)
    assert set(drawn) == {"confusion_matrix", "roc", "distance_histograms", "similarity",
                          "retrieval_examples", "worst_queries"}
    panels = drawn["similarity"].axes  # one per model, on the shared -1..1 axis
    assert [ax.get_title().split(":")[0] for ax in panels] == ["baseline", "frozen", "unfrozen"]
    gap = results["unfrozen"].metrics["cosine_gap"]
    assert panels[2].get_title() == f"unfrozen: gap {gap:+.3f}"
    assert all(ax.get_xlim() == (-1.0, 1.0) for ax in panels)
    grid = drawn["retrieval_examples"]
    titled = [ax.get_title() for ax in grid.axes if ax.get_title()]
    assert titled[:2] == ["query", "baseline #1"] and "unfrozen #5" in titled
    plt.close("all")


def test_an_unnormalised_model_is_evaluated_on_its_raw_embedding():
    # model.normalize false (the 2-D teaching experiment): the trained models' vectors are the
    # raw head output, the untrained baseline stays compared by cosine.
    torch.manual_seed(0)
    config = ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1, hidden_dim=16,
                         embedding_dim=2, normalize=False)
    net = models.EmbeddingNet(config).eval()
    side = transforms.cache_size(32)
    pixels = np.random.default_rng(2).integers(0, 256, (6, 3, side, side), dtype=np.uint8)
    found = evaluation.embed_models({"train_frozen": net, "train_unfrozen": net},
                                    ImageCache(pixels), split_table(per_class=3, classes="AB"),
                                    np.arange(6), 32, torch.device("cpu"), "fp32")
    x = transforms.normalize(transforms.eval_crop(32)(torch.from_numpy(pixels)),
                             transforms.NORMALIZATIONS["imagenet"])
    with torch.no_grad():
        raw = net(x, normalize=False).numpy()
    np.testing.assert_allclose(found["unfrozen"].vectors, raw, atol=1e-4)
    np.testing.assert_allclose(found["frozen"].vectors, raw, atol=1e-4)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(found["baseline"].vectors, axis=1), 1, atol=1e-5)
