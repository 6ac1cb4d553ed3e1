"""The report: every section and figure present, numbers equal to the metrics files, observations
computed from the numbers, stages that have not run reported as missing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from retrieval import report

matplotlib.use("Agg")

RUN = report.RunInfo("0123456789abcdef0123456789abcdef01234567", "exp-lr3",
                     {"pipeline": "parent0001", "evaluate": "evalrun0002", "report": "rep0003"})

EVALUATE = {
    model: {"map": m, "map_ci_low": m - 0.02, "map_ci_high": m + 0.02, "precision_at_1": p1,
            "roc_auc": auc, "eer": 0.3, "accuracy": 0.7, "precision": 0.71, "recall": 0.69,
            "f1": 0.7, "tp": 700, "tn": 690, "fp": 310, "fn": 300, "threshold": 0.8,
            "recall_at_5": 0.9, "n_queries": 60, "ranks": 59, "embedding_dim": 16,
            "worst_classes": ["b", "a"]}
    for model, m, p1, auc in (("baseline", 0.212, 0.301, 0.612), ("frozen", 0.41, 0.52, 0.744),
                              ("unfrozen", 0.58, 0.66, 0.861))}
METRICS = {
    "prepare": {"images": 120, "classes": 3, "excluded": 1, "excluded_files": ["a/bad.jpg"],
                "images_with_mask": 120, "min_class_size": 30, "max_class_size": 50},
    "split": {"mode": "stratified", "train_images": 84, "val_images": 18, "test_images": 18,
              "train_classes": 3, "val_classes": 3, "test_classes": 3, "small_classes": 0},
    "verify_normalization": {"images": 32, "image_size": 32, "mean_tolerance": 0.5,
                             "std_tolerance": 0.5, "normalized_mean_r": -0.123,
                             "normalized_mean_g": 0.045, "normalized_mean_b": 0.267,
                             "normalized_std_r": 0.987, "normalized_std_g": 1.021,
                             "normalized_std_b": 1.043, "raw_mean_r": 0.456,
                             "raw_mean_g": 0.432, "raw_mean_b": 0.398, "raw_std_r": 0.221,
                             "raw_std_g": 0.215, "raw_std_b": 0.231},
    "train_frozen": {"best_epoch": 7, "best_val_loss": 0.1234, "epochs_run": 10,
                     "stopped": "early_stopping", "val_accuracy": 0.71,
                     "val_accuracy_before": 0.52, "val_f1": 0.69, "val_precision": 0.7,
                     "val_recall": 0.68, "lr_reductions": 2, "threshold": 0.9},
    "train_unfrozen": {"best_epoch": 3, "best_val_loss": 0.1011, "epochs_run": 4,
                       "stopped": "epochs", "val_accuracy": 0.77, "val_accuracy_before": 0.71,
                       "val_f1": 0.75, "val_precision": 0.76, "val_recall": 0.74,
                       "lr_reductions": 0, "threshold": 0.8},
    "evaluate": EVALUATE,
    "embed_viz": {m: {"silhouette": s, "embedding_dim": 16}
                  for m, s in (("baseline", -0.052), ("frozen", 0.137), ("unfrozen", 0.291))}
    | {"points": 18, "classes": 3, "perplexity_used": 5.0},
    "gradcam_segment": {
        "iou_computed": True, "images": {"val": 18, "test": 18}, "foreground_fraction": 0.3,
        **{model: {"gradcam": {"binarization": "otsu", "target": "prototype",
                               "mean_iou": iou, "median_iou": iou + 0.01, "mean_dice": 0.5,
                               "median_dice": 0.5, "val_mean_iou": iou - 0.01}}
           for model, iou in (("baseline", 0.311), ("frozen", 0.422), ("unfrozen", 0.533))},
        "baselines": {"ellipse": {"mean_iou": 0.384, "median_iou": 0.39, "mean_dice": 0.55,
                                  "median_dice": 0.56},
                      "full": {"mean_iou": 0.255, "median_iou": 0.25, "mean_dice": 0.4,
                               "median_dice": 0.4}},
        "best_method": {"baseline": "gradcam", "frozen": "gradcam", "unfrozen": "gradcam"}},
}
FIGURES = ["verify_normalization/histograms", "train_frozen/curves", "train_unfrozen/curves",
           "evaluate/confusion_matrix", "evaluate/roc", "evaluate/distance_histograms",
           "evaluate/retrieval_examples", "evaluate/worst_queries", "evaluate/brand_new",
           "embed_viz/tsne", "embed_viz/pca", "gradcam_segment/overlays_baseline",
           "gradcam_segment/overlays_frozen", "gradcam_segment/overlays_unfrozen",
           "gradcam_segment/iou_histogram", "future_stage/something"]


def history(lrs: list[float], val_loss: list[float]) -> pd.DataFrame:
    n = len(lrs)
    return pd.DataFrame({
        "epoch": range(n), "lr": lrs, "val_loss": val_loss,
        "train_loss": [None] + [0.3 - 0.01 * i for i in range(1, n)],
        "train_accuracy": [0.5 + 0.03 * i for i in range(n)],
        "val_accuracy": [0.5 + 0.02 * i for i in range(n)]})


FROZEN_HISTORY = history([1e-3] * 4 + [5e-4] * 4 + [2.5e-4] * 3,
                         [0.3, 0.2, 0.18, 0.16, 0.15, 0.14, 0.13, 0.1234, 0.125, 0.13, 0.14])
UNFROZEN_HISTORY = history([1e-3] * 5, [0.13, 0.12, 0.11, 0.1011, 0.104])


def tiny_png(path: Path, colour: str) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, ax = plt.subplots(figsize=(1.2, 0.8))
    ax.set_facecolor(colour)
    ax.set(title=path.stem, xlabel="x")
    figure.savefig(path, dpi=40)
    plt.close(figure)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake project: metrics/*.json and plots/<stage>/ as the stages write them."""
    root = tmp_path_factory.mktemp("project")
    for stage, values in METRICS.items():
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{stage}.json").write_text(json.dumps(values))
    colours = matplotlib.colormaps["tab20"]
    for i, key in enumerate(FIGURES):
        tiny_png(root / "plots" / f"{key}.png", colours(i))
    FROZEN_HISTORY.to_csv(root / "plots/train_frozen/history.csv", index=False)
    UNFROZEN_HISTORY.to_csv(root / "plots/train_unfrozen/history.csv", index=False)
    (root / "plots/split").mkdir(parents=True)
    pd.DataFrame({"label": ["a", "b", "c"], "train": [21, 35, 28], "val": [4, 8, 6],
                  "test": [5, 7, 6]}).to_csv(root / "plots/split/class_counts.csv", index=False)
    pd.DataFrame({"path": ["a/bad.jpg"], "reason": ["not an image"]}).to_csv(
        root / "excluded.csv", index=False)
    return root


