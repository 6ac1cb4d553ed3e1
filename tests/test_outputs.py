"""Atomic outputs: a file appears whole or not at all, with ordinary permissions."""

import json
import os
from pathlib import Path

import pytest

from retrieval import outputs


def test_atomic_path_moves_into_place_only_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    outputs.write_json(target, {"a": 1.23456789, "tiny": 6.8312e-7, "nan": float("nan")})
    assert target.read_text().strip().startswith("{") and '"a": 1.234568' in target.read_text()
    # A difference of 7e-7 (an export against PyTorch) must not read as 0.
    assert json.loads(target.read_text()) == {"a": 1.234568, "tiny": 6.83e-7, "nan": None}
    umask = os.umask(0o022)
    os.umask(umask)  # read it back (tests only: the library never touches the umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), outputs.atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError
    assert '"a"' in target.read_text()  # the old file survives a failed write
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary left


def test_atomic_folder_replaces_whole_or_leaves_the_old_one(tmp_path):
    from retrieval.outputs import atomic_folder

    target = tmp_path / "data"
    with atomic_folder(target) as partial:
        (partial / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_folder(target) as partial:
        (partial / "b.txt").write_text("second")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # and no partial sibling is left


def test_a_damaged_pipeline_output_is_one_line_naming_the_stage_that_writes_it(tmp_path,
                                                                               monkeypatch):
    import numpy as np

    from retrieval.evaluation import Embeddings

    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: x\n    outs: [data/embeddings]\n"
                                "    metrics: [metrics/evaluate.json]\n")
    Path("data/embeddings").mkdir(parents=True)
    Path("metrics").mkdir()
    Path("data/embeddings/frozen.npz").write_bytes(b"PK\x03\x04 cut short")
    Path("metrics/evaluate.json").write_text('{"map": 0.5')
    Path("other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(outputs.DamagedOutputError, match=r"^data/embeddings/frozen.npz cannot "
                       r"be read .*: re-create it with `dvc repro --force evaluate`$"):
        Embeddings.load("data/embeddings/frozen.npz")
    with pytest.raises(outputs.DamagedOutputError, match="metrics/evaluate.json .*evaluate`"):
        outputs.read_json("metrics/evaluate.json")
    with pytest.raises(outputs.DamagedOutputError,
                       match=r"other.csv .*column 'path' is missing.*`dvc repro --force`$"):
        outputs.read_table("other.csv", ("path",))
    assert outputs.read_table("other.csv", ("a", "b"))["b"].tolist() == [2]
    with pytest.raises(FileNotFoundError):  # a missing file keeps its own message
        outputs.read_json("metrics/missing.json")
    np.savez(Path("data/embeddings/frozen.npz"), rows=np.arange(2))  # a key short
    with pytest.raises(outputs.DamagedOutputError, match="no 'vectors"):
        Embeddings.load("data/embeddings/frozen.npz")
