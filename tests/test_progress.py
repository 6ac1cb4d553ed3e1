"""Quiet logs: bars on a terminal, one line per step or epoch in a file, rank 0 alone speaks."""

from __future__ import annotations

import io
import sys

import pytest

from retrieval import progress
from tests.test_training import fit_frozen


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_a_step_is_one_summary_line_and_no_bar(capsys):
    for _ in progress.Progress(range(250), desc="baseline features", unit="image"):
        pass
    out, err = capsys.readouterr()
    assert err == ""  # no carriage-return redraws
    assert out.count("\n") == 1
    assert out.startswith("baseline features: 250 images in ") and out.endswith(" s\n")


def test_manual_updates_count_items_and_a_short_stop_says_how_far(capsys):
    with progress.Progress(desc="decode images", total=10, unit="image") as bar:
        bar.update(3)
    assert capsys.readouterr().out.startswith("decode images: 3/10 images in ")


def test_without_summary_or_when_disabled_a_log_gets_nothing(capsys):
    for _ in progress.Progress(range(5), desc="steps", summary=False):
        pass
    for _ in progress.Progress(range(5), desc="off", disable=True):
        pass
    assert capsys.readouterr() == ("", "")


def test_on_a_terminal_the_bar_draws_and_no_summary_line_is_added(monkeypatch, capsys):
    terminal = Terminal()  # stderr, where tqdm draws, as a terminal (set here: pytest swaps
    monkeypatch.setattr(sys, "stderr", terminal)  # its own capture in before a test runs)
    assert progress.interactive()
    for _ in progress.Progress(range(4), desc="features", unit="image"):
        pass
    assert "features: 100%" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert capsys.readouterr().out == ""


def test_only_rank_0_reports(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    for _ in progress.Progress(range(5), desc="features"):
        pass
    progress.note("an epoch line")
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    progress.note("an epoch line")
    assert capsys.readouterr().out == "an epoch line\n"


def test_a_closed_stderr_is_not_a_terminal(monkeypatch):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    assert not progress.interactive()


def test_piped_training_logs_one_line_per_epoch_and_why_it_stopped(tmp_path, capsys):
    def freeze_after_first_epoch(epoch, row, net, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    # Better at epoch 1, then flat: patience 2 stops before epoch 4 (as in test_training).
    result, _ = fit_frozen(tmp_path, lr=3e-3, epochs=6, model={"batchnorm": False},
                           early_stopping_patience=2, on_epoch=freeze_after_first_epoch)
    assert result.stopped == "early_stopping" and result.best_epoch == 1
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "epoch 0/6 (before training)", "epoch 1/6", "epoch 2/6", "epoch 3/6"]
    assert "train loss" in lines[1] and "val loss" in lines[1] and "val accuracy" in lines[1]
    assert " lr " in lines[1] and lines[1].rstrip().endswith("(best so far)")
    assert lines[-1].startswith("training stopped early after epoch 3/6: val loss has not "
                                "improved for 2 epochs (early_stopping_patience 2); "
                                "kept epoch 1 (lowest val loss ")


def test_a_stage_that_runs_every_epoch_says_so_and_which_epoch_it_kept(tmp_path, capsys):
    # lr 0: no epoch beats the model before training, so epoch 0 is kept.
    result, _ = fit_frozen(tmp_path, lr=0.0, epochs=2, model={"batchnorm": False},
                           early_stopping_patience=1)
    assert result.stopped == "epochs"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # epochs 0, 1, 2 and the stop line
    assert lines[-1].startswith("training ran all 2 epochs; kept epoch 0 (lowest val loss ")
    assert lines[-1].endswith("the model before training, as no epoch improved on it")


@pytest.mark.e2e
def test_a_piped_dvc_repro_logs_lines_not_bars(pipeline_repo):
    log = (pipeline_repo / ".first_repro.log").read_text()
    assert "\r" not in log  # no bar redraws
    assert len(log.splitlines()) < 300
    stops = [line for line in log.splitlines() if line.startswith("training ")]
    assert len(stops) == 2, stops  # train_frozen, train_unfrozen: why it stopped, what it kept
    assert all(" kept epoch " in line for line in stops)
    assert log.count("epoch 2/2: train loss ") == 2  # one line per epoch
    assert "backbone features (once): " in log  # one line per long step
