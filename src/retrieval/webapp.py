"""The local search page of `retrieval serve`: a FastAPI app over a saved gallery index.

``create_app`` loads the model and the index once; the pages then embed one query image per
request and search the index:

    /                 upload form and example gallery images to pick from
    /search?id=N      the top-k neighbours of gallery item N      (POST /search: of an upload)
    /queries?page=N   the test queries that evaluate scored, worst first, 20 a page
    /queries/N        the top-k neighbours of the N-th of them
    /image/N          a thumbnail of gallery item N

Every neighbour card shows its rank, path, class label, distance and the same/different
decision at the model's threshold, the one `retrieval compare` uses (``threshold.resolve``:
evaluate's for this very checkpoint, else the checkpoint's own; the page says which); a neighbour
with the query's content hash is flagged as the query itself. Bad input (an empty upload, a
file that is not an image, an id out of range) is a page with one line and a 4xx status, never
a traceback. The HTML is rendered by the Jinja2 templates in ``retrieval/templates`` (no
JavaScript, nothing fetched from elsewhere: the page works offline).
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import faiss
import pandas as pd
import torch
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from PIL import Image

from retrieval import cli, data, outputs, runtime, search, threshold
from retrieval.outputs import UserError

TEMPLATES = Path(__file__).with_name("templates")
QUERY_COLUMNS = ("path", "label", "file", "ap", "precision_at_1")
QUERIES_PER_PAGE = 20
EXAMPLES = 8  # gallery images offered on the start page
THUMBNAIL_SIDE = 160  # px, the longer side of the images on the pages
MAX_UPLOAD_BYTES = 64 * 2**20  # a larger upload is refused before it is decoded


class PageError(Exception):
    """A request the app cannot answer: shown as a one-line page with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Neighbour:
    id: int
    rank: int
    path: str
    label: str
    distance: float
    same: bool | None  # None: no threshold to decide with
    is_query: bool  # same content hash as the query (or the picked gallery item itself)


@dataclass(frozen=True)
class Query:
    title: str
    label: str
    thumbnail: str  # a data: URI, so an upload needs no storage
    content_hash: str | None
    gallery_id: int | None = None
    details: dict | None = None  # AP and P@1 of a scored test query


@dataclass
class Searcher:
    """The loaded model and index; ``neighbours`` is the one search of every page."""

    manifest: pd.DataFrame
    index: faiss.Index
    net: torch.nn.Module
    image_size: int
    device: torch.device
    k: int
    decision: threshold.Threshold  # the model's, as `retrieval compare` decides with it
    lock: threading.Lock  # one embedding at a time: the model is shared by the worker threads

    def neighbours(self, image: Image.Image, query: Query) -> list[Neighbour]:
        with self.lock:
            vector = cli.embed(self.net, [image], self.image_size, self.device)
        distances, ids = search.search_index(self.index, vector, self.k)
        hashes = (self.manifest["content_hash"] if "content_hash" in self.manifest
                  else None)
        found = []
        for rank, (distance, i) in enumerate(zip(distances[0], ids[0], strict=True), start=1):
            if i < 0:  # an approximate index may return fewer than k
                continue
            item = self.manifest.iloc[int(i)]
            itself = int(i) == query.gallery_id or (
                hashes is not None and query.content_hash is not None
                and hashes.iloc[int(i)] == query.content_hash)
            found.append(Neighbour(
                id=int(i), rank=rank, path=str(item["path"]), label=str(item["label"]),
                distance=float(distance),
                same=self.decision.same(float(distance)),
                is_query=bool(itself)))
        return found


