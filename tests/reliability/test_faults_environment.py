"""Faults of the environment (issue 16): full disks, read-only folders, a vanished MLflow store,
an unreachable tracking server, damaged caches.

Organised by fault class:

- disk full / read-only, per writer: every kind of output (JSON, CSV, text, figure, checkpoint,
  image cache, array cache, dataset folder) written into a 1 MB tmpfs that is then filled or
  remounted read-only. Each must end in one line naming the path (exit 2, through
  ``outputs.run_main``), leave no temporary file and keep the earlier output as it was.
- read-only output folders of a real stage (split): refused by the preflight before anything
  is replaced, whatever output folder it is (outs, plots, metrics, the MLflow store).
- the MLflow store vanishing, replaced or filling its disk mid-stage: one line naming the database.
- an unreachable tracking server (nothing listening, a stalled socket): one line within the
  timeout with ``tracking.unreachable: fail``, one warning and the local store with ``local``.
- damaged caches: a truncated, garbled or unrecorded cache file is rebuilt with a one-line
  warning, never used.

Mounting needs root and a kernel that allows it: those cases are skipped with the reason
otherwise. Every mount is undone in its fixture's teardown.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retrieval import cache, models, outputs, tracking
from retrieval.config import ModelConfig
from tests.conftest import make_repo
from tests.reliability.conftest import assert_one_line_error, run_script

TEMP_PATTERNS = (".*.tmp", ".*.partial-*", ".*.old-*")


# --- helpers ------------------------------------------------------------------------------------

def via_run_main(body: Callable[[], None]) -> subprocess.CompletedProcess:
    """Run ``body`` as a stage would (outputs.run_main): exit code and captured stderr."""
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr):
        try:
            outputs.run_main(body)
        except SystemExit as stop:
            code = stop.code
    return subprocess.CompletedProcess([], code, "", stderr.getvalue())


def temp_files(folder: Path) -> list[Path]:
    return [p for pattern in TEMP_PATTERNS for p in folder.rglob(pattern)]


def snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    """Bytes and modification time of each file: what "left intact" means."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def mount_tmpfs_or_skip(folder: Path, size: str = "1m") -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(error, 'stderr', error)}")


def fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system has no byte left."""
    with open(folder / "filler", "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    with contextlib.suppress(OSError), open(folder / "filler", "ab") as stream:
        stream.write(b"\0" * 4096)  # the last partial page


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, unmounted afterwards."""
    disk = tmp_path / "disk"
    mount_tmpfs_or_skip(disk)
    try:
        yield disk
    finally:
        unmount(disk)


# --- disk full and read-only, per writer --------------------------------------------------------

class _Weights:
    """What save_checkpoint reads of a model, with 1.2 MB of weights (more than the disk)."""

    config = ModelConfig()
    classifier = None

    def state_dict(self) -> dict:
        return {"w": torch.ones(300_000)}


def _images(folder: Path, count: int = 40, size: int = 96) -> list[Path]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _figure():
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(12, 12))
    axis.imshow(np.random.default_rng(0).random((400, 400)))
    return figure


def _folder_writer(path: Path) -> None:
    with outputs.atomic_folder(path) as partial:
        for i in range(20):
            (partial / f"{i}.bin").write_bytes(os.urandom(100_000))


# name -> (output path under the disk, writer of a big version of it)
WRITERS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "metrics-json": ("metrics.json",
                     lambda out, _: outputs.write_json(out, {"x": list(range(300_000))})),
    "table-csv": ("table.csv", lambda out, _: outputs.write_csv(
        out, pd.DataFrame({"a": np.arange(300_000)}))),
    "report-text": ("report.md", lambda out, _: outputs.write_text(out, "x" * 2_000_000)),
    "figure-png": ("plot.png", lambda out, _: outputs.save_figure(_figure(), out, dpi=200)),
    "checkpoint-pt": ("best.pt", lambda out, _: models.save_checkpoint(out, _Weights(), {})),
    "image-cache-u8": ("images", lambda out, source: cache.ImageCache.build(
        _images(source), 96, out, workers=0, progress=False)),
    "array-cache-npy": (".cache/arrays", lambda out, _: cache.array_for(
        "big", lambda: np.ones(300_000))),
    "dataset-folder": ("prepared", lambda out, _: _folder_writer(out)),
}


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_writer_on_a_full_or_read_only_disk_fails_in_one_line(
        writer, fault, small_disk, tmp_path, monkeypatch):
    name, write = WRITERS[writer]
    target = small_disk / name
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(small_disk / ".cache"))
    # Earlier outputs: a finished sibling, and the folder the writer will use.
    outputs.write_json(small_disk / "earlier.json", {"done": True})
    if writer in ("image-cache-u8", "array-cache-npy", "dataset-folder"):
        target.mkdir(parents=True)
        (target / "earlier.txt").write_text("kept")
    else:
        target.write_text("earlier version")
    before = snapshot([p for p in small_disk.rglob("*") if p.is_file()])
    if fault == "disk-full":
        fill(small_disk)
        expected = "no space left on device"
    else:
        mount("-o", "remount,ro", str(small_disk))
        expected = "read-only file system"
    source = tmp_path / "source"
    result = via_run_main(lambda: write(target, source))
    line = assert_one_line_error(result, "StorageError", str(target), expected,
                                 f"file system at {small_disk}")
    assert "re-run" in line
    assert temp_files(small_disk) == []
    assert snapshot(list(before)) == before  # nothing earlier was touched


