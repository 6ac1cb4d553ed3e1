"""`dvc plots show` / `dvc plots diff` pages work offline, and every plotted series is complete.

The real DVC renders the project's own plots (dvc.yaml's top-level plots over the committed
history.csv and roc.csv) through `.dvc/config`'s template, in a throw-away git repository made
from this checkout's files; headless Chromium then loads the page with every request other than
the page's own file refused, and the charts must draw.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from retrieval import offline_plots
from retrieval.outputs import UserError
from tests import test_serve
from tests.conftest import REPO, _tracked_files, run

browser = test_serve.browser  # Debian's chromium through Playwright (skips, or fails in CI)

TOP_LEVEL_PLOTS = [next(iter(p)) for p in
                   yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]]
HISTORY_PLOTS = [name for name in TOP_LEVEL_PLOTS if name.startswith("train_")]

# Wraps vegaEmbed as the inlined vega-embed defines it, to keep each embedding's promise.
CAPTURE_EMBEDS = """
window.__embeds = [];
Object.defineProperty(window, 'vegaEmbed', {configurable: true, get() { return undefined; },
  set(embed) { Object.defineProperty(window, 'vegaEmbed', {configurable: true, writable: true,
    value: (...args) => { const p = embed(...args); window.__embeds.push(p); return p; }}); }});
"""

# Per chart: its div, and how many items of each mark type its scenegraph drew.
DRAWN = """async () => {
  const results = await Promise.all(window.__embeds);
  const tally = (node, acc) => {
    if (node.marktype) acc[node.marktype] = (acc[node.marktype] || 0) + (node.items || []).length;
    for (const child of node.items || []) tally(child, acc);
    return acc;
  };
  return results.map(r => ({
    id: r.view.container().closest('[id]').id,
    marks: tally(r.view.scenegraph().root, {}),
    canvases: r.view.container().querySelectorAll('canvas').length}));
}"""


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's files (outputs that git tracks included) committed in a new repo."""
    repo = tmp_path_factory.mktemp("plots")
    for name in _tracked_files():
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    run("git init -q -b main && git add -A && git -c user.name=t -c user.email=t@t "
        "commit -qm init", cwd=repo)
    return repo


def specs(page: Path) -> dict[str, dict]:
    """The Vega-Lite spec DVC wrote for each chart, by its div id."""
    found = re.finditer(r"var spec = (\{.*?\});\s*vegaEmbed\('#(\w+)'", page.read_text(), re.S)
    return {m.group(2): json.loads(m.group(1)) for m in found}


def load_offline(browser, page_file: Path) -> tuple[list[dict], list[str], list[str]]:
    """Open the page with the network refused: (charts drawn, requests, errors and
    warnings)."""
    page = browser.new_page()
    requests: list[str] = []
    errors: list[str] = []

    def only_the_file(route) -> None:
        requests.append(route.request.url)
        if route.request.url == page_file.as_uri():
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_the_file)
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Vega-Lite warns on the console about encodings it drops: a template bug.
    page.on("console", lambda m: errors.append(f"{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.add_init_script(CAPTURE_EMBEDS)
    try:
        page.goto(page_file.as_uri())
        drawn = page.evaluate(DRAWN)
    finally:
        page.close()
    return drawn, requests, errors


def assert_drawn(drawn: list[dict], names: list[str], series: dict[str, int]) -> None:
    assert [chart["id"] for chart in drawn] == names
    for chart in drawn:
        assert chart["canvases"] == 1, chart
        # One line per series (the field, file or model) and revision, each with its points.
        assert chart["marks"].get("line", 0) >= series[chart["id"]], chart


def test_dvc_is_configured_for_the_offline_template():
    config = run(["dvc", "config", "plots.html_template"], cwd=REPO)
    assert config.stdout.strip() == "plots/offline.html"  # relative to .dvc/
    template = (REPO / ".dvc" / config.stdout.strip()).read_text()
    assert "{plot_divs}" in template and "{scripts}" not in template
    assert not re.search(r"<script[^>]+src=", template)  # nothing loaded from anywhere
    for script in offline_plots.SCRIPTS:
        assert f"{script.package}@{script.version} {script.path} sha256 " in template
    assert (REPO / ".dvc" / "plots" / "offline-LICENSE.txt").read_text().count("BSD") >= 3


def test_the_template_inlines_scripts_dvc_cannot_break():
    sources = {s: f"window.{s.package.replace('-', '_')} = {{}};" for s in offline_plots.SCRIPTS}
    page = offline_plots.build_template(sources)
    assert page.count("<script>") == 3 and "{plot_divs}" in page and "{refresh_tag}" in page
    first = next(iter(sources))
    with pytest.raises(UserError, match="</script"):
        offline_plots.build_template({**sources, first: "x = '</script>';"})
    with pytest.raises(UserError, match="placeholder"):
        offline_plots.build_template({**sources, first: "x = '{plot_divs}';"})
    with pytest.raises(UserError, match="missing scripts: vega"):
        offline_plots.build_template({s: v for s, v in sources.items() if s != first})


def test_every_history_series_has_a_value_at_every_epoch(plots_repo):
    run(["dvc", "plots", "show", *HISTORY_PLOTS, "-o", "series"], cwd=plots_repo)
    charts = specs(plots_repo / "series" / "index.html")
    assert set(charts) == set(HISTORY_PLOTS)
    for name, spec in charts.items():
        values = pd.DataFrame(spec["data"]["values"])
        epochs = set(values["epoch"])
        for (field, source), rows in values.groupby(["field", "rev"]):
            numbers = pd.to_numeric(rows["dvc_inferred_y_value"], errors="coerce")
            missing = sorted(epochs - set(rows.loc[numbers.notna(), "epoch"]), key=int)
            assert not missing, f"{name}: {field} ({source}) has no value at epochs {missing}"


def test_dvc_plots_show_renders_offline_in_chromium(plots_repo, browser):
    run(["dvc", "plots", "show", *TOP_LEVEL_PLOTS, "-o", "show"], cwd=plots_repo)
    page = plots_repo / "show" / "index.html"
    drawn, requests, errors = load_offline(browser, page)
    assert requests == [page.as_uri()]  # the scripts are in the page: nothing else is fetched
    assert errors == []
    # train vs val per training plot, both stages' lr, and one ROC curve per model.
    assert_drawn(drawn, TOP_LEVEL_PLOTS, {**dict.fromkeys(HISTORY_PLOTS, 2),
                                          "learning_rate": 2, "roc": 3})


def test_dvc_plots_diff_renders_both_revisions_offline(plots_repo, browser):
    history = plots_repo / "plots/train_frozen/history.csv"
    committed = history.read_text()
    try:
        table = pd.read_csv(history)
        table["val_loss"] *= 1.5  # a workspace change for the diff against HEAD
        table.to_csv(history, index=False)
        run(["dvc", "plots", "diff", "HEAD", "--targets", "train_frozen_loss", "-o", "diff"],
            cwd=plots_repo)
    finally:
        history.write_text(committed)
    page = plots_repo / "diff" / "index.html"
    values = pd.DataFrame(specs(page)["train_frozen_loss"]["data"]["values"])
    assert set(values["rev"]) == {"HEAD", "workspace"}
    drawn, requests, errors = load_offline(browser, page)
    assert requests == [page.as_uri()] and errors == []
    assert_drawn(drawn, ["train_frozen_loss"], {"train_frozen_loss": 4})  # 2 fields x 2 revs
