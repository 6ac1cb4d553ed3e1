"""Writing stage outputs: atomically, so a killed stage never leaves half a file.

Every file is written to a temporary sibling and renamed into place (rename is atomic on POSIX):
``atomic_path`` is the one implementation (``atomic_folder`` for a whole folder), and
``write_json``, ``write_csv``, ``write_text`` and ``save_figure`` are built on it. Also here:
``markdown_table`` (the Markdown every output file uses) and ``file_digest`` (what ties an
output to the file it was computed from).

Faults of the environment (a full disk, a read-only or vanished folder) surface as a
``StorageError`` naming the path: ``atomic_path`` turns the OSError under any writer's exception
into one (torch and numpy wrap it in their own errors, without the path), and ``preflight``
refuses a stage whose declared outputs cannot be written before it changes anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pandas as pd


class UserError(ValueError):
    """Bad input from the user (params, data, a path): reported in one line, exit code 2."""


class StorageError(UserError):
    """The environment refused a write: disk full, quota, read-only or vanished folder."""


# errno -> (what happened, what to do): the faults a user fixes outside the project.
_STORAGE_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space there (or move the project) and "
                   "re-run"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota and re-run"),
    errno.EROFS: ("read-only file system", "remount it read-write or run from a writable "
                  "copy, then re-run"),
    errno.EACCES: ("permission denied", "make it writable for this user and re-run"),
    errno.EPERM: ("operation not permitted", "make it writable for this user and re-run"),
    errno.ENOENT: ("folder vanished while writing", "keep it in place and re-run"),
}


def storage_fault(error: BaseException, written: Path | None = None) -> OSError | None:
    """The OSError of a storage fault behind ``error`` (itself, or what it was raised from or
    during: torch.save reports a full disk as a RuntimeError over the OSError), else None.

    A missing file counts only when the folder of ``written`` has vanished: otherwise it is a
    missing input, which the caller reports as such."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_FAULTS:
            vanished = written is not None and not written.parent.is_dir()
            if current.errno != errno.ENOENT or vanished:
                return current
        current = current.__cause__ or current.__context__
    return None


def storage_error(fault: OSError, path: str | Path) -> StorageError:
    """One-line StorageError for a write to ``path`` that failed with ``fault``."""
    what, todo = _STORAGE_FAULTS[fault.errno]
    return StorageError(f"{path}: {what} ({_mount_point(Path(path))}); {todo}")


def _mount_point(path: Path) -> str:
    """The file system a path is on, for the message: where the space must be freed."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return f"file system at {path}"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place only if the block succeeds.

    A storage fault anywhere in the block (the writer's own exception or the OSError under it)
    becomes a StorageError naming `path`; the temporary file is removed either way."""
    path = Path(path)
    claimed: list[str] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _new_file(path.parent / f".{path.name}", claimed)
        yield Path(temp)
        os.replace(temp, path)
    except Exception as error:
        fault = storage_fault(error, path)
        if fault is None or isinstance(error, StorageError):
            raise
        raise storage_error(fault, path) from error
    finally:
        for name in claimed:
            # Renamed into place, never created (a read-only folder), or its folder vanished.
            with suppress(OSError):
                os.unlink(name)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of `path`; when the block succeeds it replaces
    `path` whole, otherwise it is removed (KeyboardInterrupt too): never half a dataset."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder: remove it or pick another")
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = _fresh_sibling(path, "partial")
        yield partial
        if path.exists():
            old = _fresh_sibling(path, "old")
            old.rmdir()
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old)
        else:
            partial.rename(path)
    except Exception as error:
        fault = storage_fault(error, path)
        if fault is None or isinstance(error, StorageError):
            raise
        raise storage_error(fault, path) from error
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)


def _fresh_sibling(path: Path, tag: str) -> Path:
    # Hidden and named after this process, so that it is neither a dataset nor another run's.
    sibling = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    shutil.rmtree(sibling, ignore_errors=True)  # left over by a killed run with the same pid
    sibling.mkdir()
    return sibling


def _new_file(prefix: Path, claimed: list[str]) -> str:
    """Create an empty, unique ``<prefix>.<random>.tmp`` with the permissions of any new file
    (0666 less the umask: mkstemp's 0600 would survive the rename). Its name goes into
    ``claimed`` before the file exists, so the caller's clean-up also covers a Ctrl-C or SIGTERM
    that lands between the creation and the return."""
    while True:
        name = f"{prefix}.{secrets.token_hex(6)}.tmp"
        claimed.append(name)
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            claimed.remove(name)  # another writer's: never ours to remove


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        # Six decimals keep `dvc metrics diff` stable; a value below 1e-3 (an export's
        # difference from PyTorch, a tiny loss) keeps three significant digits instead of
        # reading as 0.
        return round(value, 6) if abs(value) >= 1e-3 else float(f"{value:.3g}")
    return value


