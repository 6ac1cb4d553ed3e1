"""`make bench` cannot rot: `bench/run.py --quick` runs every benchmark at tiny sizes.

Benchmarks are not part of the test suite (their figures need a quiet machine); this only checks
that each row still runs end to end and that BENCHMARKS.md is generated from the results.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from tests.conftest import REPO, run

ROWS = range(1, 19)


@pytest.mark.e2e
def test_quick_bench_runs_every_row_and_writes_the_table(tmp_path, mlflow_db_template):
    workdir, results, table = tmp_path / "work", tmp_path / "results", tmp_path / "BENCH.md"
    (workdir / "mlflow_template").mkdir(parents=True)
    shutil.copy(mlflow_db_template, workdir / "mlflow_template" / "mlflow.db")
    run([sys.executable, "bench/run.py", "--quick", "--results", str(results),
         "--markdown", str(table), "--workdir", str(workdir)], cwd=REPO, timeout=900)

    records = {int(re.match(r"row(\d+)_", path.stem).group(1)): json.loads(path.read_text())
               for path in results.glob("row*.json")}
    assert sorted(records) == list(ROWS)
    for row, record in records.items():
        assert not record.get("error"), f"row {row}: {record['figure']}"
        assert record["quick"] and record["figure"] and record["target"], row
    text = table.read_text()
    assert "| # | what | conditions | figure | target | result |" in text
    assert all(f"\n| {row} | " in text for row in ROWS)
    assert "Quick mode" in text
