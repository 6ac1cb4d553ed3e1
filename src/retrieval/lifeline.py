"""A stage stops cleanly when its `dvc repro` dies, or when it is sent SIGTERM.

A cancelled CI job, `kill PID` or `timeout --foreground` signal the dvc process alone: it dies
(SIGTERM's default action, or SIGKILL) and the stage it launched runs on as an orphan; a re-run
then races it for the same outputs and the workspace no longer matches dvc.lock.

``watch`` (called by ``outputs.run_main``) makes the first SIGTERM stop a stage as Ctrl-C
does: a KeyboardInterrupt, so the resume checkpoint stays, no metrics are written and run_main
prints its one "interrupted: ..." line; later ones are ignored while it cleans up. Under DVC
(DVC_STAGE set, which DVC does for every stage command) it also watches the dvc process and
sends this process SIGTERM once dvc is gone. dvc runs the command through ``$SHELL -c`` (and
maybe torchrun), so the process to watch is not always the parent: it is the nearest ancestor
started without this stage's DVC_STAGE in its environment.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

POLL_SECONDS = 0.25
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ProcStat(NamedTuple):
    """The fields of /proc/<pid>/stat that identify a process and its parent."""

    ppid: int
    state: str  # R, S, D, ...; Z (zombie) and X (dead) have exited
    start_ticks: int  # with the pid, names the process: pids are reused, start times are not


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/<pid>/stat's parent, state and start time; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            text = stream.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    fields = text[text.rindex(")") + 2:].split()
    return ProcStat(ppid=int(fields[1]), state=fields[0], start_ticks=int(fields[19]))


def is_running(pid: int, start_ticks: int) -> bool:
    """Whether the process that started at `start_ticks` with this pid has not exited yet (a
    zombie has: nobody may ever reap it)."""
    stat = proc_stat(pid)
    return stat is not None and stat.start_ticks == start_ticks and stat.state not in "ZX"


def _environment(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as stream:
            entries = stream.read().decode(errors="replace").split("\0")
    except OSError:  # gone, or another user's
        return None
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def launcher_of(pid: int, stage: str) -> int | None:
    """The process that launched stage `stage`'s command around `pid`: the nearest ancestor
    whose environment (as it was started) lacks DVC_STAGE=<stage>. dvc passes DVC_STAGE to the
    command only, so shells and torchrun between dvc and `pid` carry it and dvc does not,
    however dvc itself was started (script, `python -m dvc`, a frozen binary, the Python API).
    None when there is no such ancestor this user can read (or no /proc)."""
    seen: set[int] = set()
    while True:
        stat = proc_stat(pid)
        if stat is None or stat.ppid <= 1 or stat.ppid in seen:
            return None
        pid = stat.ppid
        seen.add(pid)
        environment = _environment(pid)
        if environment is None:
            return None
        if environment.get("DVC_STAGE") != stage:
            return pid


def _stop(signum: int, frame: object) -> None:
    # Once: when dvc was the parent, the kernel's parent-death signal and the watcher both send
    # one, and a second KeyboardInterrupt would break the clean-up (MLflow's run end, atexit
    # hooks) that the first started. SIGKILL stays for the impatient.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def _stop_when_gone(pid: int, start_ticks: int) -> None:
    while is_running(pid, start_ticks):
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # the main thread handles it: _stop


def _set_parent_death_signal() -> None:
    """Have the kernel send SIGTERM the moment the parent dies (Linux): no polling delay when
    dvc is the parent. Best effort: the polling thread covers any platform where it fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def watch(environment: dict[str, str] | None = None) -> int | None:
    """SIGTERM stops this process like Ctrl-C; under DVC, so does the death of the dvc process.

    Call it first thing in the main thread. Returns the pid of the dvc process watched, None
    when not under DVC (a plain `python stages/x.py` is never stopped by its shell's exit), or
    when dvc cannot be found.
    """
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers belong to the main thread
    signal.signal(signal.SIGTERM, _stop)
    stage = (os.environ if environment is None else environment).get("DVC_STAGE")
    if stage is None or not sys.platform.startswith("linux"):
        return None
    launcher = launcher_of(os.getpid(), stage)
    if launcher is None:
        return None
    if launcher == os.getppid():
        _set_parent_death_signal()
    stat = proc_stat(launcher)
    start_ticks = stat.start_ticks if stat is not None else -1  # -1: gone already, stop now
    threading.Thread(target=_stop_when_gone, args=(launcher, start_ticks), daemon=True,
                     name="lifeline").start()
    return launcher
