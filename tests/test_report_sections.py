"""The section registry: a section is one entry, and the summary repeats exactly the observations
flagged `in_summary` (whatever their wording)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from retrieval import report
from retrieval.report import observations, sections
from retrieval.report.sections import ANY_STAGE, SECTIONS, FigureSpec, Observation, SectionSpec
from tests.report_data import RUN, load, make_project


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> report.Inputs:
    return load(make_project(tmp_path_factory.mktemp("project")))


def summary_items(inputs: report.Inputs) -> tuple[str, ...]:
    (summary, *_) = report.build_sections(inputs)
    assert summary.id == "summary"
    return summary.blocks[0].items


def test_the_registry_is_consistent():
    ids = [spec.id for spec in SECTIONS]
    assert len(set(ids)) == len(ids) and "summary" not in ids
    keys = [figure.key for spec in SECTIONS for figure in spec.figures]
    assert len(set(keys)) == len(keys)
    collected = [stage for spec in SECTIONS for stage in spec.collects]
    assert len(set(collected)) == len(collected) and collected.count(ANY_STAGE) == 1
    for spec in SECTIONS:
        assert all(figure.caption for figure in spec.figures), spec.id


def test_every_observation_is_shown_somewhere():
    registered = {o.sentences for spec in SECTIONS for o in spec.observations}
    written = {f for name, f in inspect.getmembers(observations, inspect.isfunction)
               if not name.startswith("_") and f.__module__ == observations.__name__}
    assert written - registered == set(), "observations no section shows"


def test_the_summary_repeats_exactly_the_flagged_observations(inputs):
    flagged = [sentence for spec in SECTIONS for o in spec.observations if o.in_summary
               for sentence in o.sentences(inputs)]
    assert summary_items(inputs) == tuple(flagged) and len(flagged) >= 8
    assert "Fine-tuning the backbone raised test mAP from 0.410 to 0.580 (frozen to unfrozen, " \
        "+0.170); the 95% confidence intervals do not overlap." in flagged
    unflagged = {sentence for spec in SECTIONS for o in spec.observations if not o.in_summary
                 for sentence in o.sentences(inputs)}
    assert unflagged and not unflagged & set(summary_items(inputs))


def test_rewording_an_observation_keeps_it_in_the_summary(inputs, monkeypatch):
    def reworded(inputs: report.Inputs) -> list[str]:
        return ["Something else entirely about where training stopped."]

    patched = tuple(dataclasses.replace(spec, observations=tuple(
        Observation(reworded, o.in_summary) if o.sentences is observations.stopping else o
        for o in spec.observations)) for spec in SECTIONS)
    monkeypatch.setattr(sections, "SECTIONS", patched)
    assert "Something else entirely about where training stopped." in summary_items(inputs)


def test_a_new_section_is_one_entry(monkeypatch, tmp_path: Path):
    """A section about a stage the report has never heard of: nothing but the entry is added."""
    def drawn(inputs: report.Inputs):
        import matplotlib.pyplot as plt

        return plt.subplots(figsize=(1, 1))[0]

    def seconds(inputs: report.Inputs) -> list[report.Block]:
        return [report.Table(("stage", "seconds"), tuple(
            (stage, report.fmt(s)) for stage, s in inputs.metrics["future_stage"].items()))]

    entry = SectionSpec(
        "timing", "Where the time goes", needs=("future_stage", "never_run"),
        collects=("future_stage",),
        figures=(FigureSpec("evaluate/brand_new", "A figure a stage already draws."),
                 FigureSpec("report/timing", "A figure the report draws.", draw=drawn)),
        blocks=seconds,
        observations=(Observation(lambda inputs: [
            f"Evaluation took {inputs.metrics['future_stage']['evaluate']} s."],
            in_summary=True),))
    monkeypatch.setattr(sections, "SECTIONS", (*SECTIONS[:-1], entry, SECTIONS[-1]))
    root = make_project(tmp_path)
    (root / "metrics" / "details" / "future_stage.json").write_text('{"evaluate": 12}')
    inputs = load(root)
    for key, figure in report.drawn_figures(inputs):
        figure.savefig(tmp_path / "drawn.png")
        inputs.figures[key] = tmp_path / "drawn.png"
    built = report.build_sections(inputs)
    assert [s.id for s in built][-4:] == ["experiments", "wall_time", "timing", "configuration"]
    md = report.render_markdown(built, RUN, lambda f: f.key)
    html = report.render_html(built, RUN)
    assert "Evaluation took 12 s." in summary_items(inputs)
    for text in ("Where the time goes", "| evaluate | 12 |", "A figure a stage already draws.",
                 "A figure the report draws.", "evaluate/brand_new", "future_stage/something",
                 "The never_run stage has not produced its outputs yet"):
        assert text in md, text
    assert "A figure a stage already draws." in html
    assert "other" not in [s.id for s in built]  # its one figure is collected by the new entry
