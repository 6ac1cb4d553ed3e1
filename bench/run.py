"""`make bench`: run the benchmarks of issue #7, write bench/results/*.json and BENCHMARKS.md.

    python bench/run.py                every row at full size (about 25 minutes on 2 cores;
                                       row 8, the whole Caltech-101 pipeline, is most of it)
    python bench/run.py --quick        tiny sizes, a minute: the smoke test (tests/test_bench.py)
    python bench/run.py --only 1,9     some rows; the other rows' JSON files are kept
    python bench/run.py --markdown-only    regenerate BENCHMARKS.md from the JSON files

Each row runs in a fresh Python process (one module per row, ``run(quick, workdir)``), so peak
memory is that row's alone and no row warms caches for the next. Measure on a quiet machine:
every figure is a ratio of two measurements taken in one run, which cancels most but not all of
the effect of other processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import common

ROWS = {1: "extraction", 2: "training", 3: "frozen_cache", 4: "image_cache", 5: "search",
        6: "mining", 7: "dvc_noop", 8: "full_pipeline", 9: "numerics", 10: "pretrained",
        11: "class_disjoint", 12: "leeds", 13: "segmentation:run_13",
        14: "segmentation:run_14", 15: "segmentation:run_15", 16: "ann",
        17: "export", 18: "ddp"}  # "module" (its run) or "module:function"
RESULTS = common.REPO / "bench" / "results"
MARKDOWN = common.REPO / "BENCHMARKS.md"
WORKDIR = common.REPO / ".cache" / "bench"  # decoded subsets, reused (content-addressed)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated row numbers, e.g. 1,9")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON folder")
    parser.add_argument("--markdown", type=Path, default=MARKDOWN, help="table to write")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="scratch and caches")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only regenerate the markdown from the JSON files")
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # child process: one row
    return parser.parse_args()


def name(row: int) -> str:
    """The row's file-name part: its module, or module_function."""
    return ROWS[row].replace(":", "_")


def run_row(row: int, quick: bool, workdir: Path, results: Path) -> None:
    """Child process: run one row's module and write its JSON (an error becomes a failed row)."""
    started, load_before = time.perf_counter(), common.load_average()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        module, _, function = ROWS[row].partition(":")
        result = getattr(importlib.import_module(module), function or "run")(quick, workdir)
        record = dataclasses.asdict(result)
    except Exception as error:  # the table shows the failure; the other rows still run
        traceback.print_exc()
        record = {"row": row, "name": name(row), "what": name(row), "conditions": "",
                  "figure": f"error: {type(error).__name__}: {error}"[:300], "target": "",
                  "passed": False, "details": {}, "notes": [], "error": True}
    record.update(quick=quick, seconds=round(time.perf_counter() - started, 1),
                  load_average=[load_before, common.load_average()],
                  peak_rss_gib=round(common.peak_rss_gib(), 3), machine=common.machine(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"row{row}_{name(row)}.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    os.replace(temp, path)


def spawn(row: int, args: argparse.Namespace) -> bool:
    """Run one row in a fresh process (its output in <workdir>/logs/); True when no error.
    Quick mode runs the rows in this process instead: imports alone would take most of it."""
    print(f"row {row} ({name(row)}) ...", flush=True)
    started = time.perf_counter()
    if args.quick:
        run_row(row, args.quick, args.workdir, args.results)
    else:
        log = args.workdir / "logs" / f"row{row}_{name(row)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--row", str(row), "--results", str(args.results),
                   "--workdir", str(args.workdir)]
        with open(log, "w") as out:
            subprocess.run(command, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                           stdout=out, stderr=subprocess.STDOUT, check=False)
    path = args.results / f"row{row}_{name(row)}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"error": True}
    print(f"row {row}: {record.get('figure', 'no result')} "
          f"[{time.perf_counter() - started:.0f} s]", flush=True)
    return not record.get("error", False)


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP
    args = parse_args()
    if args.row is not None:
        run_row(args.row, args.quick, args.workdir, args.results)
        return 0
    ok = True
    if not args.markdown_only:
        rows = [int(r) for r in args.only.split(",") if r.strip()] or list(ROWS)
        unknown = sorted(set(rows) - set(ROWS))
        if unknown:
            print(f"--only: no row {unknown}; rows are {sorted(ROWS)}", file=sys.stderr)
            return 2
        ok = all([spawn(row, args) for row in rows])
    import markdown

    args.markdown.write_text(markdown.render(markdown.load(args.results)))
    print(f"wrote {args.markdown}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
