"""Interrupted training (issue #8): Ctrl-C and SIGKILL mid-epoch, then `dvc repro` resumes.

One sequence in the trained_repo (train_unfrozen, 3 epochs, CPU, fixed seed):
  reference  an uninterrupted run;
  Ctrl-C     SIGINT to `dvc repro`'s process group after epoch 1's checkpoint: a clean stop,
             the checkpoint kept and loadable, no metrics written;
  SIGKILL    `dvc repro` again resumes from epoch 1; killed (the whole process group, as an
             OOM-killer or a closed laptop would) after epoch 2's checkpoint, mid-epoch 3;
  finish     `dvc repro` resumes from epoch 2 and ends with the reference's metrics, history
             (timing columns aside) and weights, bit for bit; the checkpoint is then deleted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from retrieval import models, outputs
from retrieval.config import ModelConfig
from tests.conftest import BIN, run

STAGE = "train_unfrozen"
OUTPUTS = ("metrics/train_unfrozen.json", "metrics/timing/train_unfrozen.json",
           "models/train_unfrozen/best.pt", "plots/train_unfrozen/history.csv",
           "metrics/details/train_unfrozen.json")


def environment() -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}  # the log survives SIGKILL
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "RETRIEVAL_CACHE_DIR"):
        env.pop(name, None)
    return env


def resume_files(repo: Path) -> list[Path]:
    return sorted((repo / ".cache" / "resume").glob(f"{STAGE}-*.pt"))


def checkpoint_epoch(repo: Path) -> int:
    files = resume_files(repo)
    if not files:
        return 0
    try:
        return int(torch.load(files[0], map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError):  # replaced while being read
        return 0


def interrupt_after(repo: Path, epoch: int, sig: signal.Signals, log: Path,
                    timeout: float = 300) -> tuple[int, str]:
    """Run `dvc repro`; send `sig` to its process group once `epoch` is checkpointed."""
    with open(log, "w") as stream:
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=environment(),
                                   stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while checkpoint_epoch(repo) < epoch:
                assert process.poll() is None, f"finished before the interrupt:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.05)
            os.killpg(process.pid, sig)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return code, log.read_text()


def comparable(repo: Path) -> tuple[dict, pd.DataFrame, dict]:
    metrics = json.loads((repo / OUTPUTS[4]).read_text())  # all of them, not the headline
    history = pd.read_csv(repo / OUTPUTS[3]).drop(columns=["epoch_seconds"])
    weights = torch.load(repo / OUTPUTS[2], weights_only=True)["state_dict"]
    return metrics, history, weights


def assert_no_half_written_outputs(repo: Path) -> None:
    """Whatever exists is complete: metrics parse, models load; temporary files are hidden."""
    for path in (repo / "metrics").rglob("*.json"):
        json.loads(path.read_text())
    for path in (repo / "models").rglob("*.pt"):
        if not path.name.startswith("."):
            torch.load(path, weights_only=True)
    assert not (repo / OUTPUTS[0]).exists()


@pytest.mark.parametrize("write", ["json", "csv", "checkpoint"])
def test_a_write_interrupted_midway_leaves_the_previous_file_and_no_debris(tmp_path, write):
    """Outputs go through outputs.atomic_path: interrupted, the old file stays whole."""
    path = tmp_path / f"out.{write}"
    net = models.EmbeddingNet(ModelConfig(weights="none",
                                          backbone="cifar_resnet", cifar_n=1, hidden_dim=4,
                                          embedding_dim=2))
    writers = {"json": lambda: outputs.write_json(path, {"a": 1}),
               "csv": lambda: outputs.write_csv(path, pd.DataFrame({"a": [1]})),
               "checkpoint": lambda: models.save_checkpoint(path, net, {"epoch": 1})}
    writers[write]()
    before = path.read_bytes()
    original = outputs.os.replace

    def interrupted(*args):
        raise KeyboardInterrupt  # arrives after the temporary file is written, before the rename

    outputs.os.replace = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            writers[write]()
    finally:
        outputs.os.replace = original
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.e2e
def test_ctrl_c_and_sigkill_mid_epoch_then_repro_resumes_to_the_same_result(trained_repo,
                                                                           tmp_path):
    repo = trained_repo
    run(["python", f"stages/{STAGE}.py"], cwd=repo)  # the uninterrupted reference
    reference = comparable(repo)
    assert not resume_files(repo), "a finished fit must delete its resume checkpoint"
    for name in OUTPUTS:
        (repo / name).unlink()

    code, log = interrupt_after(repo, 1, signal.SIGINT, tmp_path / "ctrl_c.log")
    assert code != 0, log
    assert "interrupted: outputs written so far are complete" in log, log[-3000:]
    assert checkpoint_epoch(repo) == 1  # the last good checkpoint, readable with weights_only
    state = torch.load(resume_files(repo)[0], weights_only=True)
    assert {"model", "optimizer", "scheduler", "history", "best", "fingerprint"} <= set(state)
    assert_no_half_written_outputs(repo)

    code, log = interrupt_after(repo, 2, signal.SIGKILL, tmp_path / "kill.log")
    assert code == -signal.SIGKILL
    assert "resuming from the checkpoint of epoch 1" in log, log[-3000:]
    assert checkpoint_epoch(repo) == 2
    assert_no_half_written_outputs(repo)

    result = run(["dvc", "repro"], cwd=repo)
    assert "resuming from the checkpoint of epoch 2" in result.stdout + result.stderr
    assert f"Running stage '{STAGE}'" in result.stdout
    assert "Running stage 'train_frozen'" not in result.stdout
    metrics, history, weights = comparable(repo)
    assert metrics == reference[0]
    pd.testing.assert_frame_equal(history, reference[1])
    assert weights.keys() == reference[2].keys()
    assert all(torch.equal(weights[k], reference[2][k]) for k in weights)
    assert not resume_files(repo)
    timing = json.loads((repo / OUTPUTS[1]).read_text())
    assert timing["resumed_from_epoch"] == 2
    assert run(["dvc", "status"], cwd=repo).stdout.strip().endswith("up to date.")
