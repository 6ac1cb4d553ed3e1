"""Interruption of DVC itself (issue 16): `dvc repro` killed alone, the stage notices and stops.

A cancelled CI job, `kill PID` or `timeout --foreground` signal the dvc process alone, not its
process group. Without retrieval.lifeline the stage ran on as an orphan and a re-run raced it. Now:

  launcher death  a stage under DVC (DVC_STAGE set) whose dvc dies, by SIGTERM or SIGKILL,
                  directly its parent or behind a shell, stops within a second the way Ctrl-C
                  stops it: one "interrupted: ..." line, exit 130, every file whole, no temp
                  files; a plain run (no DVC_STAGE) is never watched;
  SIGTERM         to the stage itself: the same clean stop, which a second SIGTERM (the kernel's
                  parent-death signal and the watcher both send one) does not break;
  end to end      in the trained_repo, `dvc repro` is sent SIGTERM or SIGKILL alone after epoch 1
                  of train_unfrozen is checkpointed: the stage is gone within seconds, its
                  checkpoint is kept, no metrics are written, the MLflow store is readable with
                  no run left RUNNING, and a re-run resumes from epoch 1 and ends with the
                  uninterrupted run's metrics, history and weights, `dvc status` clean.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from retrieval import lifeline
from tests.conftest import REPO, run
from tests.reliability.conftest import run_script
from tests.reliability.test_interrupt import (
    OUTPUTS,
    STAGE,
    assert_no_half_written_outputs,
    checkpoint_epoch,
    comparable,
    environment,
    resume_files,
)

INTERRUPTED = "interrupted: outputs written so far are complete; re-run to continue"
GONE_WITHIN_S = 10.0  # the watcher polls every 0.25 s; the rest is the stage's own clean-up

# A stand-in stage: through outputs.run_main, it rewrites a JSON file atomically in a loop (a
# stop may land mid-write) after telling the test its pid.
STAGE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from retrieval import outputs

    def main():
        folder = Path(sys.argv[1])
        (folder / "pid").write_text(str(os.getpid()))
        count = 0
        while True:
            outputs.write_json(folder / "state.json", {"count": count})
            count += 1
            time.sleep(0.005)

    outputs.run_main(main)
""")

# A stand-in dvc: launches the stage command with DVC_STAGE in the command's environment only.
LAUNCHER_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    stage_env = {**os.environ, "DVC_STAGE": "stand_in"}
    subprocess.Popen(sys.argv[1:], env=stage_env)
    sys.stdin.read()  # until the test kills us
""")


@pytest.fixture(autouse=True)
def sigterm_handler_restored():
    """lifeline.watch (via run_main) installs a SIGTERM handler: not for the rest of pytest."""
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


def python_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **extra}
    env.pop("DVC_STAGE", None)
    return env


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.05)


def running(processes: dict[int, int]) -> dict[int, int]:
    return {pid: ticks for pid, ticks in processes.items() if lifeline.is_running(pid, ticks)}


def descendants(root: int) -> dict[int, int]:
    """Every process below `root`, pid -> start ticks (what names it even once reused)."""
    stats = {int(name): lifeline.proc_stat(int(name))
             for name in os.listdir("/proc") if name.isdigit()}
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, stat in stats.items():
            if stat is not None and stat.ppid == parent and pid not in found:
                found[pid] = stat.start_ticks
                todo.append(pid)
    return found


def debris(folder: Path) -> list[Path]:
    """Temporary files of atomic writes that a clean stop must not leave."""
    return [path for pattern in (".*.tmp", ".*.partial-*") for path in folder.rglob(pattern)
            if ".dvc" not in path.parts and ".git" not in path.parts]


def assert_interrupted_line(stderr: str) -> None:
    """The clean stop's one line, no traceback."""
    assert stderr.strip().splitlines() == [INTERRUPTED], stderr


