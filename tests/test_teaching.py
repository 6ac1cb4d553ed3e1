"""End to end: the course's 2-D experiment on the bundled digits (`data.source: digits`), tiny.

The real `dvc repro` on scikit-learn's 1,797 handwritten digits, offline: a 6n+2 ResNet from
scratch with a 2-unit linear layer before its classifier (cross entropy, raw head output), the
2-D embeddings plotted directly and scored (kNN accuracy, P@1, silhouettes, class shape).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_repo, run

pytestmark = pytest.mark.e2e

DIGITS_2D = {
    "data": {"source": "digits", "image_size": 16},
    # Ink on black is far from a photo's statistics; the check still catches a wrong scale.
    "verify_normalization": {"mean_tolerance": 1.0},
    "model": {"backbone": "cifar_resnet", "cifar_n": 1, "weights": "none", "head": "linear",
              "embedding_dim": 2, "normalize": False},
    "train": {"loss": "cross_entropy", "batch_size": 32},
    "train_frozen": {"epochs": 1},
    "train_unfrozen": {"epochs": 2, "init": "scratch", "backbone_lr_mult": 1.0,
                       "batchnorm": "train", "augment": {"enabled": False}},
}


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory, mlflow_db_template):
    repo = make_repo(tmp_path_factory.mktemp("digits"), mlflow_db_template, DIGITS_2D)
    run(["dvc", "repro"], cwd=repo)
    return repo


def test_digits_are_prepared_offline_as_ten_classes(digits_repo):
    prepare = json.loads((digits_repo / "metrics/details/prepare.json").read_text())
    assert prepare["images"] == 1797 and prepare["classes"] == 10
    assert prepare["excluded"] == 0 and prepare["images_with_mask"] == 0


def test_the_2d_embeddings_are_plotted_and_scored(digits_repo):
    scores = json.loads((digits_repo / "metrics/details/embed_viz.json").read_text())
    unfrozen = scores["unfrozen"]
    assert unfrozen["embedding_dim"] == 2 and scores["baseline"]["class_shape"] is None
    assert 0 <= unfrozen["knn_accuracy"] <= 1 and 0 <= unfrozen["p_at_1"] <= 1
    assert unfrozen["radial_elongation"] > 0  # raw head output: it has a radial spread
    assert unfrozen["class_shape"] in ("radial spokes", "compact clusters", "overlapping classes")
    assert (digits_repo / "plots/embed_viz/direct.png").stat().st_size > 10_000
    evaluate = json.loads((digits_repo / "metrics/details/evaluate.json").read_text())
    assert {"cosine_same_mean", "cosine_different_mean", "cosine_gap"} <= set(evaluate["unfrozen"])
    report = (digits_repo / "report/report.md").read_text()
    assert "embed_viz/direct.png" in report and "classes lie as" in report
    assert "2-d unfrozen embedding (raw head output)" in report
