"""DistributedDataParallel: 2 CPU processes with gloo, by hand and from the pipeline (issue 18).

The launcher (retrieval.launch), with a stand-in stage whose two ranks do what the test asks:
  success    rank 0's output reaches the user, rank 1's does not; each rank gets
             cpu_count / 2 threads;
  errors     a one-line error of rank 0, of rank 1 or of both reaches the user once, with the
             worker's exit code (2), no torchrun traceback;
  signals    SIGTERM or SIGINT to the launcher, or a SIGKILL of the stand-in dvc's whole process
             group (the workers run in their own session), stops both workers within seconds.
End to end (tiny pipeline): `torchrun --nproc_per_node=2 stages/train_unfrozen.py` by hand, and
`dvc repro train_unfrozen` with train_unfrozen.processes: 2, interrupted by a SIGTERM to dvc
alone after a checkpoint, then resumed to the end with the same outputs as one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from retrieval import config, launch, lifeline
from retrieval.outputs import UserError
from tests.conftest import BIN, REPO, run

INTERRUPTED = "interrupted: outputs written so far are complete; re-run to continue"
GONE_WITHIN_S = 15.0

needs_two_cores = pytest.mark.skipif(launch.cpu_count() < 2, reason="2 CPU processes")

# A stand-in stage: launches itself as 2 workers, as stages/train_unfrozen.py does.
STAGE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from retrieval import launch, outputs

    def main():
        code = launch.run_workers(__file__, 2, "stand_in.processes", "cpu")
        if code is not None:
            sys.exit(code)
        folder, mode = Path(sys.argv[1]), sys.argv[2]
        rank = int(os.environ["RANK"])
        (folder / f"pid{rank}").write_text(str(os.getpid()))
        print(f"rank {rank} of {os.environ['WORLD_SIZE']}, "
              f"{os.environ['OMP_NUM_THREADS']} threads", flush=True)
        if mode in (f"fail{rank}", "both"):
            time.sleep(0.5 if mode == "both" and rank == 0 else 0)  # "both": rank 1 first
            raise outputs.UserError(f"{mode}: rank {rank} refuses")
        while mode != "ok":  # until stopped
            time.sleep(0.01)

    outputs.run_main(main)
""")


def python_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **extra}
    for name in ("DVC_STAGE", "OMP_NUM_THREADS", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def stand_in(tmp_path: Path) -> list[str]:
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    return [sys.executable, str(tmp_path / "stage.py"), str(tmp_path)]


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.05)


def worker_stats(tmp_path: Path) -> dict[int, int]:
    """The two workers, pid -> start ticks, once both have started."""
    wait_for(lambda: all((tmp_path / f"pid{r}").exists() for r in (0, 1)), 60, "workers start")
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    return {pid: lifeline.proc_stat(pid).start_ticks for pid in pids}


def running(processes: dict[int, int]) -> list[int]:
    return [pid for pid, ticks in processes.items() if lifeline.is_running(pid, ticks)]


# --- the launcher ------------------------------------------------------------------------------