# --- read-only output folders of a real stage: the preflight ------------------------------------

@pytest.fixture(scope="module")
def split_repo(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Path:
    """prepare and split run once in-process: split's outputs exist."""
    repo = make_repo(tmp_path_factory.mktemp("split"), mlflow_db_template)
    for stage in ("prepare", "split"):
        result = run_script(f"stages/{stage}.py", cwd=repo, env={"MLFLOW_TRACKING_URI": None})
        assert result.returncode == 0, result.stderr[-3000:]
    return repo


SPLIT_OUTPUTS = ("data/split.csv", "metrics/details/split.json", "plots/split/class_counts.csv")


@pytest.mark.parametrize("folder", ["plots/split", "metrics/details", "data", "mlruns"],
                         ids=["plots-folder", "metrics-folder", "outs-folder", "mlflow-store"])
def test_a_read_only_output_folder_is_refused_before_anything_is_replaced(folder, split_repo):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    outputs_before = snapshot([split_repo / p for p in SPLIT_OUTPUTS])
    store_before = snapshot([split_repo / "mlruns" / "mlflow.db"])
    target = split_repo / folder
    try:
        mount("--bind", str(target), str(target))
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot bind-mount here: {error.stderr}")
    try:
        mount("-o", "remount,bind,ro", str(target))
        result = run_script("stages/split.py", cwd=split_repo, env={"MLFLOW_TRACKING_URI": None})
    finally:
        unmount(target)
    assert_one_line_error(result, "StorageError", f"{folder}: read-only file system",
                          "stage split writes", "nothing was changed")
    assert snapshot(list(outputs_before)) == outputs_before
    assert snapshot(list(store_before)) == store_before  # not even a run was opened
    assert temp_files(split_repo / "data") + temp_files(split_repo / "plots") == []


# --- the MLflow store vanishing or refusing writes mid-stage ------------------------------------

def _delete_db(store: Path, template: Path) -> None:
    (store / "mlflow.db").unlink()


def _delete_folder(store: Path, template: Path) -> None:
    shutil.rmtree(store)


def _replace_db(store: Path, template: Path) -> None:
    (store / "mlflow.db").unlink()
    shutil.copy(template, store / "mlflow.db")  # a fresh, empty store: another inode


def _full(store: Path, template: Path) -> None:
    fill(store)  # (remounting read-only is refused while SQLite holds the file open)


STORE_FAULTS = {
    "db-deleted": (_delete_db, "vanished"),
    "folder-deleted": (_delete_folder, "vanished"),
    "db-replaced": (_replace_db, "vanished"),
    "disk-full": (_full, "refused a write during stage split "
                  "((sqlite3.OperationalError) database or disk is full)"),
}


@pytest.mark.parametrize("log_after", [True, False], ids=["then-logged", "then-closed"])
@pytest.mark.parametrize("fault", list(STORE_FAULTS))
def test_the_mlflow_store_failing_mid_stage_fails_in_one_line(
        fault, log_after, tmp_path, monkeypatch, mlflow_db_template):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    store = tmp_path / "mlruns"
    if fault == "disk-full":
        mount_tmpfs_or_skip(store, "8m")
    else:
        store.mkdir()
    try:
        shutil.copy(mlflow_db_template, store / "mlflow.db")
        break_store, expected = STORE_FAULTS[fault]

        def stage() -> None:
            with tracking.stage_run("split", {"seed": 1}) as run:
                outputs.write_json("metrics/split.json", {"done": 1})
                break_store(store, mlflow_db_template)
                if log_after:
                    run.log_metrics({"value": 1.0})

        result = via_run_main(stage)
        assert_one_line_error(result, "StorageError", str(store / "mlflow.db"), expected,
                              "re-run")
        assert json.loads(Path("metrics/split.json").read_text()) == {"done": 1}
        if fault == "disk-full":  # space freed, the store is a readable database
            (store / "filler").unlink()
            assert tracking.pipeline_runs()
    finally:
        if fault == "disk-full":
            unmount(store)


# --- an unreachable tracking server -------------------------------------------------------------

@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("server", ["nothing-listening", "stalled"])
def test_an_unreachable_server_fails_in_one_line_within_the_timeout(
        server, scheme, request, tmp_path, monkeypatch):
    port = request.getfixturevalue("closed_port" if server == "nothing-listening"
                                   else "stalled_port")
    uri = f"{scheme}://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = {"seed": 1, "tracking.unreachable": "fail", "tracking.timeout_s": 1.0}

    def stage() -> None:
        with tracking.stage_run("split", {"seed": 1}, params):
            outputs.write_json("metrics/split.json", {"done": 1})

    start = time.monotonic()
    result = via_run_main(stage)
    assert time.monotonic() - start < 4.0  # seconds, not MLflow's minutes of retries
    assert_one_line_error(result, "TrackingUnreachable", uri, "did not answer within 1 s",
                          "tracking.unreachable: local")
    assert not Path("metrics/split.json").exists()  # refused before any work
    assert not Path("mlruns").exists()


@pytest.mark.parametrize("server", ["nothing-listening", "stalled"])
def test_an_unreachable_server_with_local_warns_once_and_logs_locally(
        server, request, tmp_path, monkeypatch, mlflow_db_template):
    port = request.getfixturevalue("closed_port" if server == "nothing-listening"
                                   else "stalled_port")
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_db_template, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = {"seed": 1, "tracking.unreachable": "local", "tracking.timeout_s": 1.0}

    def stage() -> None:
        with tracking.stage_run("split", {"seed": 1}, params) as run:
            run.log_metrics({"value": 1.0})

    result = via_run_main(stage)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 0, result.stderr
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    assert uri in lines[0] and str(tmp_path / "mlruns") in lines[0]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert set(tracking.pipeline_run_ids(params)) == {"pipeline", "split"}


# --- damaged caches: rebuilt with a warning, never used -----------------------------------------

def _truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    file.write_bytes(bytes(data))


def _garble_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[:16] = b"garbage garbage "
    file.write_bytes(bytes(data))


def _drop_record(file: Path) -> None:
    cache.record_of(file).unlink()


def _garble_record(file: Path) -> None:
    cache.record_of(file).write_text("{not json")


def _old_record(file: Path) -> None:
    record = json.loads(cache.record_of(file).read_text())
    cache.record_of(file).write_text(json.dumps({k: record[k] for k in record
                                                 if k not in ("bytes", "crc32")}))


def _drop_file(file: Path) -> None:
    file.unlink()


DAMAGES = {
    "truncated": (_truncate, "truncated"),
    "garbled-byte": (_flip_byte, "garbled (checksum mismatch)"),
    "garbled-header": (_garble_header, "garbled (checksum mismatch)"),
    "record-deleted": (_drop_record, "unverifiable (no record"),
    "record-garbled": (_garble_record, "is unreadable"),
    "record-old-format": (_old_record, "has no checksum"),
    "file-deleted": (_drop_file, "missing (its record is there)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_image_cache_is_rebuilt_with_a_warning(damage, tmp_path, capsys):
    images = _images(tmp_path / "images", count=5, size=32)
    directory = tmp_path / "cache"
    original = np.array(cache.ImageCache.build(images, 32, directory, workers=0,
                                               progress=False).array)
    file = next(directory.glob("*.u8"))
    capsys.readouterr()
    damage_file, expected = DAMAGES[damage]
    damage_file(file)
    rebuilt = cache.ImageCache.build(images, 32, directory, workers=0, progress=False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: image cache"), lines
    assert str(file) in lines[0] and expected in lines[0] and "rebuilding it" in lines[0]
    assert np.array_equal(np.asarray(rebuilt.array), original)
    assert temp_files(directory) == []
    cache.ImageCache.build(images, 32, directory, workers=0, progress=False)
    assert capsys.readouterr().err == ""  # the rebuilt file verifies


@pytest.mark.parametrize("damage", [d for d in DAMAGES if d != "record-old-format"])
def test_a_damaged_array_cache_is_recomputed_with_a_warning(damage, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    original = np.arange(5000, dtype=np.float32).reshape(100, 50)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return original.copy()

    cache.array_for("features-x", compute)
    file = tmp_path / "cache" / "arrays" / "features-x.npy"
    damage_file, expected = DAMAGES[damage]
    damage_file(file)
    capsys.readouterr()
    assert np.array_equal(cache.array_for("features-x", compute), original)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 2  # recomputed, not read
    assert len(lines) == 1 and lines[0].startswith("warning: array cache"), lines
    assert str(file) in lines[0] and expected in lines[0]
    assert np.array_equal(cache.array_for("features-x", compute), original)
    assert len(calls) == 2 and capsys.readouterr().err == ""  # the new file verifies
    assert temp_files(tmp_path / "cache") == []
    record = json.loads(cache.record_of(file).read_text())
    assert record["crc32"] == zlib.crc32(file.read_bytes())
