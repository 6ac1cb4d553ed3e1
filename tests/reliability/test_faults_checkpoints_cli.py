"""Faults of issue 16, class "inputs to the CLI and checkpoints".

Checkpoints: a checkpoint's metadata goes through one validation (models.check_checkpoint)
before any layer is built: model_config through params.yaml's own typed, range-checked builder,
with size limits (an embedding_dim of 10**9 would allocate gigabytes), and the stored threshold,
image_size, num_classes, classes, ... by type and range. Each bad file, edited from a real tiny
checkpoint, goes through `retrieval compare` in-process: exit 2, one line naming the file and
the key, no figure, no temporary file, and no network was built (EmbeddingNet is replaced by a
trap).

Architecture against params.yaml: train_unfrozen (init: frozen), evaluate and gradcam_segment
refuse a models/<stage>/best.pt of another architecture or image size than params.yaml
describes, naming the differing keys and the stage to re-run, before any training or writing.

CLI arguments: every argument of compare, search and segment is checked before a model is
loaded (models.load_checkpoint_file is replaced by a trap): figure extensions, folders given as
files and files as folders, an output that is one of the inputs, numbers out of range, devices,
argparse's own errors (one line too). Nothing is written and inputs stay intact.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from retrieval import cli, models
from retrieval.config import ModelConfig
from tests.conftest import make_repo
from tests.reliability.conftest import assert_one_line_error, run_script

IMAGE_SIZE = 32
TINY = ModelConfig(weights="none", backbone="cifar_resnet", cifar_n=1, hidden_dim=8,
                   embedding_dim=4)


def leftovers(folder: Path) -> list[Path]:
    """Temporary files an interrupted atomic write would leave behind."""
    return [*folder.rglob(".*.tmp"), *folder.rglob(".*.partial-*")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Two images and a valid tiny checkpoint of this project."""
    root = tmp_path_factory.mktemp("faults_cli")
    Image.new("RGB", (40, 36), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (40, 36), (30, 30, 200)).save(root / "b.png")
    torch.manual_seed(0)
    models.save_checkpoint(root / "model.pt", models.EmbeddingNet(TINY),
                           {"threshold": 0.5, "image_size": IMAGE_SIZE, "classes": ["a", "b"],
                            "epoch": 1, "stage": "train_unfrozen"})
    return root


def edited(source: Path, target: Path, edit: Callable[[dict], object]) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


def set_config(**values) -> Callable[[dict], object]:
    return lambda checkpoint: checkpoint["model_config"].update(values)


def set_meta(**values) -> Callable[[dict], object]:
    return lambda checkpoint: checkpoint.update(values)


def not_built(*args, **kwargs):
    raise AssertionError("EmbeddingNet was built from a checkpoint that should be refused")


# --- checkpoint metadata ------------------------------------------------------------------------