def build(root: Path, experiments: pd.DataFrame | None = None) -> tuple[report.Inputs, list]:
    inputs = report.load_inputs(root / "metrics", root / "plots",
                                {"lr": 0.001, "train.lr_factor": 0.5, "train.lr_patience": 2,
                                 "gradcam_segment.methods": ("gradcam",)},
                                RUN, experiments, root / "excluded.csv")
    figure = report.lr_schedule_figure(inputs.histories)
    lr_png = root / "report_figures" / "lr_schedule.png"
    lr_png.parent.mkdir(exist_ok=True)
    figure.savefig(lr_png, dpi=40)
    inputs.figures[report.LR_FIGURE] = lr_png
    return inputs, report.build_sections(inputs)


@pytest.fixture(scope="module")
def rendered(outputs: Path) -> dict:
    inputs, sections = build(outputs)
    return {"inputs": inputs, "sections": sections,
            "html": report.render_html(sections, RUN),
            "md": report.render_markdown(sections, RUN, lambda f: f"figures/{f.key}.png")}


def test_every_section_is_present_in_order(rendered):
    ids = [s.id for s in rendered["sections"]]
    assert ids == list(report.SECTIONS)  # 'other' is there: future_stage/something
    for section in rendered["sections"]:
        assert f'<section id="{section.id}">' in rendered["html"]
        assert f'<a id="{section.id}"></a>' in rendered["md"]
        assert section.title in rendered["md"]


