"""Row 12: Leeds Butterfly (10 species, 832 images with masks), whole pipeline
(see full_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import common
from full_pipeline import result


def run(quick: bool, workdir: Path) -> common.Result:
    def check(evaluate: dict, run: dict) -> tuple[bool, str]:
        base, tuned = evaluate["baseline"]["map"], evaluate["unfrozen"]["map"]
        return tuned >= 0.95, f"mAP {base:.3f} → {tuned:.3f}"

    return result(12, "leeds", quick, workdir, "Leeds Butterfly, whole pipeline",
                  "fine-tuned mAP ≥ 0.95", check)
