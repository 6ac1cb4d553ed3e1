"""The `retrieval` command (also `python -m retrieval`): the trained model on your own images.

    retrieval compare IMAGE_A IMAGE_B [--model PATH] [--output compare.png | --show]
        distance, similarity and the same/different decision at the model's threshold:
        evaluate's (saved beside the checkpoint as threshold.json) when it was chosen for this
        very checkpoint, else the one stored in the checkpoint (retrieval.threshold); the
        `threshold:` line says which
    retrieval index FOLDER --out INDEX.faiss [--model PATH] [--approximate [FACTORY]]
                    [--target-recall 0.95] [--batch-size 32] [--device cpu]
        embed every image under FOLDER (recursively) into a searchable gallery: INDEX.faiss,
        its manifest INDEX.csv and its card INDEX.json (see retrieval.gallery); exact search
        unless --approximate (FAISS IVF sized for the folder, or any index_factory string)
    retrieval search IMAGE [-k 8] [--exclude-self] [--model PATH]
                     [--index data/index/gallery.faiss] [--output search.png | --show]
        the k most similar gallery images, from an index of `retrieval index` or the test
        gallery that `dvc repro evaluate` saves; a result with the query's bytes (same content
        hash) is flagged "the query itself", or dropped with --exclude-self
    retrieval segment IMAGES --out MASKS [--masks GT] [--model PATH] [--prototypes NPZ]
                      [--method gradcam] [--binarize otsu]
        a mask per image from the model's saliency, with the library in retrieval.segmentation
    retrieval serve [--index INDEX] [--model PATH] [--host 127.0.0.1] [--port 8000] [--k 8]
        a local search page: upload or pick an image, page through the test queries

The default --model, --index and --prototypes are relative to the project root (``project_root``:
the nearest folder holding dvc.yaml from the current one up, else the checkout this package runs
from), so they work from any folder; paths you give are relative to the current folder. Every
argument is checked before any work (``check_compare``, ``check_index``, ``check_search``,
``check_segment``): a missing file, a folder where a file belongs or the reverse, a figure
extension matplotlib cannot write, a number out of range, a file that is not an image or an
unreadable model file ends with a one-line error and exit code 2, and nothing is written. A
missing default file says where it was looked for and what writes it.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval import outputs, paths, workspace
from retrieval.config import DEVICE_PATTERN, IMAGE_SIZES
from retrieval.outputs import UserError

# torch, FAISS and matplotlib load inside the commands, so `retrieval --help` starts at once.
if TYPE_CHECKING:
    import socket

    import faiss
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from retrieval.models import EmbeddingNet

DEFAULT_MODEL = paths.checkpoint("train_unfrozen")
DEFAULT_INDEX = paths.GALLERY_INDEX  # gallery.csv and gallery.json lie next to it
# What to run when a default file is missing.
MAKES = {"model": "`dvc repro` (it trains the model)",
         "index": "`dvc repro evaluate`, or index a folder with `retrieval index FOLDER --out "
                  "INDEX.faiss` and pass --index INDEX.faiss"}
RESULTS_PER_ROW = 8
SHOWN_SIDE = 256  # px: images in the figures are shown at most this big
# What --output may end in: formats matplotlib writes with the Agg backend and Pillow, no LaTeX
# (pgf) and no raw buffers (rgba) that no viewer opens.
FIGURE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg", "svgz", "eps", "ps", "tif", "tiff", "webp")


class UsageError(UserError):
    """A command-line argument argparse refused (unknown option, not a number, ...)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input
    (argparse would print the whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; user errors exit with code 2."""
    outputs.run_main(lambda: run(sys.argv[1:] if argv is None else list(argv)))


def run(argv: list[str]) -> None:
    if argv and argv[0] == "segment":
        segment(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return
    args.handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="retrieval", description="Image similarity and retrieval with the trained model.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    compare = commands.add_parser("compare", help="how similar are two images?",
                                  description="Embed two images and decide same/different "
                                  "class at the model's threshold: the one evaluate chose for "
                                  "this checkpoint (threshold.json beside it, matched by "
                                  "SHA-256), else the one stored in the checkpoint at training "
                                  "time. The output says which.")
    compare.add_argument("image_a", type=Path, metavar="IMAGE_A")
    compare.add_argument("image_b", type=Path, metavar="IMAGE_B")
    _common(compare, "compare.png")
    compare.set_defaults(handler=compare_command)

    find = commands.add_parser("search", help="the most similar gallery images",
                               description="Embed a query image and show its nearest gallery "
                               "images, from an index that `retrieval index` writes or the test "
                               "gallery of `dvc repro evaluate`. A result with the same bytes "
                               "as the query (content hash) is flagged as the query itself. An "
                               "approximate index is searched with the nprobe/efSearch stored "
                               "in its card.")
    find.add_argument("image", type=Path, metavar="IMAGE")
    find.add_argument("-k", "--k", type=int, default=8, help="how many results (default 8)")
    find.add_argument("--index", type=Path, default=None,
                      help=f"the gallery's .faiss file (default {DEFAULT_INDEX} under the "
                      "project root); its manifest .csv and card .json lie beside it")
    find.add_argument("--exclude-self", action="store_true",
                      help="leave out results that are the query itself (same file content)")
    _common(find, "search.png")
    find.set_defaults(handler=search_command)

    index = commands.add_parser(
        "index", help="index a folder of images for `retrieval search`",
        description="Embed every image under FOLDER (sub-folders too; other files are listed "
                    "as skipped) and write INDEX.faiss with its manifest INDEX.csv (path, "
                    "label: the class sub-folder when every image lies in one, file, content "
                    "hash) and card INDEX.json (model, index type, search parameters, "
                    "threshold). Exact search unless --approximate.")
    index.add_argument("folder", type=Path, metavar="FOLDER")
    index.add_argument("--out", type=Path, required=True, metavar="INDEX",
                       help="the index file to write, ending in .faiss")
    index.add_argument("--model", type=Path, default=None,
                       help=f"checkpoint (default {DEFAULT_MODEL} under the project root, the "
                       "fine-tuned model)")
    index.add_argument("--approximate", nargs="?", const="auto", default=None,
                       metavar="FACTORY",
                       help="build an approximate index: alone, FAISS IVF with about "
                       "4*sqrt(N) lists (exact when the folder is too small to train one); or "
                       "any faiss.index_factory string, e.g. IVF1024,Flat, HNSW32 or "
                       "OPQ32,IVF4096,PQ32. Give FOLDER before it.")
    index.add_argument("--target-recall", type=float, default=0.95,
                       help="with --approximate: the recall@10 (against exact search, on up to "
                       "1000 of the folder's images) that the stored nprobe/efSearch must "
                       "reach (default 0.95)")
    index.add_argument("--batch-size", type=int, default=32,
                       help="images embedded at a time (default 32; lower it if out of memory)")
    index.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:N]")
    index.set_defaults(handler=index_command)

    # Listed here for --help; `run` hands its arguments to segment_parser (built lazily).
    commands.add_parser("segment", help="saliency segmentation of a folder of images (see "
                        "`retrieval segment --help`)", add_help=False)

    serve = commands.add_parser("serve", help="a local search page in the browser",
                                description="Start a local web page to search the index with "
                                "an uploaded or picked image and to page through the test "
                                "queries, worst first (FastAPI + uvicorn).")
    serve.add_argument("--index", type=Path, default=DEFAULT_INDEX,
                       help=f"FAISS index to search (default {DEFAULT_INDEX}); its .csv "
                       "manifest and .json card lie next to it")
    serve.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                       help=f"checkpoint the index was built with (default {DEFAULT_MODEL})")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--k", type=int, default=8, help="neighbours per query (default 8)")
    serve.add_argument("--queries", type=Path, default=DEFAULT_QUERIES,
                       help=f"evaluate's per-query table, worst first (default "
                       f"{DEFAULT_QUERIES}); the page says so when it is missing")
    serve.add_argument("--device", default="cpu",
                       help="cpu (default; one image at a time needs no GPU), auto or cuda[:N]")
    serve.set_defaults(handler=serve_command)
    return parser


def _common(parser: argparse.ArgumentParser, figure: str) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint (default {DEFAULT_MODEL} under the project root, the "
                        "fine-tuned model)")
    parser.add_argument("--output", type=Path, default=Path(figure),
                        help=f"where to save the figure (default {figure})")
    parser.add_argument("--show", action="store_true",
                        help="open the figure in a window instead of saving it")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default; one image needs no GPU), auto or cuda[:N]")


# --------------------------------------------------------------------------- default paths


def project_root() -> Path:
    """Where the default paths live: DVC_ROOT inside a DVC stage, else the nearest folder from
    the current one up that holds dvc.yaml, else the checkout this package was loaded from (an
    editable install), else the current folder."""
    if os.environ.get("DVC_ROOT"):
        return workspace.project_root()
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "dvc.yaml").is_file() else here


def default_path(given: Path | None, default: Path, flag: str, made_by: str) -> Path:
    """``given`` as is; else ``default`` under the project root, which must exist (the error
    says where it looked and what writes the file)."""
    if given is not None:
        return given
    root = project_root()
    path = root / default
    if not path.exists():
        raise UserError(f"{flag} not given, and its default {path} does not exist (default paths "
                        f"are relative to the project root {root}): run {made_by} first, or "
                        f"pass {flag}")
    return path


# --------------------------------------------------------------------------- argument checks
# Run before anything is loaded or written, so a bad argument costs nothing and leaves nothing.


def check_input_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{what} {path} is not a file but a folder: give a file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")


def check_input_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        state = "is not a folder but a file" if path.exists() else "does not exist"
        raise UserError(f"{what} {path} {state}: give a folder")


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path``'s parents that exists (the current folder at worst)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path.cwd()


def check_figure_output(path: Path, inputs: tuple[Path, ...]) -> None:
    """--output: a new or existing figure file of a format matplotlib writes, not an input."""
    if path.is_dir():
        raise UserError(f"--output {path} is an existing folder: give a figure file name, "
                        f"e.g. {path / 'figure.png'}")
    if path.suffix[1:].lower() not in FIGURE_FORMATS:
        found = f"'{path.suffix}'" if path.suffix else "no extension"
        raise UserError(f"--output {path} has {found}: end it in one of "
                        f"{', '.join('.' + f for f in FIGURE_FORMATS)}")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UserError(f"--output {path} cannot be created: {ancestor} is a file, not a "
                        "folder")
    for given in inputs:
        if path.exists() and given.exists() and path.samefile(given):
            raise UserError(f"--output {path} is one of the inputs: it would be overwritten by "
                            "the figure; give another file name")


def check_device(name: str) -> None:
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise UserError(f"--device is '{name}': give auto, cpu or cuda[:N]")


def check_compare(args: argparse.Namespace) -> None:
    args.model = default_path(args.model, DEFAULT_MODEL, "--model", MAKES["model"])
    check_input_file(args.image_a, "image file")
    check_input_file(args.image_b, "image file")
    check_input_file(args.model, "--model file")
    check_device(args.device)
    check_figure_output(args.output, (args.image_a, args.image_b, args.model))


def check_search(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise UserError(f"--k must be >= 1, found {args.k}")
    check_input_file(args.image, "image file")
    args.model = default_path(args.model, DEFAULT_MODEL, "--model", MAKES["model"])
    check_input_file(args.model, "--model file")
    args.index = default_path(args.index, DEFAULT_INDEX, "--index", MAKES["index"])
    if args.index.is_dir():
        raise UserError(f"--index {args.index} is a folder: give the .faiss file that "
                        "`retrieval index` or `dvc repro evaluate` writes")
    check_device(args.device)
    check_figure_output(args.output, (args.image, args.model, args.index,
                                      args.index.with_suffix(".csv")))


def check_index(args: argparse.Namespace) -> None:
    """Paths and numbers of `retrieval index`."""
    from retrieval import gallery

    check_input_folder(args.folder, "images folder")
    gallery.check_index_path(args.out)
    if not _existing_ancestor(args.out).is_dir():
        raise UserError(f"--out {args.out} cannot be created: {_existing_ancestor(args.out)} is "
                        "a file, not a folder")
    args.model = default_path(args.model, DEFAULT_MODEL, "--model", MAKES["model"])
    check_input_file(args.model, "--model file")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    check_device(args.device)


def check_segment(args: argparse.Namespace) -> None:
    """Paths, numbers and the --binarize/--refine grammar of `retrieval segment`."""
    from retrieval import cam
    from retrieval.segmentation import refine

    check_input_folder(args.images, "images folder")
    if args.masks is not None:
        check_input_folder(args.masks, "masks folder")
    out = args.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file: give a folder for the masks (it is "
                        "created if missing)")
    if not _existing_ancestor(out).is_dir():
        raise UserError(f"--out {out} cannot be created: {_existing_ancestor(out)} is a file, "
                        "not a folder")
    for other in (args.images, args.masks):
        if other is not None and out.resolve().is_relative_to(other.resolve()):
            raise UserError(f"--out {out} lies inside {other}: write the masks elsewhere")
    if args.model is not None:
        check_input_file(args.model, "--model file")
    if args.prototypes is not None:
        check_input_file(args.prototypes, "prototypes file")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image_size is not None and not IMAGE_SIZES[0] <= args.image_size <= IMAGE_SIZES[1]:
        raise UserError(f"--image-size must be in [{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}] px, got "
                        f"{args.image_size}")
    check_device(args.device)
    if args.binarize is not None:
        _parsed(cam.parse_binarization, "binarisation", args.binarize, "--binarize",
                args.binarize, "--binarize")
    if args.refine is not None:
        _parsed(refine.parse_refinement, "refinement", args.refine, "--refine", args.refine,
                "--refine")


# --------------------------------------------------------------------------- shared steps


def load_image(path: Path) -> Image.Image:
    """An RGB image, or a one-line UserError saying why the file cannot be used."""
    if not path.exists():
        raise UserError(f"image file {path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file: give an image file")
    from PIL import Image

    from retrieval import data

    try:
        return data.load_rgb(path)
    except Image.UnidentifiedImageError as error:
        raise UserError(f"{path} is not an image (Pillow cannot identify it)") from error
    except data.UnusableImage as error:  # decodes, but breaks a dataset rule (README)
        raise UserError(f"{path} cannot be used: {error.reason}") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise UserError(f"{path} cannot be decoded as an image: {reason}") from error


def load_model(path: Path, device: torch.device) -> tuple[EmbeddingNet, dict]:
    from retrieval import models, runtime

    net, checkpoint = models.load_model(path)
    if "image_size" not in checkpoint:
        raise UserError(f"{path} has no image_size: it is not a final checkpoint of this "
                        "project's training stages")
    return runtime.prepare_model(net, device).eval(), checkpoint


def embed(net: EmbeddingNet, images: list[Image.Image], image_size: int,
          device: torch.device) -> np.ndarray:
    """The model's embeddings (N, D: L2-normalised unless model.normalize was false),
    preprocessed exactly like the evaluation images."""
    import torch

    from retrieval import runtime, transforms

    batch = torch.stack([transforms.image_to_input(image, image_size, net.normalization)
                         for image in images])
    with torch.inference_mode():
        return net(runtime.to_device(batch, device)).float().cpu().numpy()


def shown(image: Image.Image) -> np.ndarray:
    import numpy as np

    small = image.copy()
    small.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
    return np.asarray(small)


def open_display(show: bool) -> bool:
    """--show: switch matplotlib (Agg, set by ``outputs.run_main``) to a GUI backend that runs.

    Call before making the figure (switching backends closes open figures). False: save.
    """
    if not show:
        return False
    import matplotlib.pyplot as plt

    for backend in ("macosx", "qtagg", "gtk4agg", "gtk3agg", "tkagg", "wxagg"):
        try:
            plt.switch_backend(backend)
            return True
        except (ImportError, RuntimeError, ValueError):
            continue
    print("no display available: the figure is saved instead", file=sys.stderr)
    return False


def finish(figure: plt.Figure, output: Path, on_screen: bool) -> None:
    """Show the figure in its window, or save it."""
    import matplotlib.pyplot as plt

    if on_screen:
        plt.show()
        return
    outputs.save_figure(figure, output)
    print(f"figure:     {output}")


# --------------------------------------------------------------------------- compare


def compare_command(args: argparse.Namespace) -> None:
    import numpy as np

    from retrieval import runtime, threshold
    from retrieval.plots import evaluation as evaluation_plots

    check_compare(args)
    device = runtime.resolve_device(args.device)
    images = [load_image(args.image_a), load_image(args.image_b)]
    net, checkpoint = load_model(args.model, device)
    decision = threshold.resolve(args.model, checkpoint)
    limit = threshold.required(decision, args.model)
    a, b = embed(net, images, checkpoint["image_size"], device)
    distance = float(np.linalg.norm(a - b))
    similarity = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    same = bool(decision.same(distance))
    space = ("L2-normalised embeddings, 0 to 2" if net.config.normalize
             else "raw embeddings: model.normalize was false")
    print(f"distance:   {distance:.4f}  (Euclidean between {space})")
    print(f"similarity: {similarity:.4f}  (cosine, -1 to 1)")
    print(f"decision:   {'same class' if same else 'different classes'}  "
          f"(same when distance <= threshold {limit:.4f})")
    print(f"threshold:  {decision.source}")
    on_screen = open_display(args.show)
    figure = evaluation_plots.pair_figure(
        shown(images[0]), shown(images[1]), (str(args.image_a), str(args.image_b)), distance,
        similarity, same, limit)
    finish(figure, args.output, on_screen)


# --------------------------------------------------------------------------- search


def search_command(args: argparse.Namespace) -> None:
    check_search(args)
    from retrieval import data, gallery, runtime
    from retrieval.plots import evaluation as evaluation_plots

    device = runtime.resolve_device(args.device)
    query = load_image(args.image)
    found = gallery.load(args.index, rebuild=_rebuild(args.index), base=project_root())
    net, checkpoint = load_model(args.model, device)
    if found.index.d != net.embedding_dim:
        raise UserError(f"{args.index} holds {found.index.d}-d vectors but {args.model} embeds "
                        f"to {net.embedding_dim}-d: pass the model the index was built with "
                        f"(--model) or rebuild it with {_rebuild(args.index)}")
    warn_if_other_model(args.index, args.model)
    vector = embed(net, [query], checkpoint["image_size"], device)
    results = found.search(vector, args.k, data.content_hash(args.image), args.exclude_self)
    print(f"top {len(results)} of {len(found.manifest)} gallery images for {args.image}"
          f"{' (the query itself left out)' if args.exclude_self else ''}:")
    for hit in results.itertuples():
        itself = "  (the query itself)" if hit.same_image else ""
        print(f"{hit.rank:3d}  distance {hit.distance:.4f}  {hit.label:<20}  {hit.path}{itself}")
    on_screen = open_display(args.show)
    query_tile = evaluation_plots.Tile(shown(query), f"query\n{args.image.name[:24]}")
    tiles = [evaluation_plots.Tile(_gallery_image(hit.file),
                                   f"#{hit.rank} {str(hit.label)[:16]}\nd={hit.distance:.3f}"
                                   + ("\n= the query" if hit.same_image else ""))
             for hit in results.itertuples()]
    rows = [[query_tile if start == 0 else None, *tiles[start:start + RESULTS_PER_ROW]]
            for start in range(0, len(tiles), RESULTS_PER_ROW)] or [[query_tile]]
    figure = evaluation_plots.retrieval_grid(
        rows, ["query", *[f"#{i + 1}" for i in range(min(len(tiles), RESULTS_PER_ROW))]],
        f"The {len(tiles)} nearest gallery images (Euclidean distance d)", gaps_after=(0,))
    finish(figure, args.output, on_screen)


def _rebuild(index_path: Path) -> str:
    """What re-creates an index: evaluate's for the test gallery, else `retrieval index`."""
    if index_path.resolve() == (project_root() / DEFAULT_INDEX).resolve():
        return "`dvc repro evaluate`"
    return f"`retrieval index FOLDER --out {index_path}`"


def load_gallery(index_path: Path) -> tuple[pd.DataFrame, faiss.Index]:
    """The gallery manifest (path, label, file, content_hash per index id) and the FAISS index,
    with its card's search parameters set (``gallery.load`` also gives the card)."""
    from retrieval import gallery

    found = gallery.load(index_path, rebuild=_rebuild(index_path), base=project_root())
    return found.manifest, found.index


# --------------------------------------------------------------------------- index


def index_command(args: argparse.Namespace) -> None:
    check_index(args)
    from retrieval import gallery, runtime, search, threshold

    device = runtime.resolve_device(args.device)
    net, checkpoint = load_model(args.model, device)
    if args.approximate not in (None, "auto"):  # a factory string: refuse a bad one before work
        try:
            search.new_index(args.approximate, net.embedding_dim)
        except ValueError as error:
            raise UserError(f"--approximate: {error}") from None
    skipped: list[str] = []
    vectors, files = [], []
    for batch in _decoded_batches(args.folder, args.batch_size, skipped):
        vectors.append(embed(net, [image for _, image in batch], checkpoint["image_size"],
                             device))
        files += [args.folder / relative for relative, _ in batch]
    listed = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    if not files:
        others = f" (only {len(skipped)} other files: {listed})" if skipped else ""
        raise UserError(f"{args.folder} contains no images Pillow can read{others}: give a "
                        "folder of images")
    import numpy as np

    factory = _factory(args.approximate, len(files))
    built, recall = gallery.build(
        np.concatenate(vectors), gallery.folder_manifest(args.folder, files), args.model,
        checkpoint["image_size"], threshold.resolve(args.model, checkpoint).value, factory,
        args.target_recall)
    gallery.save(built, args.out)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not images: {listed}", file=sys.stderr)
    labels = built.manifest["label"]
    classes = f", {labels.nunique()} classes" if (labels != "").all() else ""
    params = ", ".join(f"{k} {v}" for k, v in built.card["search_params"].items())
    how = ("exact search" if factory == search.EXACT else
           f"{factory}, {params}: recall@10 {recall:.3f} against exact search on "
           f"{min(len(files), gallery.TUNING_QUERIES)} of the images")
    if recall < args.target_recall:
        print(f"warning: no {params.split()[0]} tried reached recall@10 {args.target_recall}; "
              "the largest is stored", file=sys.stderr)
    print(f"indexed {len(files)} images{classes} from {args.folder} -> {args.out} ({how})")


def _factory(approximate: str | None, items: int) -> str:
    """The index factory string --approximate asks for, for ``items`` images."""
    from retrieval import search

    if approximate is None:
        return search.EXACT
    if approximate != "auto":
        return approximate
    factory = search.default_factory(items)
    if factory is None:
        print(f"note: {items} images are too few to train an approximate (IVF) index; exact "
              f"search it is (it needs {search.MIN_LISTS * search.TRAINING_PER_LIST} images)",
              file=sys.stderr)
        return search.EXACT
    return factory


def warn_if_other_model(index_path: Path, model_path: Path) -> None:
    """A warning on stderr when the index card names another checkpoint than ``model_path``."""
    card_path = index_path.with_suffix(".json")
    if not card_path.is_file():
        return
    from retrieval.outputs import file_digest

    card = outputs.read_json(card_path)
    if card.get("model_sha256") not in (None, file_digest(model_path)):
        print(f"warning: {index_path} was built with another model ({card.get('model')}); "
              "distances are only meaningful with that model", file=sys.stderr)


def _gallery_image(file: str) -> np.ndarray:
    import numpy as np

    from retrieval import data

    try:
        return shown(data.load_rgb(file))
    except (OSError, ValueError):
        return np.full((64, 64, 3), 200, dtype=np.uint8)  # moved or deleted since indexing


# --------------------------------------------------------------------------- segment
# Its parser is built only when asked for: the --method choices come from the saliency registry
# in retrieval.cam, which imports torch, and `retrieval --help` should start at once.

DEFAULT_PROTOTYPES = paths.prototypes("unfrozen")


def segment_parser() -> argparse.ArgumentParser:
    from retrieval import cam
    from retrieval.segmentation import refine

    parser = Parser(
        prog="retrieval segment",
        description="Segment the object of every image in a folder from a trained model's "
                    "saliency (no segmentation training). Writes one PNG mask per image "
                    "(255 = object) at the image's size, with the same relative path; with "
                    "--masks, also OUT/iou_table.csv (IoU and Dice per image, scored on the "
                    "model's centre-cropped input view, as in the gradcam_segment stage). "
                    "When IMAGES has one sub-folder per class of the model, the model's "
                    "classification accuracy is printed too.")
    parser.add_argument("images", type=Path, help="folder of images (sub-folders are searched)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the masks (created; must not lie inside IMAGES)")
    parser.add_argument("--masks", type=Path, default=None,
                        help="ground-truth masks parallel to IMAGES (same relative path and "
                             "stem, any image format) to score the predictions")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint (default {DEFAULT_MODEL})")
    parser.add_argument("--prototypes", type=Path, default=None,
                        help="class prototypes of an embedding model, written by the "
                             "gradcam_segment stage as data/gradcam/prototypes/<model>.npz "
                             f"(default {DEFAULT_PROTOTYPES} with the default model)")
    parser.add_argument("--method", choices=tuple(cam.SALIENCY_METHODS), default=None,
                        help="saliency method (default: the model's best on validation, as "
                             "chosen by gradcam_segment, else gradcam)")
    parser.add_argument("--binarize", default=None,
                        help=f"{cam.BINARIZATION_GRAMMAR} (default: the setting chosen on "
                             "validation by gradcam_segment, else otsu)")
    parser.add_argument("--refine", default=None,
                        help=f"{refine.REFINEMENT_GRAMMAR} (default: the refinement chosen on "
                             "validation by gradcam_segment, else none)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input side in px (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per saliency call (default 16; lower it if out of memory)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    return parser


def segment(argv: list[str]) -> None:
    """`retrieval segment IMAGES --out MASKS [--masks GT] ...` (user errors: see ``main``)."""
    segment_folder(segment_parser().parse_args(argv))


def segment_folder(args: argparse.Namespace) -> pd.DataFrame:
    """Run the command; returns the per-image table (also written with --masks)."""
    import torch

    from retrieval import cam, runtime, transforms
    from retrieval.segmentation import experiment, explainers, geometry, refine

    check_segment(args)
    images_dir, out = args.images, args.out
    model_file = default_path(args.model, DEFAULT_MODEL, "--model", MAKES["model"])
    explainer_file = args.prototypes or (project_root() / DEFAULT_PROTOTYPES
                                         if args.model is None else None)
    explainer, checkpoint, chosen = explainers.load_explainer(model_file, explainer_file)
    image_size = args.image_size or checkpoint.get("image_size")
    if not image_size:
        raise UserError(f"{model_file} does not record its image size: pass --image-size")
    method = args.method or chosen["best_method"] or "gradcam"
    stored = f"the setting stored in {explainer_file}"
    setting = _parsed(cam.parse_binarization, "binarisation", args.binarize, "--binarize",
                      chosen["binarization"].get(method, "otsu"), stored)
    refinement = _parsed(refine.parse_refinement, "refinement", args.refine, "--refine",
                         chosen["refinement"].get(method, "none"), stored)
    explainer.model.to(runtime.resolve_device(args.device))
    _refuse_stem_clashes(images_dir)
    known = set(explainer.classes) | set(explainer.prototypes)

    rows, skipped = [], []
    for batch in _decoded_batches(images_dir, args.batch_size, skipped):
        views = torch.stack([transforms.eval_crop(image_size)(
            transforms.decode_transform(image_size)(image)) for _, image in batch])
        maps = explainers.explain(explainer, method, views)
        masks = refine.refine_batch(views.numpy(), maps,
                                    experiment.binarize_maps(maps, setting), refinement)
        predicted = (experiment.predicted_labels(explainer, views.numpy(), len(views))
                     if explainer.can_predict else [None] * len(views))
        for (relative, image), mask, guess in zip(batch, masks, predicted, strict=True):
            target = out / relative.with_suffix(".png")
            geometry.write_mask_png(target, geometry.restore_mask(mask, image.height,
                                                                  image.width))
            folder = relative.parts[0] if len(relative.parts) > 1 else None
            rows.append({"file": relative.as_posix(), "mask": str(target),
                         "foreground_fraction": float(mask.mean()), "predicted": guess,
                         "correct": (guess == folder) if folder in known else None,
                         **_truth_scores(args.masks, relative, image, mask, image_size)})
    return _report_segmentation(rows, skipped, args, method, f"{cam.format_binarization(setting)}"
                                f", refined by {refine.format_refinement(refinement)}")


def _parsed(parse: Callable[[str], object], what: str, given: str | None, flag: str,
            stored_text: str, stored: str) -> object:
    """``parse`` of the option's text, else of the stored one; a UserError says which failed."""
    text = given or stored_text
    try:
        return parse(text)
    except ValueError as error:
        raise UserError(f"{what} '{text}' ({flag if given else stored}): {error}") from None


def _report_segmentation(rows: list[dict], skipped: list[str], args: argparse.Namespace,
                         method: str, setting: str) -> pd.DataFrame:
    """The per-image table (written with --masks) and what was done, on stdout/stderr."""
    import pandas as pd

    images_dir, out = args.images, args.out
    shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    if not rows:
        found = f" (only {len(skipped)} other files: {shown})" if skipped else ""
        raise UserError(f"{images_dir} contains no images Pillow can read{found}: give a "
                        "folder of images")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not images: {shown}", file=sys.stderr)
    table = pd.DataFrame(rows)
    message = f"wrote {len(table)} masks to {out} ({method}, {setting})"
    if args.masks is not None:
        outputs.write_csv(out / "iou_table.csv", table)
        scored = table.dropna(subset=["iou"])
        message += (f"; mean IoU {scored['iou'].mean():.3f} over {len(scored)} images with a "
                    f"mask -> {out / 'iou_table.csv'}" if len(scored) else
                    "; no image had a matching mask")
    labelled = table.dropna(subset=["correct"])
    if len(labelled):
        message += (f"; classification accuracy {labelled['correct'].astype(bool).mean():.3f} "
                     f"over {len(labelled)} images in class folders")
    print(message)
    return table


def _decoded_batches(folder: Path, batch_size: int, skipped: list[str]
                     ) -> Iterator[list[tuple[Path, Image.Image]]]:
    """Batches of (path relative to folder, RGB image); undecodable files go to ``skipped``."""
    from PIL import Image

    from retrieval import data

    batch = []
    for path in _files(folder):
        try:
            image = data.load_rgb(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            skipped.append(path.relative_to(folder).as_posix())
            continue
        batch.append((path.relative_to(folder), image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _refuse_stem_clashes(folder: Path) -> None:
    """Two images with one folder and stem would write one mask file: refuse before writing any.
    Only files sharing a stem are opened (a header read), so the check costs nothing usually."""
    by_stem: dict[Path, list[Path]] = {}
    for path in _files(folder):
        by_stem.setdefault(path.relative_to(folder).with_suffix(""), []).append(path)
    for stem, files in by_stem.items():
        images = [p for p in files if len(files) > 1 and _is_image(p)]
        if len(images) > 1:
            raise UserError(f"{images[0]} and {images[1]} would both write the mask "
                            f"{stem.with_suffix('.png')} (same folder and stem): rename one")


def _is_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _files(folder: Path) -> list[Path]:
    """Regular files below ``folder``, sorted; hidden entries skipped, symlinked folders not
    followed (no loops)."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(current) / f for f in files if not f.startswith(".")]
    return sorted(p for p in found if p.is_file())


def _truth_scores(masks_dir: Path | None, relative: Path, image: Image.Image, mask: np.ndarray,
                  image_size: int) -> dict:
    """{"mask_status", "iou", "dice"} of a predicted model-view mask against its ground truth."""
    if masks_dir is None:
        return {}
    import numpy as np

    from retrieval import cam, data
    from retrieval.segmentation import geometry

    folder = masks_dir / relative.parent
    found = sorted(folder.glob(glob.escape(relative.stem) + ".*")) if folder.is_dir() else []
    if not found:
        return {"mask_status": "missing", "iou": np.nan, "dice": np.nan}
    truth = data.load_mask(found[0])
    if truth.shape != (image.height, image.width):
        return {"mask_status": "size differs", "iou": np.nan, "dice": np.nan}
    truth = geometry.align_mask(truth, image_size)
    return {"mask_status": "ok", "iou": cam.iou(mask, truth), "dice": cam.dice(mask, truth)}


# --------------------------------------------------------------------------- serve
# The page itself is retrieval.webapp; FastAPI and uvicorn load only for this command.

DEFAULT_QUERIES = paths.EVAL / "per_query.csv"  # evaluate: the test queries, worst first


def check_serve(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise UserError(f"--k must be >= 1, found {args.k}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in [1, 65535], found {args.port}")
    check_input_file(args.model, "--model file")
    if args.index.is_dir():
        raise UserError(f"--index {args.index} is a folder: give the .faiss file (default "
                        f"{DEFAULT_INDEX})")
    check_input_file(args.index, "--index file")
    if args.queries.is_dir():
        raise UserError(f"--queries {args.queries} is a folder: give evaluate's per-query CSV "
                        f"(default {DEFAULT_QUERIES})")
    check_device(args.device)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads, so a busy port fails at once."""
    import socket

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(info[0], socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(info[4])
        listener.listen()
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass "
                        "another --port or --host") from None
    return listener


def serve_command(args: argparse.Namespace) -> None:
    check_serve(args)
    import uvicorn

    from retrieval import webapp

    listener = bind(args.host, args.port)
    app = webapp.create_app(args.index, args.model, args.queries, args.device, args.k)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"search page: http://{shown_host}:{args.port}/  (Ctrl+C stops it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C (or SIGTERM) after a clean shutdown
        pass
    print("search page stopped")