def test_every_figure_appears_exactly_once(rendered):
    keys = [*FIGURES, report.LR_FIGURE]
    html_keys = re.findall(r'<figure data-key="([^"]+)"', rendered["html"])
    assert sorted(html_keys) == sorted(keys)
    assert rendered["html"].count("data:image/png;base64,") == len(keys)
    for key in keys:
        assert rendered["md"].count(f"](figures/{key}.png)") == 1
    sections = {s.id: [b.key for b in s.blocks if isinstance(b, report.Figure)]
                for s in rendered["sections"]}
    assert "evaluate/brand_new" in sections["retrieval"]  # unknown figure: under its stage
    assert sections["other"] == ["future_stage/something"]  # unknown stage: 'Other figures'
    assert sections["lr_schedule"] == [report.LR_FIGURE]


def test_numbers_match_the_metrics_files(rendered, outputs):
    html, md = rendered["html"], rendered["md"]
    evaluate = json.loads((outputs / "metrics/evaluate.json").read_text())
    for scores in evaluate.values():
        for name in ("map", "precision_at_1", "roc_auc", "eer", "recall_at_5"):
            assert report.fmt(scores[name]) in md
        ci = f"{scores['map']:.3f} [{scores['map_ci_low']:.3f}, {scores['map_ci_high']:.3f}]"
        assert ci in md and ci in html
    for model, values in METRICS["embed_viz"].items():
        if isinstance(values, dict):
            assert f"| {model} | 16 | {values['silhouette']:.3f} |" in md
    for model in report.MODELS:
        iou = METRICS["gradcam_segment"][model]["gradcam"]["mean_iou"]
        assert f"{iou:.3f}" in md
    assert "| trivial baseline | ellipse |  |  | 0.384 |" in md
    assert "| train | 84 | 3 |" in md and "| test | 18 | 3 |" in md
    assert "| R | 0.456 | 0.221 | -0.123 | 0.987 |" in md
    assert "| best_val_loss | 0.123 | 0.101 |" in md
    assert "| a/bad.jpg | not an image |" in md
    assert RUN.git_commit in md and "evalrun0002" in md and "exp-lr3" in md


def test_rendering_is_deterministic(outputs, rendered):
    _, sections = build(outputs)
    assert report.render_markdown(sections, RUN, lambda f: f.key) == report.render_markdown(
        rendered["sections"], RUN, lambda f: f.key)
    assert report.render_html(sections, RUN) == rendered["html"]


def test_pdf_has_every_figure_and_is_reproducible(rendered, tmp_path):
    first, second = tmp_path / "a.pdf", tmp_path / "b.pdf"
    report.render_pdf(rendered["sections"], RUN, first)
    report.render_pdf(rendered["sections"], RUN, second)
    data = first.read_bytes()
    assert data.startswith(b"%PDF") and data == second.read_bytes()
    assert data.count(b"/Subtype /Image") == len(FIGURES) + 1
    for i, section in enumerate(rendered["sections"], 1):  # the outline names every section
        assert f"/Title ({i}. {section.title}".split(" (test")[0].encode() in data


