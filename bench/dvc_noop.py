"""Row 7: `dvc repro` with nothing changed vs `dvc status`, on the tiny sample pipeline.

After one full `dvc repro` of the tiny pipeline (the end-to-end tests' params) in a throw-away
copy of the repository, both commands run alternately; a no-op repro should cost little more
than the status check it starts with (no stage re-runs, no output re-hashed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import pipeline


def run(quick: bool, workdir: Path) -> common.Result:
    rounds, targets = (1, ["prepare"]) if quick else (3, [])  # quick: the first stage only
    with tempfile.TemporaryDirectory(dir=workdir) as temp:
        repo = pipeline.make_repo(Path(temp) / "repo", workdir, {}, tiny=True)
        first, _ = pipeline.run(["dvc", "repro", *targets], repo)
        times = common.interleaved({
            "status": lambda: pipeline.run(["dvc", "status", *targets], repo)[0],
            "repro": lambda: pipeline.run(["dvc", "repro", *targets], repo)[0],
        }, rounds, warmup=False)
    ratio = common.best_ratio(times["repro"], times["status"])
    repro, status = min(times["repro"]), min(times["status"])
    return common.Result(
        row=7, name="dvc_noop", what="`dvc repro` with nothing changed ÷ `dvc status`",
        conditions=(f"tiny sample pipeline (the tests' params; first repro {first:.0f} s), "
                    f"best of {rounds} alternating runs" if not quick else
                    "quick mode: the first stage only"),
        figure=f"{ratio:.2f} ({repro:.1f} s / {status:.1f} s)", target="≤ 2",
        passed=ratio <= 2,
        details={"ratio": ratio, "times_s": times, "first_repro_s": first})
