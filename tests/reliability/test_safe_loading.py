"""Safe loading (issue #8): no file the project reads can make it run code.

A pickle can name any callable to run while it loads. Every loader is fed one whose payload
creates a marker folder; the test first shows the payload is live (an unsafe torch.load runs it),
then that each of the project's loaders refuses or ignores the file and the marker never appears.
A source scan keeps unsafe loaders out of the code base, and the README's MLflow UI listens on
localhost only.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval import cache, models, training
from retrieval.config import ModelConfig
from retrieval.outputs import UserError

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("src", "stages", "bench")


class Payload:
    """Unpickling this calls os.mkdir(marker): stands for any code an attacker wants run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint-shaped .pt whose unpickling runs the payload, the payload's marker)."""
    marker = tmp_path / "code_was_executed"
    path = tmp_path / "evil.pt"
    net = models.EmbeddingNet(ModelConfig(weights="none",
                                          backbone="cifar_resnet", cifar_n=1, hidden_dim=8,
                                          embedding_dim=4))
    torch.save({"state_dict": net.state_dict(), "model_config": {}, "image_size": 32,
                "threshold": 0.5, "epoch": 1, "fingerprint": "x", "note": Payload(marker)},
               path)
    return path, marker


def test_the_payload_is_live_under_an_unsafe_load(evil):
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_model_files_with_pickled_code_are_refused(evil):
    path, marker = evil
    for load in (models.load_checkpoint_file, models.load_model):
        with pytest.raises(UserError, match=f"refusing to load {re.escape(str(path))}"):
            load(path)
    with pytest.raises(UserError, match="refusing to load"):  # as model.weights
        models.EmbeddingNet(ModelConfig(backbone="resnet18", weights=str(path)))
    assert not marker.exists()


def test_a_tampered_resume_checkpoint_is_ignored_not_run(evil, capsys):
    path, marker = evil
    assert training.load_resume_state(path, "x") is None  # training starts over
    assert "ignoring the resume checkpoint" in capsys.readouterr().out
    assert not marker.exists()


def test_a_tampered_array_cache_entry_is_recomputed_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "code_was_executed"
    file = tmp_path / "cache" / "arrays" / "features-abc.npy"
    file.parent.mkdir(parents=True)
    np.save(file, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    fresh = cache.array_for("features-abc", lambda: np.arange(3.0))
    np.testing.assert_array_equal(fresh, np.arange(3.0))
    assert not marker.exists()
    np.testing.assert_array_equal(np.load(file, allow_pickle=False), np.arange(3.0))


def test_the_commands_refuse_a_model_with_pickled_code(evil, tmp_path, capsys):
    from retrieval import cli

    path, marker = evil
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 110, 100)).save(image)
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", str(image), str(image), "--model", str(path), "--output",
                  str(tmp_path / "c.png")])
    assert stop.value.code == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


# --- the code base -------------------------------------------------------------------------------

def python_files() -> list[Path]:
    return sorted(p for folder in SOURCES for p in (REPO / folder).rglob("*.py"))


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can execute code from a file, or evaluate strings as code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
            for name in names:
                if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve",
                                          "marshal", "cloudpickle"):
                    found.append((node.lineno, f"import {name}"))
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        short = func.rsplit(".", 1)[-1]
        if func in ("eval", "exec") or short in ("read_pickle", "unsafe_load", "full_load"):
            found.append((node.lineno, func))
        elif func == "torch.load" and not is_true(keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif func in ("torch.jit.load", "torch.package.PackageImporter"):
            found.append((node.lineno, func))
        elif short == "load" and func.startswith(("np.", "numpy.")) and \
                is_true(keyword(node, "allow_pickle")):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        elif func == "yaml.load" and "Safe" not in ast.unparse(keyword(node, "Loader") or
                                                              ast.Constant("")):
            found.append((node.lineno, "yaml.load without SafeLoader"))
    return found


# The one reviewed exception: export.load_torchscript opens only bytes whose SHA-256 is the
# one recorded when this project wrote them (tests/test_export.py checks the refusal).
ALLOWED = {("src/retrieval/export.py", "torch.jit.load")}


def test_no_code_in_the_project_loads_data_files_unsafely():
    problems = [f"{path.relative_to(REPO)}:{line}: {what}"
                for path in python_files()
                for line, what in unsafe_calls(ast.parse(path.read_text(), str(path)))
                if (path.relative_to(REPO).as_posix(), what) not in ALLOWED]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_should():
    bad = ("import pickle\nx = torch.load(p)\ny = torch.load(p, weights_only=False)\n"
           "z = np.load(p, allow_pickle=True)\nyaml.load(s, Loader=yaml.Loader)\neval(s)\n"
           "pd.read_pickle(p)\n")
    good = ("x = torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n"
            "yaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n")
    assert len(unsafe_calls(ast.parse(bad))) == 7
    assert unsafe_calls(ast.parse(good)) == []


def test_the_readme_mlflow_ui_listens_on_localhost_only():
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md yet")
    commands = [line for line in readme.read_text().splitlines()
                if re.search(r"\bmlflow (ui|server)\b", line)]
    assert commands, "README.md shows no `mlflow ui` command"
    for line in commands:
        assert re.search(r"--host[ =]127\.0\.0\.1\b", line), line
        assert "0.0.0.0" not in line, line
