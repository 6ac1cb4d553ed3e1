"""Row 5: exact k-NN search (``search.knn``) of 10^4 queries over galleries of 10^4 to 10^6.

Random 128-d unit vectors, k = 10. Each gallery size runs in its own process, so the peak RSS
is that size's alone (data generation included). Exact search is used at every size: on
structureless random vectors no FAISS index reaches recall@10 ≥ 0.95 faster (search.py's
module docstring has the measurements), so recall is 1 by construction. A 10^4 x 10^6 distance
matrix would need 37 GiB: finishing within the memory figure shows none is formed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np

K, DIM = 10, 128


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def measure(gallery_size: int, queries: int) -> dict:
    """In this process: generate, search, report seconds and peak RSS."""
    from retrieval import search

    gallery, query = unit_vectors(gallery_size, 0), unit_vectors(queries, 1)
    started = time.perf_counter()
    _, indices = search.knn(query, gallery, K)
    seconds = time.perf_counter() - started
    return {"gallery": gallery_size, "queries": queries, "seconds": seconds,
            "peak_rss_gib": common.peak_rss_gib(), "found": int(indices.shape[1])}


def slope(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def run(quick: bool, workdir: Path) -> common.Result:
    queries, sizes = (1000, [1000, 10_000]) if quick else (10_000, [10_000, 100_000, 1_000_000])
    rows = []
    for size in sizes:
        out = subprocess.run([sys.executable, __file__, str(size), str(queries)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    fit = slope(sizes, [r["seconds"] for r in rows])
    largest = rows[-1]
    passed = largest["peak_rss_gib"] <= 4 and largest["found"] == K
    table = ", ".join(f"10^{round(math.log10(r['gallery']))}: {r['seconds']:.2f} s "
                      f"({r['peak_rss_gib']:.2f} GiB)" for r in rows)
    return common.Result(
        row=5, name="search",
        what="Retrieval search: exact k-NN over random 128-d unit vectors",
        conditions=f"{queries} queries, k = {K}, `search.knn` (FAISS brute force, chunks of "
                   "4096 queries), recall@10 = 1 (exact); one process per gallery size",
        figure=f"{table}; log-log slope {fit:.2f}",
        target=f"10^{round(math.log10(sizes[-1]))} completes without an N×N matrix; "
               "peak RSS ≤ 4 GiB",
        passed=passed, details={"sizes": rows, "loglog_slope": fit})


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
