"""Writing stage outputs: atomically, so a killed stage never leaves half a file.

Every file is written to a temporary sibling and renamed into place (rename is atomic on POSIX):
``atomic_path`` is the one implementation (``atomic_folder`` for a whole folder), and
``write_json``, ``write_csv``, ``write_text`` and ``save_figure`` are built on it. Also here:
``markdown_table`` (the Markdown every output file uses) and ``file_digest`` (what ties an
output to the file it was computed from).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


class UserError(ValueError):
    """Bad input from the user (params, data, a path): reported in one line, exit code 2."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _new_file(path.parent / f".{path.name}")
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of `path`; when the block succeeds it replaces
    `path` whole, otherwise it is removed (KeyboardInterrupt too): never half a dataset."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder: remove it or pick another")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _fresh_sibling(path, "partial")
    try:
        yield partial
        if path.exists():
            old = _fresh_sibling(path, "old")
            old.rmdir()
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old)
        else:
            partial.rename(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _fresh_sibling(path: Path, tag: str) -> Path:
    # Hidden and named after this process, so that it is neither a dataset nor another run's.
    sibling = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    shutil.rmtree(sibling, ignore_errors=True)  # left over by a killed run with the same pid
    sibling.mkdir()
    return sibling


def _new_file(prefix: Path) -> str:
    """Create an empty, unique ``<prefix>.<random>.tmp`` with the permissions of any new file
    (0666 less the umask: mkstemp's 0600 would survive the rename)."""
    while True:
        name = f"{prefix}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            continue


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def write_json(path: str | Path, data: dict) -> None:
    """Metrics JSON: sorted keys, floats rounded to 6 digits (stable `dvc metrics diff`)."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as temp:
        table.to_csv(temp, index=False, float_format="%.6g")


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix[1:])
    plt.close(figure)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown (GitHub) table of already formatted cells, one line a row, newline-terminated."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes: ties a saved index or explainer to the checkpoint that
    made it, so a later command can tell that the checkpoint has been replaced since."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_main(main: Callable[[], None]) -> None:
    """Run a stage or command: user errors become one line on stderr and exit code 2."""
    # A shell that starts a job in the background without job control makes it ignore SIGINT,
    # and that is inherited through `dvc repro`: restore it so Ctrl-C always stops cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from retrieval import lifeline  # SIGTERM, or the death of the dvc running us, acts as Ctrl-C
    lifeline.watch()
    # Stages and commands draw into files: no GUI backend (`retrieval ... --show` switches).
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        main()
    except (UserError, FileNotFoundError) as error:
        name = type(error).__name__
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"error ({name}): {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete; re-run to continue",
              file=sys.stderr)
        sys.exit(130)
