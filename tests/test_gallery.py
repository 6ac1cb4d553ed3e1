"""`retrieval index` and `retrieval search` on a folder of real image files, with a tiny untrained
checkpoint: the saved gallery (retrieval.gallery), the query-itself flag, approximate indexes,
default paths from another folder, and one-line errors."""

import json
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval import cli, data, gallery, models, search
from retrieval.config import ModelConfig
from tests.conftest import call_cli as call

IMAGE_SIZE = 32
CLASSES = {"red": ((220, 30, 30), "rectangle"), "blue": ((30, 60, 220), "ellipse"),
           "green": ((30, 200, 60), "rectangle")}


def draw(path, colour, shape, i):
    image = Image.new("RGB", (48 + 6 * i, 40), (240, 240, 240))
    getattr(ImageDraw.Draw(image), shape)((6 + 2 * i, 6, 34 + 3 * i, 32), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """photos/<class>/<i>.png (3 classes x 3), a byte copy of red/0.png, a non-image file; a
    tiny checkpoint; and the exact index of the folder, built by the command."""
    root = tmp_path_factory.mktemp("gallery")
    photos = root / "photos"
    for name, (colour, shape) in CLASSES.items():
        for i in range(3):
            draw(photos / name / f"{i}.png", colour, shape, i)
    shutil.copy(photos / "red" / "0.png", photos / "red" / "copy of 0.png")
    (photos / "blue" / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    net = models.EmbeddingNet(ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1,
                                          hidden_dim=16, embedding_dim=8)).eval()
    models.save_checkpoint(root / "model.pt", net, {"threshold": 0.4, "image_size": IMAGE_SIZE,
                                                    "classes": list(CLASSES), "stage": "test"})
    index = root / "index" / "photos.faiss"
    outcome = cli_result(["index", photos, "--model", root / "model.pt", "--out", index])
    return types.SimpleNamespace(root=root, photos=photos, model=root / "model.pt",
                                 index=index, outcome=outcome)


def cli_result(argv):
    """Run the command outside capsys (module fixtures cannot use it): (code, out, err)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def test_index_writes_the_manifest_and_the_card(folder):
    code, out, err = folder.outcome
    assert code == 0, err
    assert "indexed 10 images, 3 classes" in out and "exact search" in out
    assert "skipped 1 file(s) that are not images: blue/notes.txt" in err
    manifest = pd.read_csv(folder.index.with_suffix(".csv"), keep_default_na=False)
    assert list(manifest.columns) == ["path", "label", "file", "content_hash"]
    assert manifest["path"].tolist() == sorted(manifest["path"])  # id order = walk order
    row = manifest.set_index("path").loc["green/2.png"]
    assert row["label"] == "green" and row["file"] == str((folder.photos / "green" /
                                                           "2.png").resolve())
    assert row["content_hash"] == data.content_hash(folder.photos / "green" / "2.png")
    card = json.loads(folder.index.with_suffix(".json").read_text())
    assert card["index"] == "Flat" and card["search_params"] == {}
    assert (card["items"], card["dim"], card["threshold"], card["image_size"]) == (10, 8, 0.4,
                                                                                  IMAGE_SIZE)
    assert search.load_index(folder.index).ntotal == 10


def test_search_flags_the_query_itself(folder, capsys, tmp_path):
    query = folder.photos / "red" / "0.png"
    code, out, err = call(["search", query, "-k", 4, "--model", folder.model, "--index",
                           folder.index, "--output", tmp_path / "found.png"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "distance" in line]
    assert len(lines) == 4
    # red/0.png and its byte copy are both "the query itself", at distance ~0, first.
    assert sorted(line.split("  ")[-2].strip() for line in lines[:2]) == ["red/0.png",
                                                                          "red/copy of 0.png"]
    assert all(line.endswith("(the query itself)") for line in lines[:2])
    assert not any("(the query itself)" in line for line in lines[2:])
    assert float(lines[1].split("distance")[1].split()[0]) == pytest.approx(0, abs=1e-3)
    assert (tmp_path / "found.png").is_file()


def test_exclude_self_drops_the_query_and_keeps_k(folder, capsys, tmp_path):
    query = folder.photos / "red" / "0.png"
    code, out, err = call(["search", query, "--k", 3, "--exclude-self", "--model", folder.model,
                           "--index", folder.index, "--output", tmp_path / "f.png"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "distance" in line]
    assert len(lines) == 3 and "query itself" not in "".join(lines)
    assert not any("red/0.png" in line or "copy of 0" in line for line in lines)


def test_gallery_search_returns_ranked_rows(folder):
    loaded = gallery.load(folder.index)
    query_hash = data.content_hash(folder.photos / "blue" / "1.png")
    vector = loaded.index.reconstruct(loaded.manifest.index[
        loaded.manifest["path"] == "blue/1.png"][0])
    found = loaded.search(vector, 5, query_hash)
    assert found.columns.tolist() == ["rank", "id", "path", "label", "file", "distance",
                                      "same_image"]
    assert found["rank"].tolist() == [1, 2, 3, 4, 5]
    assert found.iloc[0]["path"] == "blue/1.png" and found.iloc[0]["same_image"]
    assert found["distance"].is_monotonic_increasing and found["same_image"].sum() == 1
    six = loaded.search(vector, 6, query_hash)
    kept = loaded.search(vector, 5, query_hash, exclude_self=True)
    assert kept["path"].tolist() == six["path"].tolist()[1:]
    assert kept["rank"].tolist() == [1, 2, 3, 4, 5] and not kept["same_image"].any()


def clustered(n, dim, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    x = centres[rng.integers(40, size=n)] + 0.3 * rng.standard_normal((n, dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_an_approximate_gallery_agrees_with_exact_search(folder, tmp_path):
    vectors, queries = clustered(4000, 16, 0), clustered(200, 16, 1)
    manifest = pd.DataFrame({"path": [f"{i}.png" for i in range(4000)], "label": "",
                             "file": "", "content_hash": ""})
    built, recall = gallery.build(vectors, manifest, folder.model, IMAGE_SIZE, 0.4,
                                  search.default_factory(4000))
    assert built.card["index"] == "IVF102,Flat" and recall >= 0.95
    assert set(built.card["search_params"]) == {"nprobe"}
    gallery.save(built, tmp_path / "approx.faiss")
    loaded = gallery.load(tmp_path / "approx.faiss")  # the card's nprobe is set on load
    assert faiss_nprobe(loaded.index) == built.card["search_params"]["nprobe"]
    _, exact = search.knn(queries, vectors, 1)
    approximate = [loaded.search(q, 1)["id"].iloc[0] for q in queries]
    assert np.mean(np.array(approximate) == exact[:, 0]) >= 0.9


def faiss_nprobe(index):
    import faiss

    return faiss.extract_index_ivf(index).nprobe


def test_approximate_on_a_small_folder_falls_back_to_exact(folder, capsys, tmp_path):
    code, out, err = call(["index", folder.photos, "--approximate", "--model", folder.model,
                           "--out", tmp_path / "small.faiss"], capsys)
    assert code == 0, err
    assert "too few to train an approximate" in err and "exact search" in out
    assert json.loads((tmp_path / "small.json").read_text())["index"] == "Flat"


def test_default_paths_resolve_against_the_project_root(folder, capsys, tmp_path, monkeypatch):
    """From a sub-folder of a project (dvc.yaml at its top), no --model and no --index."""
    project = tmp_path / "project"
    (project / "deep" / "er").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / cli.DEFAULT_MODEL).parent.mkdir(parents=True)
    shutil.copy(folder.model, project / cli.DEFAULT_MODEL)
    for source, target in zip(gallery.files(folder.index), gallery.files(
            project / cli.DEFAULT_INDEX), strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    shutil.copy(folder.photos / "green" / "1.png", project / "deep" / "er" / "q.png")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(project / "deep" / "er")
    code, out, err = call(["search", "q.png", "-k", 2, "--output", "s.png"], capsys)
    assert code == 0, err
    assert "green/1.png  (the query itself)" in out and (project / "deep/er/s.png").is_file()


def test_a_missing_default_says_where_it_looked(capsys, tmp_path, monkeypatch, folder):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    code, _, err = call(["search", folder.photos / "red" / "1.png", "--output",
                         tmp_path / "x.png"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / cli.DEFAULT_MODEL} does not exist" in err and "dvc repro" in err


def broken(case, folder, tmp_path):
    """An index path whose files are wrong in one way (copies of the good index)."""
    target = tmp_path / "bad.faiss"
    for source, copy in zip(gallery.files(folder.index), gallery.files(target), strict=True):
        shutil.copy(source, copy)
    if case == "manifest_rows":
        manifest = pd.read_csv(target.with_suffix(".csv"))
        manifest.iloc[:-1].to_csv(target.with_suffix(".csv"), index=False)
    elif case == "dimension":
        search.save_index(search.build_index(np.eye(10, 4, dtype=np.float32)), target)
        card = json.loads(target.with_suffix(".json").read_text())
        target.with_suffix(".json").write_text(json.dumps({**card, "dim": 4}))
    elif case == "card_items":
        card = json.loads(target.with_suffix(".json").read_text())
        target.with_suffix(".json").write_text(json.dumps({**card, "items": 99}))
    elif case == "foreign_index":
        target.write_bytes(b"not a faiss index")
    elif case == "no_manifest":
        target.with_suffix(".csv").unlink()
    elif case == "missing":
        target = tmp_path / "nothing.faiss"
    return target


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "no gallery index at"),
    ("no_manifest", "bad.csv (the manifest of"),
    ("manifest_rows", "bad.csv lists 9 images but"),
    ("dimension", "holds 4-d vectors but"),
    ("card_items", "bad.json says items 99 but"),
    ("foreign_index", "is not a readable FAISS index"),
])
def test_search_with_a_bad_index_is_one_line(folder, capsys, tmp_path, case, message):
    index = broken(case, folder, tmp_path)
    code, _, err = call(["search", folder.photos / "red" / "1.png", "--model", folder.model,
                         "--index", index, "--output", tmp_path / "x.png"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("case", "message"), [
    ("empty", "contains no images Pillow can read"),
    ("only_text", "contains no images Pillow can read (only 1 other files: a.txt)"),
    ("not_faiss", "must end in .faiss"),
    ("bad_factory", "index factory 'IVFzz' is not usable"),
    ("too_many_lists", "has 4096 inverted lists but only 10 vectors"),
])
def test_index_bad_input_is_one_line(folder, capsys, tmp_path, case, message):
    photos, out, extra = folder.photos, tmp_path / "i.faiss", []
    if case in ("empty", "only_text"):
        photos = tmp_path / "empty"
        photos.mkdir()
        if case == "only_text":
            (photos / "a.txt").write_text("text")
    elif case == "not_faiss":
        out = tmp_path / "i.index"
    else:
        extra = ["--approximate", "IVFzz" if case == "bad_factory" else "IVF4096,Flat"]
    code, _, err = call(["index", photos, *extra, "--model", folder.model, "--out", out],
                        capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not any(tmp_path.glob("i.*"))