# --- launcher death: a stand-in dvc that dies -------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
@pytest.mark.parametrize("through", ["exec", "shell"], ids=["dvc-parent", "shell-between"])
def test_a_stage_stops_cleanly_once_the_dvc_that_launched_it_dies(tmp_path, through, signum):
    command = [sys.executable, str(tmp_path / "stage.py"), str(tmp_path)]
    if through == "shell":  # a second command keeps the shell between dvc and the stage
        command = ["sh", "-c", f"{' '.join(command)}; exit $?"]
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    (tmp_path / "launcher.py").write_text(LAUNCHER_SCRIPT)
    with open(tmp_path / "stderr", "w") as stderr:
        launcher = subprocess.Popen([sys.executable, tmp_path / "launcher.py", *command],
                                    env=python_env(), stdin=subprocess.PIPE, stderr=stderr)
    try:
        wait_for(lambda: (tmp_path / "state.json").exists(), 30, "the stage starts")
        stage_pid = int((tmp_path / "pid").read_text())
        stage = {stage_pid: lifeline.proc_stat(stage_pid).start_ticks}
        assert (lifeline.proc_stat(stage_pid).ppid == launcher.pid) == (through == "exec")
        time.sleep(0.3)  # the stage keeps going while dvc lives
        assert running(stage)
        launcher.send_signal(signum)
        launcher.wait(timeout=10)
        wait_for(lambda: not running(stage), GONE_WITHIN_S, "the orphaned stage stops")
    finally:
        launcher.kill()
        launcher.wait()
        for pid in running(descendants(launcher.pid)):
            os.kill(pid, signal.SIGKILL)
    assert_interrupted_line((tmp_path / "stderr").read_text())
    assert json.loads((tmp_path / "state.json").read_text())["count"] >= 0
    assert not debris(tmp_path)


def test_a_plain_run_is_not_watched(tmp_path):
    """Without DVC_STAGE, watch installs the SIGTERM handler only: a shell's exit never stops
    `python stages/x.py` run by hand (nohup, a terminal multiplexer)."""
    before = {thread.name for thread in threading.enumerate()}
    assert lifeline.watch({}) is None
    assert "lifeline" not in before | {thread.name for thread in threading.enumerate()}
    assert signal.getsignal(signal.SIGTERM) is lifeline._stop


def test_the_launcher_is_the_nearest_ancestor_without_this_stage_in_its_environment():
    # pytest's own parent was started without DVC_STAGE=<a name nobody uses>.
    assert lifeline.launcher_of(os.getpid(), "no-such-stage") == os.getppid()
    assert lifeline.launcher_of(999_999_999, "no-such-stage") is None  # no such process


def test_a_zombie_or_a_reused_pid_counts_as_gone():
    child = subprocess.Popen(["true"])
    start = lifeline.proc_stat(child.pid).start_ticks
    try:
        wait_for(lambda: lifeline.proc_stat(child.pid).state == "Z", 10, "the child exits")
        assert not lifeline.is_running(child.pid, start)  # exited, not yet reaped
        own = lifeline.proc_stat(os.getpid()).start_ticks
        assert lifeline.is_running(os.getpid(), own)
        assert not lifeline.is_running(os.getpid(), own + 1)  # the same pid, another process
    finally:
        child.wait()


# --- SIGTERM to the stage itself ---------------------------------------------------------------

def test_sigterm_to_the_stage_stops_it_like_ctrl_c(tmp_path):
    """In process, through run_main: the handler turns SIGTERM into the Ctrl-C path."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from retrieval import outputs

        def main():
            for count in range(1000):
                outputs.write_json({str(tmp_path / 'state.json')!r}, {{"count": count}})
                if count == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
            outputs.write_json({str(tmp_path / 'metrics.json')!r}, {{"done": True}})

        outputs.run_main(main)
    """))
    signal.signal(signal.SIGTERM, lambda *_: None)  # were SIGTERM unhandled, pytest would die
    result = run_script(script, cwd=tmp_path, env={"DVC_STAGE": None})
    assert result.returncode == 130, result
    assert_interrupted_line(result.stderr)
    assert json.loads((tmp_path / "state.json").read_text())["count"] in (5, 6)
    assert not (tmp_path / "metrics.json").exists()
    assert not debris(tmp_path)


def test_a_second_sigterm_does_not_break_the_clean_up_of_the_first(tmp_path):
    """When dvc is the parent, the parent-death signal and the watcher both send SIGTERM: the
    clean-up the first one started (MLflow's run end, atexit hooks) runs to its end."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from retrieval import outputs

        def main():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                Path({str(tmp_path / 'cleaned_up')!r}).touch()

        outputs.run_main(main)
    """))
    signal.signal(signal.SIGTERM, lambda *_: None)  # were SIGTERM unhandled, pytest would die
    result = run_script(script, cwd=tmp_path, env={"DVC_STAGE": None})
    assert result.returncode == 130, result
    assert_interrupted_line(result.stderr)
    assert (tmp_path / "cleaned_up").exists()


def test_sigterm_to_a_stage_run_by_hand(tmp_path):
    """A real process, no DVC: `kill PID` gets the exit code and the line of Ctrl-C."""
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    stage = subprocess.Popen([sys.executable, tmp_path / "stage.py", tmp_path],
                             env=python_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "state.json").exists(), 30, "the stage starts")
        stage.send_signal(signal.SIGTERM)
        _, stderr = stage.communicate(timeout=GONE_WITHIN_S)
    finally:
        stage.kill()
    assert stage.returncode == 130
    assert_interrupted_line(stderr)
    json.loads((tmp_path / "state.json").read_text())
    assert not debris(tmp_path)


