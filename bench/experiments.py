"""The README's real-data tables from the DVC experiments of a repository.

    dvc exp show --json > exps.json
    python bench/experiments.py exps.json caltech caltech-disjoint ...

For each named experiment: test P@1, P@5, mAP, MAP@R, pair accuracy and ROC AUC of baseline /
frozen / fine-tuned with their 95% bootstrap CIs (metrics/details/evaluate.json in the
experiment's commit: `dvc exp show` carries only the headline metrics), then the stages' own
wall times: start to end of each stage's MLflow run (the project's store, so run it in the
repository that ran them). Nothing is computed here: it prints what the runs measured.
"""

from __future__ import annotations

import json
import subprocess
import sys

from retrieval import paths, tracking
from retrieval.report.inputs import stage_order

MODELS = ("baseline", "frozen", "unfrozen")
METRICS = {"precision_at_1": "P@1", "precision_at_5": "P@5", "map": "mAP", "map_at_r": "MAP@R",
           "accuracy": "pair acc.", "roc_auc": "ROC AUC"}


def experiments(show: list[dict]) -> dict[str, str]:
    """{experiment name: its commit} from `dvc exp show --json`."""
    found = {}
    for commit in show:
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev.get("name") and rev.get("data"):
                    found[rev["name"]] = rev.get("rev") or rev["data"]["rev"]
    return found


def evaluate_details(commit: str) -> dict:
    """evaluate's details (every score with its CIs) as the experiment's commit holds them."""
    shown = subprocess.run(["git", "show", f"{commit}:{paths.details('evaluate').as_posix()}"],
                           capture_output=True, text=True, check=True)
    return json.loads(shown.stdout)


def cell(scores: dict, key: str) -> str:
    low, high = scores.get(f"{key}_ci_low"), scores.get(f"{key}_ci_high")
    value = f"{scores[key]:.3f}"
    return f"{value} [{low:.3f}, {high:.3f}]" if low is not None else value


def table(name: str, commit: str) -> str:
    evaluate = evaluate_details(commit)
    lines = [f"`{name}` | " + " | ".join(METRICS.values()), "|---" * (len(METRICS) + 1) + "|"]
    lines[0] = "| " + lines[0] + " |"
    for model in MODELS:
        lines.append(f"| {model} | " + " | ".join(cell(evaluate[model], k) for k in METRICS)
                     + " |")
    durations = tracking.experiment_durations(name)
    times = [f"{stage} {durations[stage] / 60:.1f}" for stage in sorted(durations,
                                                                        key=stage_order)]
    total = sum(durations.values())
    return "\n".join(lines) + (f"\n\nMinutes per stage (MLflow runs; {total / 60:.1f} in all): "
                               + ", ".join(times) if times else "")


def main() -> None:
    show = json.loads(open(sys.argv[1]).read())
    found = experiments(show)
    for name in sys.argv[2:]:
        print(table(name, found[name]) if name in found else f"{name}: not found", end="\n\n")


if __name__ == "__main__":
    main()
