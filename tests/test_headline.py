"""headline: which numbers reach the DVC metrics files (and the MLflow parent run), and where."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from retrieval import headline, paths
from tests.report_data import METRICS

REPO = Path(__file__).resolve().parents[1]


def declared_metrics() -> dict[str, set[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: {next(iter(e)) if isinstance(e, dict) else e for e in stage.get("metrics", [])}
            for name, stage in stages.items()}


def test_the_headline_files_are_exactly_the_metrics_dvc_yaml_declares():
    declared = declared_metrics()
    for stage, values in METRICS.items():
        written = {p.as_posix() for p in headline.files(stage, values)}
        assert written == declared.get(stage, set()), stage
    every = {p for files in declared.values() for p in files}
    assert not [p for p in every if "/timing/" in p or "/details/" in p]


def test_each_per_model_file_holds_that_models_headline_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for stage, values in METRICS.items():
        headline.write(stage, values)
    assert json.loads(paths.model_metrics("evaluate", "unfrozen").read_text()) == {
        "precision_at_1": 0.66, "map": 0.58, "accuracy": 0.7, "roc_auc": 0.861}
    assert json.loads(paths.model_metrics("gradcam_segment", "frozen").read_text()) == {
        "iou": {"gradcam": 0.422}}
    assert json.loads(paths.metrics("train_unfrozen").read_text()) == {
        "val_accuracy": 0.77, "best_epoch": 3}
    # Everything the stage measured is in its details, as before.
    assert json.loads(paths.details("evaluate").read_text())["unfrozen"]["tp"] == 700
    assert json.loads(paths.details("prepare").read_text()) == METRICS["prepare"]
    assert not paths.metrics("prepare").exists()  # no headline: counts are not results
    assert headline.flat("evaluate", METRICS["evaluate"])["frozen.map"] == 0.41
    assert headline.flat("train_frozen", METRICS["train_frozen"]) == {
        "val_accuracy": 0.71, "best_epoch": 7}


def test_without_ground_truth_masks_every_declared_file_is_still_written(tmp_path, monkeypatch):
    """dvc.yaml declares one file per model: a run without IoU must still produce each."""
    monkeypatch.chdir(tmp_path)
    no_masks = {"iou_computed": False, "reason": "no masks",
                "unfrozen": {"gradcam": {"binarization": "otsu", "target": "prototype"}}}
    headline.write("gradcam_segment", no_masks)
    for path in declared_metrics()["gradcam_segment"]:
        assert json.loads(Path(path).read_text()) == {}
    assert headline.flat("gradcam_segment", no_masks) == {}
