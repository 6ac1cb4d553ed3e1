"""torchrun + DistributedDataParallel: 2 CPU processes with gloo on the tiny pipeline."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import BIN, run

pytestmark = pytest.mark.e2e


def test_train_unfrozen_runs_as_two_process_ddp(pipeline_repo, tmp_path):
    repo = tmp_path / "ddp"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    (repo / "metrics" / "train_unfrozen.json").unlink()
    result = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
                  "stages/train_unfrozen.py"], cwd=repo, env={"OMP_NUM_THREADS": "1"})
    metrics = json.loads((repo / "metrics" / "train_unfrozen.json").read_text())
    assert 0 <= metrics["best_epoch"] <= 2
    # Rank 0 alone writes: one history with epochs 0..2, one checkpoint.
    history = (repo / "plots" / "train_unfrozen" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3
    assert (repo / "models" / "train_unfrozen" / "best.pt").is_file()
    assert "Traceback" not in result.stderr
