"""retrieval_view: the self-contained HTML page of queries and neighbours, failures first."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from retrieval import retrieval_view


def _case() -> dict:
    # Four queries of classes a, b, a, <c> against a gallery of five images.
    queries = pd.DataFrame({"row": [10, 11, 12, 13], "path": ["q0", "q1", "q2", "q3"],
                            "label": ["a", "b", "a", "<c>"], "file": ["f0", "f1", "f2", "f3"]})
    gallery = pd.DataFrame({"row": [0, 1, 2, 3, 4], "path": list("vwxyz"),
                            "label": ["a", "b", "a", "b", "<c>"]})
    per_query = pd.DataFrame({
        "label": queries["label"], "n_relevant": [2, 2, 2, 0],
        "precision_at_1": [1.0, 0.0, 1.0, 0.0], "ap": [0.6, 0.9, 1.0, np.nan]})
    neighbors = np.array([[0, 1, 2], [0, 1, 3], [2, 0, 1], [4, 0, 1]])
    distances = np.tile(np.array([0.1, 0.2, 0.3]), (4, 1))
    per_class = pd.DataFrame({"class": ["b", "a"], "queries": [1, 2],
                              "precision_at_1": [0.0, 1.0]})
    return dict(title="test <view>", summary={"map": 0.5}, queries=queries, gallery=gallery,
                per_query=per_query, neighbors=neighbors, distances=distances,
                per_class=per_class,
                image_of=lambda row: np.full((8, 8, 3), row * 20 % 256, dtype=np.uint8))


def test_failures_come_first_then_the_lowest_average_precision():
    case = _case()
    order = retrieval_view.worst_first(case["queries"], case["per_query"])
    # q1 misses at rank 1; q0 (AP 0.6) before q2 (AP 1.0); q3 has nothing relevant: not scored.
    assert order["path"].tolist() == ["q1", "q0", "q2"]
    assert order.columns.tolist() == ["position", "path", "label", "file", "ap",
                                      "precision_at_1"]


def test_the_page_is_self_contained_and_marks_each_neighbour():
    page = retrieval_view.render(**_case(), max_queries=0, k=2)
    assert "<script" not in page and not re.search(r"(src|href)=\"?https?:", page)
    assert "test &lt;view&gt;" in page  # labels and titles are escaped
    # Each distinct image is embedded once, whatever the number of tiles that show it.
    shown_rows = {10, 11, 12, 0, 1, 2}
    assert page.count("background-image") == len(shown_rows)
    assert page.count('class="tile source"') == 3
    # q1 (class b): neighbours a (miss), b (hit); q0 (a): a hit, b miss; q2 (a): a, a hits.
    kinds = re.findall(r'class="tile (hit|miss)"', page)
    assert kinds == ["miss", "hit", "hit", "miss", "hit", "hit"]
    blocks = re.findall(r'<div class="query" title="([^"]+)"', page)
    assert blocks == ["q1", "q0", "q2"]


def test_max_queries_keeps_the_worst():
    page = retrieval_view.render(**_case(), max_queries=1, k=3)
    assert re.findall(r'<div class="query" title="([^"]+)"', page) == ["q1"]
    assert "1 of 3 queries" in " ".join(page.split())