# --- end to end: the real dvc repro, killed alone ----------------------------------------------

@pytest.fixture(scope="module")
def reference(trained_repo: Path) -> tuple[dict, pd.DataFrame, dict]:
    """An uninterrupted train_unfrozen: already reproduced (then `dvc repro` runs nothing), or
    reproduced now."""
    run(["dvc", "repro"], cwd=trained_repo)
    assert not resume_files(trained_repo)
    return comparable(trained_repo)


def kill_dvc_alone_after(repo: Path, epoch: int, signum: signal.Signals, log: Path
                         ) -> tuple[int, dict[int, int], float, str]:
    """Run `dvc repro`; once `epoch` is checkpointed, send `signum` to the dvc process only.
    Returns dvc's exit code, the processes it had started (pid -> start ticks), the seconds
    from the signal until they were all gone (GONE_WITHIN_S at most) and the log."""
    with open(log, "w") as stream:
        dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=environment(), stdout=stream,
                               stderr=subprocess.STDOUT, start_new_session=True)
        stage: dict[int, int] = {}
        try:
            wait_for(lambda: checkpoint_epoch(repo) >= epoch or dvc.poll() is not None, 300,
                     f"epoch {epoch} is checkpointed")
            assert dvc.poll() is None, f"finished before the kill:\n{log.read_text()}"
            stage = descendants(dvc.pid)
            sent = time.monotonic()
            dvc.send_signal(signum)  # dvc alone, not its process group
            code = dvc.wait(timeout=30)
            while running(stage) and time.monotonic() < sent + GONE_WITHIN_S:
                time.sleep(0.05)
            seconds = time.monotonic() - sent
        finally:
            for pid in running(stage):  # never leave an orphan training behind
                os.kill(pid, signal.SIGKILL)
            if dvc.poll() is None:
                os.killpg(dvc.pid, signal.SIGKILL)
                dvc.wait()
    return code, stage, seconds, log.read_text()


def mlflow_statuses(repo: Path) -> dict[str, list[str]]:
    """Run name -> statuses, oldest first, read from the store as a new reader would."""
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()
    statuses: dict[str, list[str]] = {}
    for name, status in rows:
        statuses.setdefault(name, []).append(status)
    return statuses


@pytest.mark.e2e
def test_dvc_killed_alone_stops_its_stage_and_a_rerun_resumes(trained_repo, reference, tmp_path):
    """SIGTERM to dvc alone after epoch 1, then a re-run whose dvc gets SIGKILL after epoch 2
    (one 3-epoch training, interrupted twice), then a re-run that finishes like the reference."""
    repo = trained_repo
    for name in OUTPUTS:
        (repo / name).unlink()

    for epoch, signum in ((1, signal.SIGTERM), (2, signal.SIGKILL)):
        code, stage, seconds, log = kill_dvc_alone_after(repo, epoch, signum,
                                                         tmp_path / f"dvc-{signum.name}.log")
        assert code == -signum, log[-3000:]
        assert stage, "dvc had started no stage process"
        assert not running(stage), f"still running {seconds:.1f} s after dvc died: {stage}"
        assert log.count(INTERRUPTED) == 1 and "Traceback" not in log, log[-3000:]
        if epoch > 1:
            assert f"resuming from the checkpoint of epoch {epoch - 1}" in log, log[-3000:]
        assert checkpoint_epoch(repo) == epoch
        state = torch.load(resume_files(repo)[0], weights_only=True)
        assert {"model", "optimizer", "scheduler", "history", "best", "fingerprint"} <= set(state)
        assert_no_half_written_outputs(repo)
        assert not debris(repo)
        statuses = mlflow_statuses(repo)
        assert statuses[STAGE][-1] == "FAILED"  # ended by the clean stop, not left RUNNING
        assert "RUNNING" not in sum(statuses.values(), [])

    result = run(["dvc", "repro"], cwd=repo)
    assert "resuming from the checkpoint of epoch 2" in result.stdout + result.stderr
    assert "Running stage 'train_frozen'" not in result.stdout
    metrics, history, weights = comparable(repo)
    assert metrics == reference[0]
    pd.testing.assert_frame_equal(history, reference[1])
    assert all(torch.equal(weights[k], reference[2][k]) for k in reference[2])
    assert not resume_files(repo)
    assert not debris(repo)
    assert run(["dvc", "status"], cwd=repo).stdout.strip().endswith("up to date.")
