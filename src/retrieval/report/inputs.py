"""What the report is built from: the stages' outputs and MLflow's runs, read into plain data.

A stage that has not run is simply absent from `Inputs` (never an error): the sections say what
is missing. Nothing here formats or judges a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval import compared, outputs
from retrieval.threshold import Threshold

MODELS = compared.MODELS  # the models evaluate.json compares, in this order
# The "before training" reference (the baseline) and the trained models, in that order.
UNTRAINED = tuple(model.name for model in compared.COMPARED_MODELS if not model.trained)
TRAINED = tuple(model.name for model in compared.COMPARED_MODELS if model.trained)
TRAIN_STAGES = ("train_frozen", "train_unfrozen")
# The pipeline's stages in dvc.yaml order: the order stages are listed in (a stage not named
# here comes after them; its metrics are read all the same).
STAGES = ("prepare", "split", "verify_normalization", *TRAIN_STAGES, "evaluate", "embed_viz",
          "gradcam_segment")

# The experiment comparison: MLflow metric key -> its column in `experiments_table`.
EXPERIMENT_METRICS = {"evaluate.frozen.map": "frozen mAP", "evaluate.unfrozen.map": "unfrozen mAP",
                      "evaluate.unfrozen.precision_at_1": "unfrozen P@1",
                      "evaluate.unfrozen.roc_auc": "unfrozen ROC AUC"}
# The headline metric: runs are ranked by it, and observations say what changed it.
HEADLINE_KEY = "evaluate.unfrozen.map"
HEADLINE = EXPERIMENT_METRICS[HEADLINE_KEY]
HEADLINE_NAME = "fine-tuned test mAP"  # as a sentence says it
# The columns of `experiments_table` that are not parameters.
EXPERIMENT_FIXED_COLUMNS = ("run", "commit", *EXPERIMENT_METRICS.values())
PARAMETERS_NOT_SHOWN = "parameters_not_shown"  # key of `experiments_table(...).attrs`


@dataclass(frozen=True)
class RunInfo:
    git_commit: str
    dvc_experiment: str
    run_ids: Mapping[str, str]  # stage -> MLflow run id ("pipeline": the parent run)
    durations: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds of its run


@dataclass
class Inputs:
    """Everything the report is built from. A stage that has not run has no key anywhere."""

    metrics: dict[str, dict] = field(default_factory=dict)  # stage -> its metrics JSON
    figures: dict[str, Path] = field(default_factory=dict)  # "stage/name" -> PNG
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)  # train stage -> history
    class_counts: pd.DataFrame | None = None  # label, train, val, test
    excluded: pd.DataFrame | None = None  # path, reason
    params: dict[str, Any] = field(default_factory=dict)  # flattened: "train.lr_factor" -> 0.5
    run: RunInfo = field(default_factory=lambda: RunInfo("unknown", "workspace", {}))
    experiments: pd.DataFrame | None = None  # `experiments_table`
    # evaluate's decision threshold for the searched model's checkpoint, as `retrieval compare`
    # and the search page find it (``threshold.of_evaluate``); None: not looked up.
    threshold: Threshold | None = None


def load_inputs(metrics_dir: str | Path, plots_dir: str | Path, params: dict[str, Any],
                run: RunInfo, experiments: pd.DataFrame | None = None,
                excluded_csv: str | Path | None = None,
                threshold: Threshold | None = None) -> Inputs:
    """Read every `<metrics_dir>/<stage>.json` (the stages' details, `paths.DETAILS`, in
    pipeline order), every PNG under `<plots_dir>/<stage>/`, the training histories and the
    class counts; whatever does not exist is simply absent."""
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    metrics = {path.stem: outputs.read_json(path)
               for path in sorted(metrics_dir.glob("*.json"), key=lambda p: stage_order(p.stem))}
    figures = {path.relative_to(plots_dir).with_suffix("").as_posix(): path
               for path in sorted(plots_dir.glob("*/**/*.png"))}
    histories = {stage: outputs.read_table(plots_dir / stage / "history.csv", ("epoch",))
                 for stage in TRAIN_STAGES if (plots_dir / stage / "history.csv").is_file()}
    counts_csv = plots_dir / "split" / "class_counts.csv"
    counts = (outputs.read_table(counts_csv, (), keep_default_na=False)
              if counts_csv.is_file() else None)
    excluded = None
    if excluded_csv is not None and Path(excluded_csv).is_file():
        excluded = outputs.read_table(excluded_csv, ("path", "reason"), keep_default_na=False,
                                      dtype=str)
    return Inputs(metrics, figures, histories, counts, excluded, dict(params), run, experiments,
                  threshold)


def stage_order(stage: str) -> tuple[int, str]:
    """Sort key: the pipeline's stages in dvc.yaml order, then any other by name."""
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def lr_changes(history: pd.DataFrame) -> list[tuple[int, float, float]]:
    """(epoch, lr before, lr after) for every epoch whose learning rate differs from the last."""
    if "lr" not in history or history.empty:
        return []
    lr = history["lr"].astype(float).to_numpy()
    epochs = history["epoch"].astype(int).to_numpy()
    return [(int(epochs[i]), float(lr[i - 1]), float(lr[i])) for i in range(1, len(lr))
            if lr[i] != lr[i - 1]]


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Runs on other data are not comparable: the experiments table keeps those that match these.
DATASET_PARAMS = ("data.source", "data.root", "data.masks")


def on_same_data(runs: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
                 ) -> list[Mapping[str, Any]]:
    """The runs whose dataset params (``DATASET_PARAMS``) equal this report's ``params``
    (flattened); a run that did not log one of them counts as the params.yaml value."""
    def dataset(values: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(values.get(k, params.get(k, ""))) for k in DATASET_PARAMS)

    return [r for r in runs if dataset(r.get("params") or {}) == dataset(params)]


def experiments_table(runs: Sequence[Mapping[str, Any]], current_run_id: str | None = None,
                      max_rows: int = 20, max_params: int = 6) -> pd.DataFrame:
    """One row per pipeline run with test metrics (from MLflow parent runs, newest first): run,
    commit, the params that differ between them (`lr` first, at most `max_params`; how many
    more differ is `table.attrs[PARAMETERS_NOT_SHOWN]`) and the `EXPERIMENT_METRICS` columns,
    best headline metric first."""
    runs = [r for r in runs if HEADLINE_KEY in (r.get("metrics") or {})][:max_rows]
    if not runs:
        return pd.DataFrame(columns=list(EXPERIMENT_FIXED_COLUMNS))
    keys = sorted({k for r in runs for k in (r.get("params") or {})})
    varying = [k for k in keys if len({str((r.get("params") or {}).get(k)) for r in runs}) > 1]
    varying = sorted(varying, key=lambda k: (k != "lr", k))
    not_shown = len(varying[max_params:])
    varying = varying[:max_params]
    rows = []
    for r in runs:
        name = r.get("dvc_experiment") or r.get("name") or r.get("run_id", "")
        if r.get("run_id") == current_run_id:
            name = f"{name} (this report)"
        rows.append({"run": name, "commit": str(r.get("git_commit", ""))[:8],
                     **{k: _short(str((r.get("params") or {}).get(k, ""))) for k in varying},
                     **{label: r["metrics"].get(key) for key, label in EXPERIMENT_METRICS.items()}})
    table = pd.DataFrame(rows)
    # Runs may differ in more parameters than the table shows: then no observation may claim
    # that two runs "differ only in" one of the shown ones.
    table.attrs[PARAMETERS_NOT_SHOWN] = not_shown
    return table.sort_values(HEADLINE, ascending=False, kind="stable").reset_index(drop=True)
