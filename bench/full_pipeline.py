"""Rows 8, 11 and 12: the whole pipeline on real data, as the README's commands run it.

Each row is a throw-away copy of the repository with params.yaml's defaults (the offline
ImageNet-pretrained EfficientNet-Lite0) plus only the README's data overrides. Each stage runs as
`dvc repro --single-item <stage>` in dvc.yaml's order, so the time includes DVC's own work; peak
RSS is the largest of the stage's processes. The decoded-image cache starts cold. Besides time
and memory, a row records the test metrics of baseline / frozen / fine-tuned and checks the
issue's target for that experiment.
--quick runs only the first stage, on the tiny generated sample with the tests' params.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import pipeline

CALTECH = {"source": "folder", "root": str(common.CALTECH), "image_size": 160}
LEEDS = {"source": "folder", "root": str(common.LEEDS / "images"),
         "masks": str(common.LEEDS / "masks"), "image_size": 160}
# The README's commands (section "Real datasets"), as params overrides.
FAST_FINE_TUNING = {"unfreeze_from": "blocks5"}  # the README's $F
EXPERIMENTS = {
    "caltech": {"data": CALTECH},
    "caltech_disjoint": {"data": CALTECH, "split": {"mode": "class_disjoint"},
                         "train_unfrozen": FAST_FINE_TUNING},
    "leeds": {"data": LEEDS, "train_unfrozen": FAST_FINE_TUNING},
    # Issue 14's segmentation experiments (README, "Segmentation for free").
    "leeds_segment": {"data": LEEDS},
    "leeds_ce": {"data": LEEDS, "train": {"loss": "cross_entropy"}},
    "leeds_scratch": {"data": {**LEEDS, "image_size": 128}, "lr": 0.001,
                      "model": {"backbone": "cifar_resnet", "cifar_n": 2, "weights": "none",
                                "head": "none"},
                      "train": {"loss": "cross_entropy"}, "train_frozen": {"epochs": 5},
                      "train_unfrozen": {"init": "scratch", "backbone_lr_mult": 1.0,
                                         "batchnorm": "train", "epochs": 30}},
}
RSS_LIMIT_GIB = 6.0
MODELS = ("baseline", "frozen", "unfrozen")


def run_experiment(name: str, quick: bool, workdir: Path) -> dict:
    """Run every stage of one experiment; per-stage seconds and RSS, and the test metrics."""
    real = not quick and (common.LEEDS if name.startswith("leeds") else
                          common.CALTECH).is_dir()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as temp:
        repo = pipeline.make_repo(Path(temp) / "repo", workdir,
                                  EXPERIMENTS[name] if real else {}, tiny=not real)
        for stage in pipeline.stages(repo)[:None if real else 1]:
            seconds, rss = pipeline.run(["dvc", "repro", "--single-item", stage], repo)
            timing = repo / "metrics" / "timing" / f"{stage}.json"
            rows.append({"stage": stage, "seconds": seconds, "peak_rss_gib": rss,
                         **({"timing": json.loads(timing.read_text())} if timing.is_file()
                            else {})})
            print(f"  {stage}: {seconds:.0f} s, {rss:.2f} GiB", flush=True)
        metrics = {}
        for stage in ("train_frozen", "train_unfrozen", "evaluate", "gradcam_segment"):
            path = repo / "metrics" / "details" / f"{stage}.json"  # all of it, CIs included
            if path.is_file():
                metrics[stage] = json.loads(path.read_text())
    return {"real": real, "stages": rows, "total_s": sum(r["seconds"] for r in rows),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rows), "metrics": metrics}


def model_text(name: str) -> str:
    """The backbone and weights an experiment runs with, for the conditions column."""
    model = EXPERIMENTS[name].get("model", {})
    if not model:
        return "efficientnet_lite0, ImageNet weights"
    return f"{model.get('backbone', 'efficientnet_lite0')}, weights {model.get('weights')}"


def test_table(evaluate: dict) -> dict[str, dict[str, float]]:
    keys = ("precision_at_1", "precision_at_5", "map", "map_at_r", "accuracy", "roc_auc")
    return {model: {k: evaluate[model][k] for k in keys if k in evaluate[model]}
            for model in MODELS if model in evaluate}


def result(row: int, name: str, quick: bool, workdir: Path, what: str, target: str,
           check) -> common.Result:
    """One row: run the experiment, then ``check(evaluate metrics, run) -> (passed, figure)``."""
    run = run_experiment(name, quick, workdir)
    evaluate = run["metrics"].get("evaluate", {})
    # Quick mode runs one stage: the metrics files in the copy are the committed ones, not its.
    measured = evaluate if run["real"] else {}
    passed, figure = check(measured, run) if measured else (None, "quick: first stage only")
    figure += (f"; {run['total_s'] / 60:.1f} min in all, peak RSS "
               f"{run['peak_rss_gib']:.2f} GiB")
    return common.Result(
        row=row, name=name, what=what,
        conditions=(f"`{name}` overrides of the README on params.yaml's defaults "
                    f"({model_text(name)}), CPU, cold image cache" if run["real"]
                    else "quick mode: the first stage only, tiny generated sample"),
        figure=figure, target=target,
        passed=(passed and run["peak_rss_gib"] <= RSS_LIMIT_GIB) if measured else None,
        details={**run, "test": test_table(measured)})


def run(quick: bool, workdir: Path) -> common.Result:
    def check(evaluate: dict, run: dict) -> tuple[bool, str]:
        base, tuned = evaluate["baseline"], evaluate["unfrozen"]
        gap = tuned["map"] - base["map"]
        separate = tuned["map_ci_low"] > base["map_ci_high"]
        ok = (tuned["precision_at_1"] >= 0.93 and gap >= 0.15 and separate
              and run["total_s"] <= 30 * 60)
        return ok, (f"fine-tuned P@1 {tuned['precision_at_1']:.3f}; mAP {base['map']:.3f} → "
                    f"{tuned['map']:.3f} (CIs {'do not overlap' if separate else 'overlap'})")

    return result(8, "caltech", quick, workdir,
                  "Caltech-101 stratified, whole pipeline (`dvc repro --single-item`, in order)",
                  "P@1 ≥ 0.93; mAP ≥ baseline + 0.15, CIs apart; ≤ 30 min; RSS ≤ 6 GiB", check)