def load_searcher(index_path: Path, model_path: Path, device: str, k: int) -> Searcher:
    manifest, index = cli.load_gallery(index_path)
    if "file" not in manifest:
        raise UserError(f"{index_path.with_suffix('.csv')} has no 'file' column: rebuild the "
                        "index (`retrieval index` or `dvc repro evaluate`)")
    torch_device = runtime.resolve_device(device)
    net, checkpoint = cli.load_model(model_path, torch_device)
    if index.d != net.embedding_dim:
        raise UserError(f"{index_path} holds {index.d}-d vectors but {model_path} embeds to "
                        f"{net.embedding_dim}-d: pass the model the index was built with")
    cli.warn_if_other_model(index_path, model_path)
    # The model's threshold, as `retrieval compare` decides with it (the index card's copy is
    # not read: it may come from another model or an older evaluate).
    decision = threshold.resolve(model_path, checkpoint)
    return Searcher(manifest, index, net, checkpoint["image_size"], torch_device, k, decision,
                    threading.Lock())


# --------------------------------------------------------------------------- images


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """``image`` shrunk to at most ``side`` px, as JPEG bytes."""
    small = image.copy()
    small.thumbnail((side, side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail(image)).decode("ascii")


def read_upload(upload: UploadFile) -> tuple[Image.Image, str]:
    """(RGB image, content hash) of an uploaded file, decoded by the CLI's loader; a
    ``PageError`` 400/413 says why it cannot be used."""
    name = Path(upload.filename or "upload").name or "upload"
    content = upload.file.read(MAX_UPLOAD_BYTES + 1)
    if not content:
        raise PageError(400, f"the uploaded file {name} is empty: choose an image file")
    if len(content) > MAX_UPLOAD_BYTES:
        raise PageError(413, f"the uploaded file {name} is larger than "
                             f"{MAX_UPLOAD_BYTES // 2**20} MiB: upload a smaller image")
    with tempfile.TemporaryDirectory(prefix="retrieval-upload-") as folder:
        # A file with the upload's extension: load_rgb and content_hash work on paths, and so
        # the upload gets exactly the decoding (and hash) that the index's images got.
        path = Path(folder) / f"upload{Path(name).suffix[:16]}"
        path.write_bytes(content)
        try:
            image = cli.load_image(path)
        except UserError as error:
            message = str(error).replace(str(path), f"the uploaded file {name}")
            raise PageError(400, message.splitlines()[0]) from None
        return image, data.content_hash(path)


def open_image(file: str, what: str) -> Image.Image:
    """An image the index or the queries list names; a ``PageError`` when it is gone."""
    try:
        return cli.load_image(Path(file))
    except UserError as error:
        raise PageError(404, f"{what}: {str(error).splitlines()[0]} (moved or deleted since "
                             "the index was built?)") from None


# --------------------------------------------------------------------------- test queries


def read_queries(path: Path) -> pd.DataFrame:
    """evaluate's per-query table, in its order (worst first); a PageError when it is missing."""
    if not path.is_file():
        raise PageError(404, f"no test queries at {path}: run `dvc repro evaluate` to score "
                             "them, or start `retrieval serve` with --queries")
    return outputs.read_table(path, QUERY_COLUMNS, keep_default_na=False,
                              dtype={"path": str, "label": str, "file": str})


def page_of(queries: pd.DataFrame, page: int) -> tuple[pd.DataFrame, int]:
    """Rows of 1-based ``page`` (with their 1-based rank as the index) and the page count."""
    pages = max(1, math.ceil(len(queries) / QUERIES_PER_PAGE))
    if not 1 <= page <= pages:
        raise PageError(404, f"page {page} does not exist: the queries fill pages 1 to {pages}")
    start = (page - 1) * QUERIES_PER_PAGE
    rows = queries.iloc[start:start + QUERIES_PER_PAGE].copy()
    rows.index = range(start + 1, start + 1 + len(rows))
    return rows, pages


# --------------------------------------------------------------------------- the app


def create_app(index_path: Path, model_path: Path, queries_path: Path = cli.DEFAULT_QUERIES,
               device: str = "cpu", k: int = 8) -> FastAPI:
    """The search page over the saved index ``index_path`` (with its .csv manifest and .json
    card), embedding queries with the checkpoint ``model_path``; both are loaded here, once."""
    searcher = load_searcher(Path(index_path), Path(model_path), device, k)
    queries_path = Path(queries_path)
    templates = Jinja2Templates(directory=TEMPLATES)
    app = FastAPI(title="retrieval search", docs_url=None, redoc_url=None, openapi_url=None)
    manifest = searcher.manifest
    about = {"items": len(manifest), "index_path": str(index_path), "model_path": str(model_path),
             "k": k}

    def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {**about, **context},
                                          status_code=status)

    def results(request: Request, image: Image.Image, query: Query) -> HTMLResponse:
        return render(request, "results.html", query=query,
                    neighbours=searcher.neighbours(image, query),
                    threshold=searcher.decision.value,
                    threshold_source=searcher.decision.source)

    def gallery_item(item_id: int) -> pd.Series:
        if not 0 <= item_id < len(manifest):
            raise PageError(404, f"the gallery has no item {item_id}: ids run from 0 to "
                                 f"{len(manifest) - 1}")
        return manifest.iloc[item_id]

    @app.exception_handler(PageError)
    def page_error(request: Request, error: PageError) -> HTMLResponse:
        return render(request, "error.html", error.status, message=error.message)

    @app.exception_handler(UserError)
    def damaged_file(request: Request, error: UserError) -> HTMLResponse:
        # A file the app reads per request (the queries table) is damaged: say which.
        return render(request, "error.html", 500, message=str(error).splitlines()[0])

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, error: RequestValidationError) -> HTMLResponse:
        first = error.errors()[0]
        where = " ".join(str(part) for part in first.get("loc", ()))
        return render(request, "error.html", 400, message=f"bad request: {where}: {first['msg']}")

    @app.get("/", response_class=HTMLResponse)
    def start(request: Request) -> HTMLResponse:
        examples = [{"id": i, "path": str(row["path"]), "label": str(row["label"])}
                    for i, row in manifest.head(EXAMPLES).iterrows()]
        return render(request, "index.html", examples=examples)

    @app.post("/search", response_class=HTMLResponse)
    def search_upload(request: Request, image: Annotated[UploadFile, File()]) -> HTMLResponse:
        picture, content_hash = read_upload(image)
        query = Query(title=Path(image.filename or "upload").name, label="",
                      thumbnail=data_uri(picture), content_hash=content_hash)
        return results(request, picture, query)

    @app.get("/search", response_class=HTMLResponse)
    def search_gallery_item(request: Request, id: int) -> HTMLResponse:  # noqa: A002
        item = gallery_item(id)
        picture = open_image(str(item["file"]), f"gallery item {id}")
        query = Query(title=str(item["path"]), label=str(item["label"]),
                      thumbnail=data_uri(picture),
                      content_hash=item.get("content_hash"), gallery_id=id)
        return results(request, picture, query)

    @app.get("/queries", response_class=HTMLResponse)
    def test_queries(request: Request, page: int = 1) -> HTMLResponse:
        queries = read_queries(queries_path)
        rows, pages = page_of(queries, page)
        listed = [{"rank": rank, **row} for rank, row in
                  zip(rows.index, rows.to_dict("records"), strict=True)]
        return render(request, "queries.html", rows=listed, page=page, pages=pages,
                      total=len(queries), queries_path=str(queries_path))

    @app.get("/queries/{rank}", response_class=HTMLResponse)
    def search_test_query(request: Request, rank: int) -> HTMLResponse:
        queries = read_queries(queries_path)
        if not 1 <= rank <= len(queries):
            raise PageError(404, f"there is no test query {rank}: {queries_path} lists "
                                 f"{len(queries)}")
        row = queries.iloc[rank - 1]
        picture = open_image(row["file"], f"test query {rank} ({row['path']})")
        query = Query(title=row["path"], label=row["label"], thumbnail=data_uri(picture),
                      content_hash=data.content_hash(row["file"]),
                      details={"rank": rank, "ap": float(row["ap"]),
                               "precision_at_1": float(row["precision_at_1"])})
        return results(request, picture, query)

    @app.get("/image/{item_id}")
    def gallery_thumbnail(item_id: int) -> Response:
        item = gallery_item(item_id)
        picture = open_image(str(item["file"]), f"gallery item {item_id}")
        return Response(thumbnail(picture), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    return app