def test_stages_that_have_not_run_are_reported_missing(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/prepare.json").write_text(json.dumps(METRICS["prepare"]))
    inputs = report.load_inputs(tmp_path / "metrics", tmp_path / "plots", {}, RUN)
    sections = report.build_sections(inputs)
    md = report.render_markdown(sections, RUN, lambda f: f.key)
    for stage in report.STAGES[1:]:
        assert f"The {stage} stage has not produced its outputs yet" in md, stage
    assert "The dataset has 120 images in 3 classes" in md
    report.render_pdf(sections, RUN, tmp_path / "r.pdf")  # renders without any figure


def test_observation_fine_tuning_raised_map():
    notes = report.evaluation_observations(EVALUATE)
    sentence = next(n for n in notes if n.startswith("Fine-tuning") and "mAP" in n)
    assert "raised test mAP from 0.410 to 0.580" in sentence and "+0.170" in sentence
    # The bootstrap intervals [0.39, 0.43] and [0.56, 0.60] are disjoint.
    assert "do not overlap" in sentence


def test_observation_lowered_and_overlapping():
    scores = {"frozen": {"map": 0.5, "map_ci_low": 0.45, "map_ci_high": 0.55},
              "unfrozen": {"map": 0.48, "map_ci_low": 0.43, "map_ci_high": 0.53}}
    (sentence,) = report.evaluation_observations(scores)
    assert "lowered test mAP from 0.500 to 0.480" in sentence and "overlap" in sentence


def test_learning_rate_reductions_are_counted_from_the_history():
    notes = report.lr_observations("train_frozen", FROZEN_HISTORY)
    assert notes[0] == ("train_frozen: the learning rate was reduced twice (0.001 to 0.0005 at "
                        "epoch 4; 0.0005 to 0.00025 at epoch 8).")
    # Best before epoch 4: 0.16 (epoch 3); from epoch 4 to 7 it reached 0.1234 at epoch 7.
    assert "improved on its previous best 0.160, reaching 0.123 at epoch 7" in notes[1]
    assert "did not go below its previous best 0.123" in notes[2]
    assert report.lr_observations("x", history([0.01] * 3, [0.3, 0.2, 0.1]))[0].startswith(
        "x: the learning rate stayed at 0.01 for all 2 epochs")


def test_validation_loss_stopped_improving():
    notes = report.training_observations("train_frozen", FROZEN_HISTORY,
                                         METRICS["train_frozen"])
    assert notes[0] == ("train_frozen: validation loss stopped improving at epoch 7 (0.123); "
                        "early stopping ended training at epoch 10, 3 epochs later.")
    assert "rose from 0.123 to 0.140 after epoch 7" in notes[1]  # over-fitting
    assert "raised validation pair accuracy from 0.520 to 0.710" in notes[2]
    still = report.training_observations("u", UNFROZEN_HISTORY.iloc[:4], {})
    assert "still improving at the last epoch (3" in still[0]
    never = report.training_observations("u", history([1e-3] * 3, [0.1, 0.2, 0.3]), {})
    assert "never went below its starting value 0.100 (epoch 0" in never[0]


def test_other_observations_use_the_numbers():
    (silhouettes, *changes) = report.embedding_observations(METRICS["embed_viz"])
    assert "baseline -0.052, frozen 0.137, unfrozen 0.291" in silhouettes
    assert "raised the silhouette from -0.052 to 0.291" in changes[1]
    gradcam = report.gradcam_observations(METRICS["gradcam_segment"])
    assert "unfrozen: gradcam" in gradcam[2] and "0.533, above the ellipse baseline (0.384) " \
        "by 0.149" in gradcam[2]
    assert "0.311, below the ellipse baseline" in gradcam[0]
    normalisation = report.normalization_observations(METRICS["verify_normalization"])
    assert "largest |mean| 0.267 in B" in normalisation[0] and "passed" in normalisation[0]
    failing = dict(METRICS["verify_normalization"], normalized_mean_g=1.5)
    assert report.normalization_observations(failing)[0].endswith("FAILED.")


def test_experiment_comparison_from_mlflow_runs(outputs):
    runs = [{"run_id": f"r{i}", "name": f"run {i}", "dvc_experiment": f"exp-{i}",
             "git_commit": "abcdef0123", "params": {"lr": lr, "seed": "42"},
             "metrics": {"evaluate.unfrozen.map": m, "evaluate.frozen.map": m - 0.1}}
            for i, (lr, m) in enumerate((("0.001", 0.41), ("0.0001", 0.58), ("0.01", 0.2)))]
    runs.append({"run_id": "r9", "params": {"lr": "0.1"}, "metrics": {}})  # never evaluated
    table = report.experiments_table(runs, current_run_id="r1")
    assert list(table["run"]) == ["exp-1 (this report)", "exp-0", "exp-2"]
    assert list(table.columns[:3]) == ["run", "commit", "lr"]  # seed does not vary: not shown
    notes = report.experiments_observations(table)
    assert "highest unfrozen test mAP, 0.580, came from the run exp-1 (this report) with " \
        "lr=0.0001" in notes[0]
    assert notes[1] == ("Unfrozen test mAP by lr: lr=0.0001: 0.580; lr=0.001: 0.410; "
                        "lr=0.01: 0.200.")
    _, sections = build(outputs, table)
    md = report.render_markdown(sections, RUN, lambda f: f.key)
    assert "| exp-1 (this report) | abcdef01 | 0.0001 | 0.480 | 0.580 |" in md


def test_fmt():
    assert [report.fmt(v) for v in (0.41, 1.0, 3, None, float("nan"), True)] == [
        "0.410", "1.000", "3", "n/a", "n/a", "yes"]
    assert report.fmt_param(0.0005) == "0.0005" and report.fmt_param(("a", "b")) == "a, b"
