"""Row 11: Caltech-101 class-disjoint (train, val and test on disjoint classes): retrieval of
classes the model never saw, the deep-metric-learning protocol (see full_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import common
from full_pipeline import result


def run(quick: bool, workdir: Path) -> common.Result:
    def check(evaluate: dict, run: dict) -> tuple[bool, str]:
        base = evaluate["baseline"]["precision_at_1"]
        tuned = evaluate["unfrozen"]["precision_at_1"]
        return tuned >= base + 0.05, f"unseen-class P@1 {base:.3f} → {tuned:.3f}"

    return result(11, "caltech_disjoint", quick, workdir,
                  "Caltech-101 class-disjoint, whole pipeline", "P@1 ≥ baseline + 0.05", check)