def write_json(path: str | Path, data: dict) -> None:
    """Metrics JSON: sorted keys, floats rounded to 6 decimals (3 significant digits below
    1e-3)."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


class DamagedOutputError(UserError):
    """A file an earlier stage wrote cannot be read as that stage writes it (truncated, edited
    by hand, or from another version of the project)."""


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Read an earlier stage's output in this block: a parse error (bad JSON, CSV or npz, a
    missing column or key) becomes one DamagedOutputError naming the file and the stage that
    re-creates it. A missing file stays a FileNotFoundError (its own one-line message)."""
    try:
        yield
    except (FileNotFoundError, UserError):
        raise
    except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile,
            pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        if isinstance(error, KeyError):
            reason = f"no {reason}"
        writer = _writer_of(Path(path))
        again = f"dvc repro --force {writer}" if writer else "dvc repro --force"
        raise DamagedOutputError(f"{path} cannot be read as the pipeline writes it ({reason}): "
                                 f"re-create it with `{again}`") from error


def _writer_of(path: Path, dvc_yaml: str | Path = "dvc.yaml") -> str | None:
    """The dvc.yaml stage whose outs, metrics or plots hold ``path``, if any."""
    import yaml

    if not Path(dvc_yaml).is_file():
        return None
    with suppress(Exception):  # only for the message: a broken dvc.yaml has its own error
        for stage in (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {}):
            for declared in declared_outputs(stage, dvc_yaml):
                if path == declared or declared in path.parents:
                    return stage
    return None


def read_json(path: str | Path) -> dict:
    """A JSON object an earlier stage wrote (``reading`` turns damage into one line)."""
    with reading(path):
        value = json.loads(Path(path).read_text())
        if not isinstance(value, dict):
            raise ValueError(f"a JSON object expected, found {type(value).__name__}")
        return value


def read_table(path: str | Path, columns: Sequence[str], **options: Any) -> pd.DataFrame:
    """A CSV an earlier stage wrote, with at least ``columns`` (damage: one line, see
    ``reading``); ``options`` go to pandas.read_csv."""
    with reading(path):
        table = pd.read_csv(path, **options)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"column {missing[0]!r} is missing")
        return table


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


def _exit_one_line(error: BaseException) -> None:
    message = " ".join(str(error).split())  # one line, whatever the message holds
    print(f"error ({type(error).__name__}): {message}", file=sys.stderr)
    sys.exit(2)


def preflight(stage: str, dvc_yaml: str | Path = "dvc.yaml",
              extra: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, a stage whose outputs (its outs, metrics and plots in dvc.yaml)
    or ``extra`` paths cannot be written: the nearest existing folder of each must be writable.
    Otherwise a read-only folder would be met after other outputs were already replaced."""
    for path in [*declared_outputs(stage, dvc_yaml), *map(Path, extra)]:
        for folder in _folders_written(path):
            if not os.access(folder, os.W_OK):
                fault = errno.EROFS if _read_only_mount(folder) else errno.EACCES
                what, todo = _STORAGE_FAULTS[fault]
                raise StorageError(
                    f"{folder}: {what}; stage {stage} writes {path} there: {todo} "
                    "(nothing was changed)")


def declared_outputs(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    """The paths ``stage`` declares as outs, metrics and plots in dvc.yaml ([] without one)."""
    import yaml

    if not Path(dvc_yaml).is_file():
        return []
    spec = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {}).get(stage, {})
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in spec.get(section) or []:
            paths.extend([Path(entry)] if isinstance(entry, str) else map(Path, entry))
    return paths


def _folders_written(path: Path) -> list[Path]:
    """Where writing ``path`` creates entries: its nearest existing parent folder (the temporary
    sibling and the rename land there), and the folder itself when it is one (its files)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return [parent, path] if path.is_dir() else [parent]


def _read_only_mount(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


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
        _exit_one_line(error)
    except Exception as error:
        # A full disk or read-only folder met outside atomic_path (a library's own file, the
        # MLflow store): still one line naming the path, not a traceback.
        fault = storage_fault(error)
        if fault is None:
            raise
        _exit_one_line(storage_error(fault, fault.filename or "a file of this stage"))
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete; re-run to continue",
              file=sys.stderr)
        sys.exit(130)
