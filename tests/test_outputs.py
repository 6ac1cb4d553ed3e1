"""Atomic outputs: a file appears whole or not at all, with ordinary permissions."""

import os

import pytest

from retrieval import outputs


def test_atomic_path_moves_into_place_only_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    outputs.write_json(target, {"a": 1.23456789})
    assert target.read_text().strip().startswith("{") and '"a": 1.234568' in target.read_text()
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
