"""The HTML retrieval view: every test query with its nearest gallery images, failures first.

One self-contained file (thumbnails inlined as base64 JPEG, each image once as a CSS class that
every tile showing it uses; no script, no CDN), so it opens from a DVC cache, an MLflow artifact
or an e-mail. Failures first means: queries whose first neighbour
has another class, then by ascending average precision. The per-class precision@1 table sits on
top, worst class first. ``worst_first`` is the same order as a table (`data/eval/per_query.csv`,
which the search page pages through).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from retrieval.cache import ImageCache
from retrieval.config import EvaluateConfig
from retrieval.evaluation import ModelResult, per_class_table, thumbnail

THUMBNAIL_SIDE = 96  # px: big enough to recognise an object, small enough for 1,000 tiles

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.query { display: flex; gap: 0.4rem; align-items: flex-start; margin-bottom: 0.8rem; }
.tile { width: 104px; font-size: 0.72rem; text-align: center; overflow-wrap: anywhere; }
.thumb { width: 96px; height: 96px; border: 4px solid #bbb; margin: 0 auto;
         background: center / contain no-repeat; }
.tile.hit .thumb { border-color: #2a9d3a; }
.tile.miss .thumb { border-color: #d1342f; }
.tile.source .thumb { border-color: #333; }
.summary { font-size: 1.05rem; }
"""


def worst_first(queries: pd.DataFrame, per_query: pd.DataFrame) -> pd.DataFrame:
    """The scored queries (those with a relevant gallery item) in failure-first order: columns
    position (into ``queries``), path, label, file, ap, precision_at_1."""
    scored = per_query[per_query["n_relevant"] > 0]
    order = scored.sort_values(["precision_at_1", "ap"], kind="stable").index
    return pd.DataFrame({
        "position": order.to_numpy(), "path": queries["path"].to_numpy()[order],
        "label": queries["label"].to_numpy()[order], "file": queries["file"].to_numpy()[order],
        "ap": scored.loc[order, "ap"].to_numpy(),
        "precision_at_1": scored.loc[order, "precision_at_1"].to_numpy()})


def _data_uri(image: np.ndarray) -> str:
    picture = Image.fromarray(image)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tile(image_class: str, caption: str, kind: str) -> str:
    return f'<div class="tile {kind}"><div class="thumb {image_class}"></div>{caption}</div>'



def render(title: str, summary: dict[str, float], queries: pd.DataFrame, gallery: pd.DataFrame,
           per_query: pd.DataFrame, neighbors: np.ndarray, distances: np.ndarray,
           per_class: pd.DataFrame, image_of: Callable[[int], np.ndarray], max_queries: int,
           k: int) -> str:
    """The page. ``queries``/``gallery`` have columns row, path, label; ``per_query``,
    ``neighbors`` (Q, >= k gallery positions) and ``distances`` are one model's retrieval;
    ``per_class`` has columns class, queries, precision_at_1; ``image_of(row)`` is the uint8
    (H, W, 3) image of a split-table row. ``max_queries`` 0 shows every query."""
    uris: dict[int, str] = {}

    def image_class(row: int) -> str:  # a gallery image appears in many rows: encoded once
        if row not in uris:
            uris[row] = _data_uri(image_of(row))
        return f"i{row}"

    order = worst_first(queries, per_query)
    shown = order if max_queries == 0 else order.head(max_queries)
    blocks = []
    for item in shown.itertuples(index=False):
        q = int(item.position)
        tiles = [_tile(image_class(int(queries["row"].iat[q])),
                       f"<b>query</b><br>{html.escape(str(item.label))}<br>"
                       f"AP {item.ap:.2f}", "source")]
        for rank, (g, d) in enumerate(zip(neighbors[q, :k], distances[q, :k], strict=True), 1):
            label = str(gallery["label"].iat[g])
            tiles.append(_tile(image_class(int(gallery["row"].iat[g])),
                               f"#{rank} {html.escape(label)}<br>d={d:.3f}",
                               "hit" if label == str(item.label) else "miss"))
        blocks.append(f'<div class="query" title="{html.escape(str(item.path))}">'
                      + "".join(tiles) + "</div>")
    class_rows = "".join(
        f"<tr><td>{html.escape(str(row['class']))}</td><td>{int(row['queries'])}</td>"
        f"<td>{row['precision_at_1']:.3f}</td></tr>" for _, row in per_class.iterrows())
    numbers = ", ".join(f"{name} {value:.3f}" for name, value in summary.items())
    images = "".join(f'.i{row} {{ background-image: url("{data}"); }}\n'
                     for row, data in uris.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}{images}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="summary">{html.escape(numbers)}. Green border: the neighbour's class is the query's;
red: another class. {len(shown)} of {len(order)} queries, failures first (wrong first
neighbour, then lowest average precision).</p>
<h2>Precision@1 per class, worst first</h2>
<table><tr><th>class</th><th>queries</th><th>P@1</th></tr>{class_rows}</table>
<h2>Queries and their {k} nearest gallery images</h2>
{"".join(blocks)}
</body></html>
"""


@dataclass
class RetrievalView:
    worst_first: pd.DataFrame  # the scored queries, failures first (data/eval/per_query.csv)
    page: str  # the self-contained HTML view


def of_model(name: str, result: ModelResult, scores: dict, queries: pd.DataFrame,
             gallery: pd.DataFrame, images: ImageCache, cfg: EvaluateConfig) -> RetrievalView:
    """Model ``name``'s view and its failure-first query order, from evaluate's results."""
    per_query = result.retrieval.per_query
    classes = per_class_table({name: result}).rename(columns={name: "precision_at_1"})
    summary = {metric: scores[metric] for metric in ("precision_at_1", "map", "map_at_r")}
    page = render(f"Retrieval on the test split ({name} model)", summary, queries, gallery,
                  per_query, result.retrieval.neighbors, result.retrieval.distances, classes,
                  lambda row: thumbnail(images, row), cfg.view_queries, cfg.view_k)
    return RetrievalView(worst_first(queries, per_query).drop(columns="position"), page)
