"""Where things live when a stage runs: the project root, the dataset root, shared caches.

`dvc exp run --queue/--temp` executes stages in a temporary copy of the repository
(.dvc/tmp/exps/...). DVC sets DVC_ROOT to the main repository there, so shared state (the MLflow
store, the decoded-image cache, relative dataset paths) resolves against it instead of the copy.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The main repository: DVC_ROOT inside DVC-run stages, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve(path: str | Path) -> Path:
    """A user-given path: absolute as is, relative ones from the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def cache_dir() -> Path:
    """Content-addressed caches shared by every stage and experiment (git- and DVC-ignored)."""
    return Path(os.environ.get("RETRIEVAL_CACHE_DIR") or project_root() / ".cache")
