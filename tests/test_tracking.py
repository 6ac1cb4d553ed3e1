"""tracking: names that go into MLflow search filters, against a real SQLite store."""

from __future__ import annotations

import pytest

from retrieval import tracking
from retrieval.outputs import UserError


@pytest.mark.parametrize("name", ["plain", "it's", 'say "hi"', "back\\slash", "100%_x"])
def test_an_experiment_name_with_quotes_finds_its_own_runs(name, tmp_path, monkeypatch):
    # An apostrophe went unescaped into the filter and crashed every stage.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", name)
    for stage in ("prepare", "split"):
        with tracking.stage_run(stage, {"seed": 1}) as run:
            run.log_metrics({"value": 1.0})
    monkeypatch.setenv("DVC_EXP_NAME", "other")  # another execution in the same store
    with tracking.stage_run("prepare", {"seed": 1}):
        pass
    monkeypatch.setenv("DVC_EXP_NAME", name)
    ids = tracking.pipeline_run_ids({"seed": 1})
    assert set(ids) == {"pipeline", "prepare", "split"}
    assert set(tracking.experiment_durations(name)) == {"prepare", "split"}


def test_a_name_with_both_quotes_is_refused_in_one_line():
    assert tracking.quoted("it's") == '"it\'s"' and tracking.quoted("a") == "'a'"
    with pytest.raises(UserError, match="holds both ' and \""):
        tracking.quoted("it's \"x\"")
    with pytest.raises(UserError, match="ends with a backslash"):
        tracking.quoted("trailing\\")


def test_a_stage_run_does_not_leave_its_store_as_the_users_tracking_uri(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which tracking_uri() reads as a team
    # server's address: a second project in the same process logged into the first one's store.
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    stores = []
    for project in ("first", "second"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        with tracking.stage_run("prepare", {"seed": 1}):
            pass
        assert "MLFLOW_TRACKING_URI" not in os.environ
        stores.append(tracking.tracking_uri())
    assert stores == [f"sqlite:///{tmp_path / p / 'mlruns' / 'mlflow.db'}"
                      for p in ("first", "second")]
    assert (tmp_path / "second" / "mlruns" / "mlflow.db").stat().st_size > 0
