"""A training stage run as N DistributedDataParallel processes: torchrun, started by the stage.

With ``train_unfrozen.processes: N`` (N > 1) the stage, whether `dvc repro` or a user ran it,
starts torchrun's launcher (``torch.distributed.run --standalone --nproc_per_node N``) in its
own process on its own script and only waits: the N workers run the stage exactly as a hand-typed
``torchrun --nproc_per_node=N stages/x.py`` would (gloo on CPU, nccl on CUDA), and a process
that already is a worker (WORLD_SIZE set) never launches again.

Why in-process rather than a ``torchrun`` child: torchrun reports a failed worker with its own
traceback and a 30-line summary and exits 1, and a Ctrl-C with another traceback. Here the user
sees the workers' own lines (one line for a user error) and gets the worker's exit code (2 for
a user error, 130 for an interrupt), as with one process.

Output: rank 0 writes to this process's stdout and stderr (its progress, its log lines, its
error); the other ranks write to a temporary log, shown only when one of them failed first.
Signals: torchrun's handlers pass SIGINT, SIGTERM and SIGHUP on to the workers (they run in
their own session, so a Ctrl-C reaches them only through here); they stop as on Ctrl-C (see
lifeline), leaving the resume checkpoint, and torchrun kills any left after 30 s. Under DVC each
worker also watches the dvc process itself, so a SIGKILL of dvc and this launcher still stops
them within a second.

Only the standard library is imported until a launch is due: the launching process never
imports the model, data or MLflow modules that the workers load.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from retrieval.outputs import UserError

INTERRUPTED = 130  # outputs.run_main's exit code for a Ctrl-C (or SIGTERM) that stopped cleanly
OMP_THREADS = "OMP_NUM_THREADS"


def is_worker() -> bool:
    """Whether this process is one of torchrun's workers (torchrun sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def cpu_count() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def threads_per_process(processes: int, cpus: int | None = None) -> int:
    """CPU threads each of `processes` workers gets: the cores shared out, at least one."""
    return max(1, (cpus or cpu_count()) // processes)


def run_workers(script: str, processes: int, key: str, device: str) -> int | None:
    """Run `script` as `processes` torchrun workers and return their exit code; None when this
    process trains itself (processes == 1, or it is a worker already).

    `key` names the param (for errors), `device` is params.device: processes > 1 need one GPU
    each on CUDA, and at most one process a core on CPU.
    """
    if processes == 1 or is_worker():
        return None
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The workers' own lines say what happened; torchrun's log lines (each of its loggers has
    # its own level) would only repeat it (see the docstring). This process logs nothing else.
    logging.disable(logging.CRITICAL)

    _check_capacity(processes, key, device)
    # torchrun would set 1 thread a worker (with a warning) whatever the cores; a user's own
    # OMP_NUM_THREADS is kept.
    os.environ.setdefault(OMP_THREADS, str(threads_per_process(processes)))
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        others = ",".join(f"{rank}:3" for rank in range(1, processes))  # stdout+stderr to files
        args = torchrun.parse_args(["--standalone", f"--nproc_per_node={processes}",
                                    "--redirects", others, "--log-dir", logs, script,
                                    *sys.argv[1:]])
        try:
            torchrun.run(args)
        except SignalException:
            return INTERRUPTED  # the workers were stopped by the same signal: rank 0 said so
        except ChildFailedError as error:
            return _report_failure(error, Path(logs))
    return 0


def _check_capacity(processes: int, key: str, device: str) -> None:
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        cpus = cpu_count()
        if processes > cpus:
            raise UserError(f"{key} ({processes}) is more than the {cpus} CPU cores here: "
                            f"set it to at most {cpus}")
        return
    if ":" in device:
        raise UserError(f"{key} ({processes}) needs one GPU a process, but device is "
                        f"'{device}': set device: auto (or cuda)")
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise UserError(f"{key} ({processes}) is more than the {gpus} GPU(s) here: set it to "
                        f"at most {gpus}")


def _report_failure(error: object, logs: Path) -> int:
    """The exit code of a failed run; the first failed rank's error on stderr unless rank 0
    has already written its own."""
    failures = error.failures  # global rank -> ProcessFailure
    zero = failures.get(0)
    if zero is not None and zero.exitcode not in (0, INTERRUPTED) and zero.exitcode > 0:
        return zero.exitcode  # rank 0 failed on its own and wrote why
    rank, failure = error.get_first_failure()
    if rank != 0:
        for log in logs.glob(f"**/attempt_*/{failure.local_rank}/stderr.log"):
            lines = log.read_text(errors="replace").strip().splitlines()
            shown = lines[-1:] if lines and lines[-1].startswith("error (") else lines[-20:]
            print(*shown, sep="\n", file=sys.stderr)
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
