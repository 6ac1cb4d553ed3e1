"""End to end: the real `dvc repro` / `dvc exp run` on a tiny generated sample."""

from __future__ import annotations

import json
import sqlite3

import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.e2e


def stages_of(repo) -> dict:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def test_repro_runs_every_stage_and_writes_its_metrics(pipeline_repo):
    log = (pipeline_repo / ".first_repro.log").read_text()
    for name, stage in stages_of(pipeline_repo).items():
        assert f"Running stage '{name}'" in log
        for entry in stage.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            metrics = json.loads((pipeline_repo / path).read_text())
            assert metrics, f"{path} is empty"
    assert run(["dvc", "status"], cwd=pipeline_repo).stdout.strip().endswith(
        "Data and pipelines are up to date.")


def test_data_stages_outputs(pipeline_repo):
    prepare = json.loads((pipeline_repo / "metrics/details/prepare.json").read_text())
    assert prepare["images"] == 4 * 14 and prepare["classes"] == 4
    assert prepare["images_with_mask"] == prepare["images"]
    split = (pipeline_repo / "data/split.csv").read_text().splitlines()
    assert split[0] == "path,label,split,mask_path" and len(split) == 1 + 4 * 14
    norm = json.loads((pipeline_repo / "metrics/details/verify_normalization.json").read_text())
    assert all(abs(norm[f"normalized_mean_{c}"]) < 0.5 for c in "rgb")


def test_training_writes_loadable_checkpoints_and_curves(pipeline_repo):
    from retrieval import models

    for stage in ("train_frozen", "train_unfrozen"):
        net, checkpoint = models.load_model(pipeline_repo / "models" / stage / "best.pt")
        # Below every distance (predict "different" for all) is a legal choice for a weak model.
        assert checkpoint["stage"] == stage and -1.5 <= checkpoint["threshold"] <= 2
        history = (pipeline_repo / "plots" / stage / "history.csv").read_text().splitlines()
        assert history[0].startswith("epoch,") and len(history) == 1 + 1 + 2  # epochs 0..2
        metrics = json.loads((pipeline_repo / "metrics" / f"{stage}.json").read_text())
        assert 0 <= metrics["best_epoch"] <= 2


def test_report_times_every_stage_from_its_mlflow_run(pipeline_repo):
    md = (pipeline_repo / "report" / "report.md").read_text()
    table = md[md.index('<a id="wall_time">'):md.index('<a id="configuration">')]
    for name in stages_of(pipeline_repo):
        if name != "report":  # its own run is still open while it writes
            assert f"| {name} | " in table, name
    assert "| all of them | " in table


def test_second_repro_runs_nothing(pipeline_repo):
    result = run(["dvc", "repro"], cwd=pipeline_repo)
    assert "Running stage" not in result.stdout, result.stdout


def test_every_stage_is_an_mlflow_run_grouped_under_one_parent(pipeline_repo):
    db = sqlite3.connect(pipeline_repo / "mlruns" / "mlflow.db")
    tags = db.execute("select run_uuid, key, value from tags").fetchall()
    by_run: dict[str, dict[str, str]] = {}
    for run_id, key, value in tags:
        by_run.setdefault(run_id, {})[key] = value
    parents = [t for t in by_run.values() if t.get("pipeline.parent") == "true"]
    children = {t["stage"]: t for t in by_run.values() if "stage" in t}
    assert set(stages_of(pipeline_repo)) <= set(children)
    first_group = children["prepare"]["pipeline.group"]
    assert any(p["pipeline.group"] == first_group for p in parents)
    assert all(len(t["git_commit"]) == 40 for t in children.values())
    assert all(t.get("mlflow.parentRunId") for t in children.values())
    logged = db.execute("select count(*) from metrics").fetchone()[0]
    assert logged > 20
    # The parent carries the headline alone (the DVC metrics files' numbers), not the details.
    (parent,) = [run_id for run_id, t in by_run.items()
                 if t.get("pipeline.parent") == "true" and t["pipeline.group"] == first_group]
    on_parent = {key for (key,) in db.execute(
        "select distinct key from metrics where run_uuid = ?", (parent,)).fetchall()}
    assert on_parent == set(headline_of(pipeline_repo))