def test_one_process_or_a_worker_trains_itself(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.run_workers("x.py", 1, "k", "cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun already: never a second launch
    assert launch.run_workers("x.py", 2, "k", "cpu") is None


@pytest.mark.parametrize("processes", [0, -1, config.MAX_PROCESSES + 1])
def test_processes_out_of_range_is_refused_in_one_line(processes):
    with pytest.raises(config.ParamsError, match=r"train_unfrozen.processes \(-?\d+\) must be "
                       rf"in \[1, {config.MAX_PROCESSES}\]"):
        config.params_from_dict({"train_unfrozen": {"processes": processes}})


def test_threads_are_shared_out_and_capacity_is_checked():
    assert launch.threads_per_process(2, cpus=2) == 1
    assert launch.threads_per_process(2, cpus=16) == 8
    assert launch.threads_per_process(4, cpus=2) == 1
    with pytest.raises(UserError, match=r"t.processes \(\d+\) is more than the \d+ CPU cores"):
        launch._check_capacity(launch.cpu_count() + 1, "t.processes", "cpu")
    with pytest.raises(UserError, match="one GPU a process"):
        launch._check_capacity(2, "t.processes", "cuda:0")


@needs_two_cores
def test_rank_0_alone_writes_and_each_rank_gets_its_share_of_the_cores(tmp_path):
    result = subprocess.run([*stand_in(tmp_path), "ok"], env=python_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    threads = launch.threads_per_process(2)
    assert result.stdout.splitlines() == [f"rank 0 of 2, {threads} threads"]
    assert result.stderr == ""


@needs_two_cores
@pytest.mark.parametrize("mode", ["fail0", "fail1", "both"])
def test_a_workers_one_line_error_reaches_the_user_once(tmp_path, mode):
    result = subprocess.run([*stand_in(tmp_path), mode], env=python_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error (")]
    assert len(errors) == 1 and f"{mode}: rank" in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@needs_two_cores
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_to_the_launcher_stops_the_workers(tmp_path, signum):
    launcher = subprocess.Popen([*stand_in(tmp_path), "loop"], env=python_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = worker_stats(tmp_path)
        launcher.send_signal(signum)
        _, stderr = launcher.communicate(timeout=60)
        wait_for(lambda: not running(workers), GONE_WITHIN_S, "the workers stop")
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode == 130, stderr
    assert stderr.strip().splitlines() == [INTERRUPTED], stderr


# A stand-in dvc: launches the stage with DVC_STAGE in the command's environment only.
DVC_SCRIPT = "import os, subprocess, sys\n" \
    "subprocess.Popen(sys.argv[1:], env={**os.environ, 'DVC_STAGE': 'stand_in'}).wait()\n"


@needs_two_cores
def test_sigkill_of_dvcs_process_group_still_stops_the_workers(tmp_path):
    """The workers run in their own session (torchrun's): the killed group does not hold
    them, their own watch of the dead dvc stops them."""
    (tmp_path / "dvc.py").write_text(DVC_SCRIPT)
    dvc = subprocess.Popen([sys.executable, str(tmp_path / "dvc.py"), *stand_in(tmp_path),
                            "loop"], env=python_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: dict[int, int] = {}
    try:
        workers = worker_stats(tmp_path)
        os.killpg(dvc.pid, signal.SIGKILL)
        dvc.wait(timeout=10)
        wait_for(lambda: not running(workers), GONE_WITHIN_S, "the orphaned workers stop")
    finally:
        for pid in running(workers):
            os.kill(pid, signal.SIGKILL)


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.e2e
def test_train_unfrozen_runs_as_two_process_ddp(pipeline_repo, tmp_path):
    repo = tmp_path / "ddp"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    (repo / "metrics" / "details" / "train_unfrozen.json").unlink()
    result = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
                  "stages/train_unfrozen.py"], cwd=repo, env={"OMP_NUM_THREADS": "1"})
    metrics = json.loads((repo / "metrics" / "details" / "train_unfrozen.json").read_text())
    assert 0 <= metrics["best_epoch"] <= 2
    # Rank 0 alone writes: one history with epochs 0..2, one checkpoint.
    history = (repo / "plots" / "train_unfrozen" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3
    assert (repo / "models" / "train_unfrozen" / "best.pt").is_file()
    assert "Traceback" not in result.stderr
    assert "DistributedDataParallel: 2 processes (gloo on cpu" in result.stderr


def resume_epoch(repo: Path) -> int:
    import torch

    files = sorted((repo / ".cache" / "resume").glob("train_unfrozen-*.pt"))
    try:
        return int(torch.load(files[0], map_location="cpu", weights_only=True)["epoch"])
    except (IndexError, OSError, RuntimeError, EOFError):  # none yet, or being replaced
        return 0


def stage_outputs(repo: Path) -> list[str]:
    return sorted(str(path.relative_to(repo)) for folder in ("metrics", "plots", "models")
                  for path in (repo / folder).rglob("*")
                  if "train_unfrozen" in str(path.relative_to(repo)) and path.is_file())


@pytest.mark.e2e
@needs_two_cores
def test_dvc_repro_trains_with_two_processes_and_a_sigterm_to_dvc_stops_them(
        pipeline_repo, tmp_path):
    repo = tmp_path / "ddp_dvc"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    one_process = stage_outputs(repo)
    metrics_before = json.loads((repo / "metrics" / "details" / "train_unfrozen.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_unfrozen"].update(processes=2, epochs=3)  # room to interrupt after epoch 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "RETRIEVAL_CACHE_DIR", "OMP_NUM_THREADS"):
        env.pop(name, None)

    # SIGTERM to dvc alone once epoch 1 is checkpointed: every process of the stage stops.
    with open(tmp_path / "interrupted.log", "w") as log:
        dvc = subprocess.Popen(["dvc", "repro", "train_unfrozen"], cwd=repo, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: resume_epoch(repo) >= 1 or dvc.poll() is not None, 300, "epoch 1")
        assert dvc.poll() is None, (tmp_path / "interrupted.log").read_text()
        stage = {pid: lifeline.proc_stat(pid).start_ticks
                 for pid in _descendants(dvc.pid)}
        assert len(stage) >= 3, stage  # the launcher and its two workers (and a shell)
        dvc.send_signal(signal.SIGTERM)
        dvc.wait(timeout=60)
        wait_for(lambda: not running(stage), GONE_WITHIN_S, "the stage's processes stop")
    finally:
        if dvc.poll() is None:
            os.killpg(dvc.pid, signal.SIGKILL)
            dvc.wait()
    log = (tmp_path / "interrupted.log").read_text()
    assert "DistributedDataParallel: 2 processes (gloo on cpu" in log, log
    assert "Traceback" not in log, log
    assert resume_epoch(repo) >= 1, log

    # The re-run resumes under 2 processes and ends with the one-process run's outputs.
    result = run(["dvc", "repro", "train_unfrozen"], cwd=repo)
    assert "DistributedDataParallel: 2 processes (gloo on cpu" in result.stderr
    assert "resuming from the checkpoint of epoch" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert stage_outputs(repo) == one_process
    metrics = json.loads((repo / "metrics" / "details" / "train_unfrozen.json").read_text())
    assert sorted(metrics) == sorted(metrics_before) and 0 <= metrics["best_epoch"] <= 3
    history = (repo / "plots" / "train_unfrozen" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4
    assert not (repo / ".cache" / "resume").exists() or not list(
        (repo / ".cache" / "resume").glob("train_unfrozen-*.pt"))
    assert "train_unfrozen" not in run(["dvc", "status", "train_unfrozen"], cwd=repo).stdout


def _descendants(root: int) -> list[int]:
    stats = {int(name): lifeline.proc_stat(int(name))
             for name in os.listdir("/proc") if name.isdigit()}
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, stat in stats.items() if stat and stat.ppid == parent]
        found += children
        todo += children
    return [pid for pid in found if lifeline.proc_stat(pid) is not None]
