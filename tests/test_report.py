"""The rendered report: every section and figure present, numbers equal to the metrics files,
stages that have not run reported as missing, the same bytes for the same inputs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from retrieval import report
from tests.report_data import FIGURES, METRICS, RUN, load, make_project, mlflow_runs


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


def build(root: Path, experiments=None) -> tuple[report.Inputs, list[report.Section]]:
    inputs = load(root, experiments)
    return inputs, report.build_sections(inputs)


@pytest.fixture(scope="module")
def rendered(project: Path) -> dict:
    inputs, sections = build(project)
    return {"inputs": inputs, "sections": sections,
            "html": report.render_html(sections, RUN),
            "md": report.render_markdown(sections, RUN, lambda f: f"figures/{f.key}.png")}


def test_every_section_is_present_in_order(rendered):
    ids = [s.id for s in rendered["sections"]]
    assert ids == ["summary", *(s.id for s in report.SECTIONS)]  # 'other': future_stage/...
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
    assert "*Figure 10 (evaluate/brand_new): evaluate: brand new*" in rendered["md"]


def test_numbers_match_the_metrics_files(rendered, project):
    html, md = rendered["html"], rendered["md"]
    evaluate = json.loads((project / "metrics/details/evaluate.json").read_text())
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
    assert "| prior: ellipse |  |  |  | 0.384 | 0.390 | 0.550 |" in md
    assert ("| gradcam (chosen on val) | otsu, grabcut:10/30 | 0.523 | 0.433 | 0.533 | 0.543 "
            "| 0.500 |") in md
    assert "unfrozen model: saliency masks against the ground truth; test accuracy 0.833" in md
    assert "| train | 84 | 3 |" in md and "| test | 18 | 3 |" in md
    assert "| R | 0.456 | 0.221 | -0.123 | 0.987 |" in md
    assert "| best_val_loss | 0.123 | 0.101 |" in md
    assert "| a/bad.jpg | not an image |" in md
    assert "| train_frozen | 0.001 | epoch 4: 0.001 to 0.0005; epoch 8: 0.0005 to 0.00025 " \
        "| 0.00025 |" in md
    assert RUN.git_commit in md and "evalrun0002" in md and "exp-lr3" in md


def test_rendering_is_deterministic(project, rendered):
    _, sections = build(project)
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
    (tmp_path / "metrics/details").mkdir(parents=True)
    (tmp_path / "metrics/details/prepare.json").write_text(json.dumps(METRICS["prepare"]))
    inputs = report.load_inputs(tmp_path / "metrics/details", tmp_path / "plots", {}, RUN)
    sections = report.build_sections(inputs)
    md = report.render_markdown(sections, RUN, lambda f: f.key)
    for stage in report.STAGES[1:]:
        assert f"The {stage} stage has not produced its outputs yet" in md, stage
    assert "The dataset has 120 images in 3 classes" in md
    assert "Figure" not in md and "other" not in [s.id for s in sections]
    report.render_pdf(sections, RUN, tmp_path / "r.pdf")  # renders without any figure


def test_a_stage_that_ran_without_its_figure_is_reported(tmp_path):
    (tmp_path / "metrics/details").mkdir(parents=True)
    (tmp_path / "metrics/details/embed_viz.json").write_text(json.dumps(METRICS["embed_viz"]))
    inputs = report.load_inputs(tmp_path / "metrics/details", tmp_path / "plots", {}, RUN)
    md = report.render_markdown(report.build_sections(inputs), RUN, lambda f: f.key)
    assert "Figure embed_viz/tsne.png was not found" in md
    assert "embed_viz/direct" not in md  # optional: drawn only for 2-D embeddings


def test_nothing_has_run(tmp_path):
    inputs = report.load_inputs(tmp_path / "metrics/details", tmp_path / "plots", {}, RUN)
    (summary, *_) = report.build_sections(inputs)
    assert summary.blocks == [report.Missing("No stage has produced metrics yet: run `dvc "
                                             "repro`.")]


def test_experiment_comparison_from_mlflow_runs(project):
    runs = [*mlflow_runs(), {"run_id": "r9", "params": {"lr": "0.1"}, "metrics": {}}]
    table = report.experiments_table(runs, current_run_id="r1")  # r9: never evaluated
    assert list(table["run"]) == ["exp-1 (this report)", "exp-0", "exp-2"]
    assert list(table.columns[:3]) == ["run", "commit", "lr"]  # seed does not vary: not shown
    _, sections = build(project, table)
    md = report.render_markdown(sections, RUN, lambda f: f.key)
    assert "| exp-1 (this report) | abcdef01 | 0.0001 | 0.480 | 0.580 |" in md
    (summary, *_) = sections
    assert any("differ only in lr" in note for note in summary.blocks[0].items)


def test_wall_time_per_stage_in_pipeline_order_with_the_total(project):
    details = project / "metrics" / "details"
    inputs = report.load_inputs(details, project / "plots", {}, dataclasses.replace(
        RUN, durations={"evaluate": 90.0, "train_frozen": 30.0, "prepare": 6.0}))
    md = report.render_markdown(report.build_sections(inputs), inputs.run, lambda f: f.key)
    table = md[md.index('<a id="wall_time">'):]
    assert "| prepare | 0.1 |\n| train_frozen | 0.5 |\n| evaluate | 1.5 |\n| all of them | 2.1 |" \
        in table
    none = report.build_sections(report.load_inputs(details, project / "plots", {}, RUN))
    (wall,) = [s for s in none if s.id == "wall_time"]
    assert "No stage of this pipeline execution" in wall.blocks[0].text


def test_only_runs_on_the_same_data_are_compared():
    here = {"data.source": "folder", "data.root": "caltech", "data.masks": "", "lr": 0.001}
    runs = [{"run_id": "same", "params": {"data.source": "folder", "data.root": "caltech",
                                          "lr": "0.0003"}},  # data.masks not logged: ""
            {"run_id": "leeds", "params": {"data.source": "folder", "data.root": "leeds",
                                           "data.masks": "leeds-masks"}},
            {"run_id": "sample", "params": {"data.source": "synthetic", "data.root": ""}}]
    assert [r["run_id"] for r in report.on_same_data(runs, here)] == ["same"]
    sample = {"data.source": "synthetic", "data.root": "", "data.masks": ""}
    assert [r["run_id"] for r in report.on_same_data(runs, sample)] == ["sample"]


def test_experiments_table_counts_the_parameters_it_does_not_show():
    runs = [{"run_id": f"r{i}", "params": {f"p{j}": str(i * j) for j in range(1, 9)},
             "metrics": {"evaluate.unfrozen.map": 0.1 * i}} for i in range(3)]
    table = report.experiments_table(runs, max_params=6)
    assert list(table.columns[2:8]) == [f"p{j}" for j in range(1, 7)]
    assert table.attrs["parameters_not_shown"] == 2


def test_fmt():
    assert [report.fmt(v) for v in (0.41, 1.0, 3, None, float("nan"), True)] == [
        "0.410", "1.000", "3", "n/a", "n/a", "yes"]
    assert report.fmt_param(0.0005) == "0.0005" and report.fmt_param(("a", "b")) == "a, b"


def test_cosine_similarity_section_with_and_without_its_metrics(rendered, tmp_path):
    md = rendered["md"]
    section = md[md.index('<a id="similarity"></a>'):md.index('<a id="embeddings"></a>')]
    assert "| baseline | 0.812 | 0.700 | 0.112 | 0.100 | 0.200 |" in section
    assert "| unfrozen | 0.700 | 0.090 | 0.610 | 0.100 | 0.200 |" in section
    assert "](figures/evaluate/similarity.png)" in section
    assert "from 0.112 (baseline) to 0.610 (unfrozen)" in section
    (summary, *_) = rendered["sections"]
    assert any("from 0.112 (baseline) to 0.610 (unfrozen)" in n for n in summary.blocks[0].items)
    assert "cosine_gap" not in md  # not repeated as an unknown metric of the retrieval table
    # An evaluate.json (and plots folder) from before the cosine metrics: a notice, no crash.
    root = make_project(tmp_path)
    older = {m: {k: v for k, v in s.items() if not k.startswith("cosine_")}
             for m, s in METRICS["evaluate"].items()}
    (root / "metrics/details/evaluate.json").write_text(json.dumps(older))
    (root / "plots/evaluate/similarity.png").unlink()
    _, sections = build(root)
    old_md = report.render_markdown(sections, RUN, lambda f: f.key)
    old = old_md[old_md.index('<a id="similarity"></a>'):old_md.index('<a id="embeddings"></a>')]
    assert "The evaluate metrics have no cosine similarities of the test pairs" in old
    assert "Figure evaluate/similarity.png was not found" in old
    assert "widened" not in old_md and "| same-class mean |" not in old_md
    report.render_html(sections, RUN)


def test_pdf_table_with_one_very_long_column_keeps_room_for_the_others(tmp_path):
    # A 100-epoch run's learning-rate table: the changes column is hundreds of characters long,
    # and a proportional share left the stage column narrower than its padding (reportlab
    # refused to lay it out).
    from retrieval.report.document import Section, Table

    changes = "; ".join(f"epoch {e}: 0.0001 to 5e-05" for e in range(4, 100, 7))
    table = Table(("stage", "initial lr", "changes", "final lr"),
                  (("train_frozen", "0.0001", "none", "0.0001"),
                   ("train_unfrozen", "0.0001", changes, "1.2207e-08")), "Learning rate")
    report.render_pdf([Section("lr", "Learning rate", [table])], RUN, tmp_path / "r.pdf")
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