def headline_of(repo) -> dict[str, dict]:
    """'<stage>.<key>' -> value: every stage's headline, from the details it wrote."""
    from retrieval import headline

    found = {}
    for stage in stages_of(repo):
        details = repo / "metrics" / "details" / f"{stage}.json"
        if details.is_file():
            found.update({f"{stage}.{k}": v for k, v in
                          headline.flat(stage, json.loads(details.read_text())).items()})
    return found


def test_dvc_metrics_are_the_headline_alone(pipeline_repo):
    """Issue 18: `dvc metrics show` printed one table thousands of characters wide and `dvc
    metrics diff` mixed in the timings; the declared metrics are now the headline files alone."""
    from retrieval import headline

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], cwd=pipeline_repo).stdout)
    (files,) = [revision["data"] for revision in shown.values()]
    expected = {}
    for stage in stages_of(pipeline_repo):
        details = json.loads((pipeline_repo / "metrics/details" / f"{stage}.json").read_text()
                             ) if stage != "report" else {}
        expected.update({path.as_posix(): content
                         for path, content in headline.files(stage, details).items()})
    assert {path: entry["data"] for path, entry in files.items()} == expected
    assert len(expected) == 3 + 3 + 2  # evaluate and gradcam_segment per model, 2 trainings
    table = run(["dvc", "metrics", "show"], cwd=pipeline_repo).stdout.splitlines()
    assert len(table) == 1 + len(expected) and max(map(len, table)) <= 200, table
    diff = run(["dvc", "metrics", "diff", "--all"], cwd=pipeline_repo).stdout
    assert "timing" not in diff and "details" not in diff and "tp" not in diff.split()


def test_exp_run_with_lr_retrains_and_lands_in_the_project_store(pipeline_repo):
    result = run(["dvc", "exp", "run", "-S", "lr=0.003", "-n", "lr-3e-3"], cwd=pipeline_repo)
    assert "Stage 'prepare' didn't change" in result.stdout or \
        "'prepare' didn't change" in result.stdout
    assert "Running stage 'train_frozen'" in result.stdout
    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=pipeline_repo).stdout)
    text = json.dumps(shown)
    assert "lr-3e-3" in text and "0.003" in text
    db = sqlite3.connect(pipeline_repo / "mlruns" / "mlflow.db")
    experiments = {v for (v,) in db.execute(
        "select value from tags where key = 'dvc_experiment'").fetchall()}
    assert "lr-3e-3" in experiments


def test_one_threshold_from_evaluate_to_compare_export_and_report(pipeline_repo, capsys,
                                                                    monkeypatch, tmp_path):
    """evaluate saves its val-chosen threshold beside each trained checkpoint; compare (with the
    default model), the export's preprocessing.json and the report state that same one."""
    from retrieval import outputs
    from tests.conftest import call_cli

    scores = json.loads((pipeline_repo / "metrics" / "details" / "evaluate.json").read_text())
    for model, stage in (("frozen", "train_frozen"), ("unfrozen", "train_unfrozen")):
        saved = json.loads((pipeline_repo / "models" / stage / "threshold.json").read_text())
        assert saved["model"] == model and saved["criterion"] in ("accuracy", "f1")
        assert saved["checkpoint_sha256"] == outputs.file_digest(
            pipeline_repo / "models" / stage / "best.pt")
        assert saved["threshold"] == pytest.approx(scores[model]["threshold"], abs=1e-6)
    value = saved["threshold"]  # the fine-tuned model's
    card = json.loads((pipeline_repo / "models" / "export" / "preprocessing.json").read_text())
    assert card["threshold"] == value and card["threshold_source"].startswith("evaluate's")
    assert f"distance <= {value:.4f} is" in (pipeline_repo / "report" / "report.md").read_text()

    root = pipeline_repo / json.loads(
        (pipeline_repo / "data" / "prepared" / "dataset.json").read_text())["root"]
    first, second = sorted(root.rglob("*.png"))[:2]
    monkeypatch.chdir(pipeline_repo)
    code, out, err = call_cli(["compare", first, second, "--output",
                               tmp_path / "pair.png"], capsys)
    assert code == 0, err
    assert f"threshold {value:.4f})" in out and "threshold:  evaluate's" in out
