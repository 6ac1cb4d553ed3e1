"""Row 8: the whole pipeline on Caltech-101 (ResNet-18 at 160 px, CPU): time and memory per stage.

A throw-away copy of the repository with params.yaml's defaults except data.source: folder,
data.root: the Caltech-101 folder, model.backbone: resnet18, data.image_size: 160 (and
model.weights: none: no ImageNet weights can be downloaded here). Each stage runs as
`dvc repro --single-item <stage>` in dvc.yaml's order, so the time includes DVC's own work;
peak RSS is the largest of the stage's processes. The decoded-image cache starts cold.
--quick runs only the first stage, on the tiny generated sample with the tests' params.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import pipeline

# Fewer epochs than params.yaml's 20 / 15, so that the row fits a working session; the stages'
# seconds per epoch (metrics/timing) scale it to any number of epochs.
EPOCHS = {"train_frozen": 5, "train_unfrozen": 3}
CALTECH_PARAMS = {"data": {"source": "folder", "root": str(common.CALTECH), "image_size": 160},
                  "model": {"backbone": "resnet18", "weights": "none"},
                  **{stage: {"epochs": epochs} for stage, epochs in EPOCHS.items()}}
RSS_LIMIT_GIB = 6.0


def run(quick: bool, workdir: Path) -> common.Result:
    real = not quick and common.caltech_available()
    rows, failed = [], None
    with tempfile.TemporaryDirectory(dir=workdir) as temp:
        repo = pipeline.make_repo(Path(temp) / "repo", workdir,
                                  CALTECH_PARAMS if real else {}, tiny=not real)
        for stage in pipeline.stages(repo)[:None if real else 1]:
            try:
                seconds, rss = pipeline.run(["dvc", "repro", "--single-item", stage], repo)
            except RuntimeError as error:  # later stages need this one: stop here
                failed = {"stage": stage, "error": str(error)[-1500:]}
                break
            timing = repo / "metrics" / "timing" / f"{stage}.json"
            rows.append({"stage": stage, "seconds": seconds, "peak_rss_gib": rss,
                         **({"timing": json.loads(timing.read_text())} if timing.is_file()
                            else {})})
            print(f"  {stage}: {seconds:.0f} s, {rss:.2f} GiB", flush=True)
    if failed:
        raise RuntimeError(f"stage {failed['stage']} failed after {rows}: {failed['error']}")
    total = sum(r["seconds"] for r in rows)
    peak = max(r["peak_rss_gib"] for r in rows)
    worst = max(rows, key=lambda r: r["seconds"])
    return common.Result(
        row=8, name="full_pipeline",
        what="Full pipeline, every stage (`dvc repro --single-item`, in order)",
        conditions=("Caltech-101 (9,145 images), resnet18 from scratch, 160 px, "
                    f"train_frozen {EPOCHS['train_frozen']} and train_unfrozen "
                    f"{EPOCHS['train_unfrozen']} epochs, params.yaml defaults otherwise "
                    "(precision bf16), CPU, cold image cache" if real else
                    "quick mode: the first stage only, tiny generated sample"),
        figure=f"{total / 60:.1f} min in all (longest: {worst['stage']} "
               f"{worst['seconds'] / 60:.1f} min); peak RSS {peak:.2f} GiB",
        target=f"table; peak RSS ≤ {RSS_LIMIT_GIB:g} GiB", passed=peak <= RSS_LIMIT_GIB,
        details={"stages": rows, "total_s": total, "peak_rss_gib": peak})