BAD_CHECKPOINTS = [
    pytest.param(set_config(projection=64), "unknown key 'model_config.projection'",
                 id="unknown-config-key"),
    pytest.param(set_config(embedding_dim=10**9),
                 "model_config.embedding_dim (1000000000) must be in [2, 8192]",
                 id="embedding-dim-1e9"),
    pytest.param(set_config(hidden_dim=10**7),
                 "model_config.hidden_dim (10000000) must be in [1, 8192]",
                 id="hidden-dim-1e7"),
    pytest.param(set_config(cifar_n=10**6), "model_config.cifar_n (1000000) must be in [1, 200]",
                 id="cifar-n-1e6"),
    pytest.param(set_config(embedding_dim=1), "model_config.embedding_dim (1) must be in [2, 8192]",
                 id="embedding-dim-1"),
    pytest.param(set_config(hidden_dim="8"), "model_config.hidden_dim must be an integer",
                 id="hidden-dim-string"),
    pytest.param(set_config(pooling="sum"), "model_config.pooling is 'sum'", id="pooling-unknown"),
    pytest.param(set_config(backbone="vgg16"), "model_config.backbone ('vgg16') is not one of",
                 id="backbone-unknown"),
    pytest.param(set_config(dropout=1.5), "model_config.dropout must be in [0, 1)",
                 id="dropout-1.5"),
    pytest.param(set_config(normalize="yes"), "model_config.normalize must be true or false",
                 id="normalize-string"),
    pytest.param(set_meta(model_config=[128]), "model_config must be a mapping, found list",
                 id="model-config-list"),
    pytest.param(lambda c: c.pop("model_config"), "not a checkpoint written by this project",
                 id="no-model-config"),
    pytest.param(lambda c: c.pop("state_dict"), "state_dict must map parameter names to tensors",
                 id="no-state-dict"),
    pytest.param(set_meta(state_dict={"head.0.weight": [1.0]}),
                 "state_dict must map parameter names to tensors, found 'head.0.weight': list",
                 id="state-dict-of-lists"),
    pytest.param(set_meta(threshold=math.nan), "threshold is nan", id="threshold-nan"),
    pytest.param(set_meta(threshold=-0.5), "threshold is -0.5", id="threshold-negative"),
    pytest.param(set_meta(threshold="0.5"), "threshold is '0.5'", id="threshold-string"),
    pytest.param(set_meta(image_size=0), "image_size is 0, expected an integer in [16, 1024]",
                 id="image-size-0"),
    pytest.param(set_meta(image_size=100_000), "image_size is 100000", id="image-size-100000"),
    pytest.param(set_meta(image_size=32.0), "image_size is 32.0", id="image-size-float"),
    pytest.param(set_meta(num_classes=-1), "num_classes is -1", id="num-classes-negative"),
    pytest.param(set_meta(num_classes=10**9), "num_classes is 1000000000", id="num-classes-1e9"),
    pytest.param(set_meta(classes="abc"), "classes is 'abc', expected a list of class names",
                 id="classes-string"),
    pytest.param(set_meta(epoch=-3), "epoch is -3", id="epoch-negative"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_refused_before_the_network_is_built(workspace, tmp_path,
                                                                  monkeypatch, edit, message):
    bad = edited(workspace / "model.pt", tmp_path / "bad.pt", edit)
    monkeypatch.setattr(models, "EmbeddingNet", not_built)
    figure = tmp_path / "pair.png"
    result = run_script("retrieval", ["compare", str(workspace / "a.png"),
                                      str(workspace / "b.png"), "--model", str(bad),
                                      "--output", str(figure)])
    assert_one_line_error(result, str(bad), message)
    assert not figure.exists() and not leftovers(tmp_path)


def test_a_checkpoint_that_is_a_list_is_refused(workspace, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    result = run_script("retrieval", ["compare", str(workspace / "a.png"),
                                      str(workspace / "b.png"), "--model",
                                      str(tmp_path / "list.pt"), "--output",
                                      str(tmp_path / "pair.png")])
    assert_one_line_error(result, "list.pt", "not a checkpoint written by this project")
    assert not (tmp_path / "pair.png").exists()


def test_the_valid_checkpoint_still_compares(workspace, tmp_path):
    """The control: the unedited file passes every check and the command writes its figure."""
    figure = tmp_path / "pair.png"
    result = run_script("retrieval", ["compare", str(workspace / "a.png"),
                                      str(workspace / "b.png"), "--model",
                                      str(workspace / "model.pt"), "--output", str(figure)])
    assert result.returncode == 0, result.stderr
    assert figure.is_file() and "decision:" in result.stdout


@pytest.mark.parametrize(("params_change", "named"), [
    pytest.param({"backbone": "resnet18"}, "model.backbone: 'cifar_resnet' vs 'resnet18'",
                 id="expected-backbone-differs"),
    pytest.param({"embedding_dim": 16}, "model.embedding_dim: 4 vs 16",
                 id="expected-embedding-dim-differs"),
    pytest.param({"pooling": "gem", "normalize": False},
                 "model.pooling: 'avg' vs 'gem'; model.normalize: True vs False",
                 id="expected-pooling-and-normalize-differ"),
])
def test_load_model_refuses_another_architecture_than_expected(workspace, monkeypatch,
                                                               params_change, named):
    from dataclasses import replace

    monkeypatch.setattr(models, "EmbeddingNet", not_built)
    with pytest.raises(models.CheckpointError) as error:
        models.load_model(workspace / "model.pt", expected=replace(TINY, **params_change),
                          image_size=IMAGE_SIZE, writer="train_frozen")
    assert named in str(error.value) and "`dvc repro train_frozen`" in str(error.value)


def test_only_the_weights_origin_may_differ_from_params(workspace):
    """model.weights says where the initial weights came from; the checkpoint replaces them."""
    from dataclasses import replace

    net, _ = models.load_model(workspace / "model.pt", expected=replace(TINY, weights="imagenet"),
                               image_size=IMAGE_SIZE, writer="train_frozen")
    assert net.embedding_dim == 4


def test_params_cannot_ask_for_a_network_too_large_to_build():
    from retrieval.config import ParamsError, params_from_dict

    with pytest.raises(ParamsError, match=r"model.embedding_dim \(1000000000\) must be in "
                       r"\[2, 8192\]: change model.embedding_dim in params.yaml"):
        params_from_dict({"model": {"embedding_dim": 10**9}})


# --- CLI arguments ------------------------------------------------------------------------------

def not_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


def compare_args(ws: Path, out: Path, **change) -> list[str]:
    args = {"image_a": ws / "a.png", "image_b": ws / "b.png", "--model": ws / "model.pt",
            "--output": out / "pair.png", **change}
    return ["compare", str(args["image_a"]), str(args["image_b"]), "--model",
            str(args["--model"]), "--output", str(args["--output"]),
            *[str(v) for v in args.get("extra", [])]]


def search_args(ws: Path, out: Path, **change) -> list[str]:
    args = {"image": ws / "a.png", "--k": 3, "--index": out / "gallery.faiss",
            "--model": ws / "model.pt", "--output": out / "found.png", **change}
    return ["search", str(args["image"]), *[str(v) for key in ("--k", "--index", "--model",
                                                               "--output")
                                            for v in (key, args[key])],
            *[str(v) for v in args.get("extra", [])]]


def segment_args(ws: Path, out: Path, **change) -> list[str]:
    images = out / "images"
    images.mkdir(exist_ok=True)
    (images / "c.png").write_bytes((ws / "a.png").read_bytes())
    args = {"images": images, "--out": out / "masks", "--model": ws / "model.pt", **change}
    return ["segment", str(args["images"]), "--out", str(args["--out"]), "--model",
            str(args["--model"]), *[str(v) for v in args.get("extra", [])]]


def a_file(out: Path, name: str = "notes.txt") -> Path:
    (out / name).write_text("a file the user keeps\n")
    return out / name


def a_folder(out: Path, name: str = "folder") -> Path:
    (out / name).mkdir(exist_ok=True)
    return out / name


# (argv builder given (workspace, tmp_path), fragments the one line must hold)
BAD_ARGUMENTS = [
    pytest.param(lambda ws, out: compare_args(ws, out, **{"--output": out / "pair.txt"}),
                 ("--output", "has '.txt'", ".png, .jpg"), id="compare-output-txt"),
    pytest.param(lambda ws, out: compare_args(ws, out, **{"--output": out / "pair"}),
                 ("--output", "has no extension"), id="compare-output-no-extension"),
    pytest.param(lambda ws, out: compare_args(ws, out, **{"--output": out / "fig.pgf"}),
                 ("--output", "has '.pgf'"), id="compare-output-pgf-needs-latex"),
    pytest.param(lambda ws, out: compare_args(ws, out, **{"--output": a_folder(out)}),
                 ("--output", "is an existing folder"), id="compare-output-existing-folder"),
    pytest.param(lambda ws, out: compare_args(ws, out,
                                              **{"--output": a_file(out) / "pair.png"}),
                 ("--output", "notes.txt is a file, not a folder"),
                 id="compare-output-below-a-file"),
    pytest.param(lambda ws, out: compare_args(ws, out, **{"--output": ws / "a.png"}),
                 ("--output", "is one of the inputs"), id="compare-output-is-image-a"),
    pytest.param(lambda ws, out: compare_args(ws, out, image_b=a_folder(out)),
                 ("image file", "is not a file but a folder"), id="compare-image-is-a-folder"),
    pytest.param(lambda ws, out: compare_args(ws, out, image_a=out / "missing.jpg"),
                 ("image file", "missing.jpg does not exist"), id="compare-image-missing"),
    pytest.param(lambda ws, out: compare_args(ws, out, **{"--model": a_folder(out, "models")}),
                 ("--model file", "is not a file but a folder"), id="compare-model-is-a-folder"),
    pytest.param(lambda ws, out: compare_args(ws, out, extra=["--device", "gpu"]),
                 ("--device is 'gpu'", "auto, cpu or cuda[:N]"), id="compare-device-gpu"),
    pytest.param(lambda ws, out: compare_args(ws, out, extra=["--threshold", "0.3"]),
                 ("retrieval: unrecognized arguments: --threshold", "--help"),
                 id="compare-unknown-option"),
    pytest.param(lambda ws, out: ["compare", str(ws / "a.png")],
                 ("retrieval compare: the following arguments are required: IMAGE_B",),
                 id="compare-missing-image-b"),
    pytest.param(lambda ws, out: search_args(ws, out, **{"--k": 0}), ("--k must be >= 1",),
                 id="search-k-0"),
    pytest.param(lambda ws, out: search_args(ws, out, **{"--k": "ten"}),
                 ("retrieval search: argument -k/--k: invalid int value: 'ten'",),
                 id="search-k-not-a-number"),
    pytest.param(lambda ws, out: search_args(ws, out, **{"--index": a_folder(out, "index")}),
                 ("--index", "is a folder", ".faiss"), id="search-index-is-a-folder"),
    pytest.param(lambda ws, out: search_args(ws, out, **{"--output": out / "found.html"}),
                 ("--output", "has '.html'"), id="search-output-html"),
    pytest.param(lambda ws, out: search_args(ws, out, **{"--output": ws / "model.pt"}),
                 ("--output", "has '.pt'"), id="search-output-pt"),
    pytest.param(lambda ws, out: search_args(ws, out, image=out / "none.png"),
                 ("image file", "does not exist"), id="search-image-missing"),
    pytest.param(lambda ws, out: segment_args(ws, out, **{"--out": a_file(out, "masks")}),
                 ("--out", "is an existing file", "give a folder"),
                 id="segment-out-is-an-existing-file"),
    pytest.param(lambda ws, out: segment_args(ws, out,
                                              **{"--out": a_file(out) / "masks"}),
                 ("--out", "cannot be created", "is a file, not a folder"),
                 id="segment-out-below-a-file"),
    pytest.param(lambda ws, out: segment_args(ws, out, images=ws / "a.png"),
                 ("images folder", "is not a folder but a file"),
                 id="segment-images-is-a-file"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--masks", a_file(out)]),
                 ("masks folder", "is not a folder but a file"), id="segment-masks-is-a-file"),
    pytest.param(lambda ws, out: segment_args(ws, out,
                                              extra=["--prototypes", a_folder(out, "p.npz")]),
                 ("prototypes file", "is not a file but a folder"),
                 id="segment-prototypes-is-a-folder"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--image-size", "0"]),
                 ("--image-size must be in [16, 1024] px, got 0",), id="segment-image-size-0"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--image-size", "100000"]),
                 ("--image-size must be in [16, 1024] px, got 100000",),
                 id="segment-image-size-100000"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--batch-size", "0"]),
                 ("--batch-size must be >= 1, got 0",), id="segment-batch-size-0"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--binarize", "top_percent:200"]),
                 ("binarisation 'top_percent:200' (--binarize)",), id="segment-binarize-200"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--refine", "grabcut:90/20"]),
                 ("refinement 'grabcut:90/20' (--refine)",), id="segment-refine-reversed"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--method", "saliency"]),
                 ("retrieval segment: argument --method: invalid choice: 'saliency'",),
                 id="segment-method-unknown"),
    pytest.param(lambda ws, out: segment_args(ws, out, extra=["--device", "cuda:x"]),
                 ("--device is 'cuda:x'",), id="segment-device-cuda-x"),
    pytest.param(lambda ws, out: ["segment", str(a_folder(out, "images"))],
                 ("retrieval segment: the following arguments are required: --out",),
                 id="segment-out-missing"),
]


@pytest.mark.parametrize(("argv", "fragments"), BAD_ARGUMENTS)
def test_a_bad_argument_is_refused_before_any_work(workspace, tmp_path, monkeypatch, argv,
                                                   fragments):
    monkeypatch.setattr(models, "load_checkpoint_file", not_loaded)
    args = argv(workspace, tmp_path)
    before = {p: p.read_bytes() for p in [*workspace.iterdir(), *tmp_path.rglob("*")]
              if p.is_file()}
    result = run_script("retrieval", args)
    assert_one_line_error(result, *fragments)
    after = {p: p.read_bytes() for p in [*workspace.iterdir(), *tmp_path.rglob("*")]
             if p.is_file()}
    assert after == before  # nothing written, nothing overwritten (a.png, notes.txt, model.pt)
    assert not (tmp_path / "masks").is_dir() and not leftovers(tmp_path)


def test_every_figure_format_offered_is_one_matplotlib_writes():
    from matplotlib.backend_bases import FigureCanvasBase

    assert set(cli.FIGURE_FORMATS) <= set(FigureCanvasBase.get_supported_filetypes())


def test_an_upper_case_figure_extension_is_written(workspace, tmp_path):
    figure = tmp_path / "PAIR.PNG"
    result = run_script("retrieval", compare_args(workspace, tmp_path, **{"--output": figure}))
    assert result.returncode == 0, result.stderr
    assert Image.open(figure).format == "PNG"


# --- a checkpoint of another architecture in the pipeline ---------------------------------------

@pytest.fixture(scope="module")
def split_repo(tmp_path_factory, mlflow_db_template) -> Path:
    """A tiny project copy (default EfficientNet-Lite0 in params.yaml) with prepare and split
    run, where models/train_frozen/best.pt is a valid cifar_resnet checkpoint of this project:
    what a copied file or `python stages/train_unfrozen.py` after a params edit would meet."""
    repo = make_repo(tmp_path_factory.mktemp("faults_arch"), mlflow_db_template)
    for stage in ("prepare", "split"):
        result = run_script(f"stages/{stage}.py", cwd=repo, env={"MLFLOW_TRACKING_URI": None})
        assert result.returncode == 0, result.stderr
    for stage in ("train_frozen", "train_unfrozen"):
        (repo / "models" / stage).mkdir(parents=True)
        models.save_checkpoint(repo / "models" / stage / "best.pt", models.EmbeddingNet(TINY),
                               {"threshold": 0.5, "image_size": 48, "stage": stage})
    return repo


def mlflow_runs(repo: Path) -> int:
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def outputs_state(repo: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file a stage could write (the committed plots/ included)."""
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in ("data", "models", "plots", "metrics") for p in
            (repo / folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("stage", [
    pytest.param("train_unfrozen", id="train-unfrozen-from-another-architecture"),
    pytest.param("evaluate", id="evaluate-another-architecture"),
    pytest.param("gradcam_segment", id="gradcam-segment-another-architecture"),
])
def test_a_stage_refuses_a_checkpoint_of_another_architecture(split_repo, stage):
    before, runs = outputs_state(split_repo), mlflow_runs(split_repo)
    result = run_script(f"stages/{stage}.py", cwd=split_repo, env={"MLFLOW_TRACKING_URI": None})
    assert_one_line_error(result, "models/train_frozen/best.pt holds another model than "
                          "params.yaml describes", "model.backbone: 'cifar_resnet' vs "
                          "'efficientnet_lite0'", "model.embedding_dim: 4 vs 16",
                          "re-run train_frozen (`dvc repro train_frozen`)")
    # Nothing written or touched (models/train_unfrozen/best.pt included), no temporary file.
    assert outputs_state(split_repo) == before
    assert not leftovers(split_repo)
    assert mlflow_runs(split_repo) == runs  # the store is readable and no run was started


def test_an_image_that_breaks_a_dataset_rule_is_refused_by_the_commands_in_one_line(
        workspace, tmp_path):
    # The same loader as prepare's (data.load_rgb): a 3x60000 strip would allocate gigabytes
    # when resized; the message gives the rule once, without repeating the path.
    strip = tmp_path / "strip.png"
    Image.new("L", (3, 60_000)).save(strip)
    result = run_script("retrieval", compare_args(workspace, tmp_path, image_a=strip))
    line = assert_one_line_error(result, f"{strip} cannot be used: aspect ratio 1:20000")
    assert line.count(str(strip)) == 1
    assert not (tmp_path / "pair.png").exists() and not leftovers(tmp_path)
