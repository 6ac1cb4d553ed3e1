"""`retrieval serve`: the search page in a real headless Chromium (Debian's, driven by
Playwright), and its error pages over plain HTTP, against one uvicorn server on a tiny index."""

import html
import os
import re
import shutil
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn
from PIL import Image, ImageDraw

from retrieval import cli, config, data, models, report, search, webapp
from retrieval import gallery as gallery_files
from retrieval import threshold as thresholds
from tests.conftest import call_cli

IMAGE_SIZE = 48
K = 5
SHAPES = {"red_square": ((220, 30, 30), "rectangle"), "blue_disc": ((30, 60, 220), "ellipse"),
          "green_square": ((30, 200, 60), "rectangle")}
PER_CLASS = 3
QUERY = "blue_disc/1.png"  # the image the browser uploads
SAME = 3  # evaluate's threshold is set so that this many neighbours of QUERY are "same"
CHECKPOINT_THRESHOLD = 1.9  # the page must use evaluate's threshold, not the checkpoint's
CARD_THRESHOLD = 0.0123  # nor the index card's copy
N_QUERIES = 25  # rows of the per-query table: two pages of 20


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A tiny untrained model, 9 PNG files in class folders and their saved index (manifest,
    card) as the contract describes; per_query.csv as evaluate writes it."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    net = models.EmbeddingNet(config.ModelConfig(hidden_dim=32, embedding_dim=16)).eval()
    model = root / "model.pt"
    models.save_checkpoint(model, net, {"threshold": CHECKPOINT_THRESHOLD, "stage": "test",
                                        "classes": list(SHAPES), "image_size": IMAGE_SIZE})
    rows = []
    for name, (colour, shape) in SHAPES.items():
        for i in range(PER_CLASS):
            image = Image.new("RGB", (56 + 8 * i, 48), (240, 240, 240))
            getattr(ImageDraw.Draw(image), shape)((6 + 3 * i, 6, 40 + 4 * i, 40), fill=colour)
            file = root / "images" / name / f"{i}.png"
            file.parent.mkdir(parents=True, exist_ok=True)
            image.save(file)
            rows.append({"path": f"{name}/{i}.png", "label": name, "file": str(file),
                         "content_hash": data.content_hash(file)})
    manifest = pd.DataFrame(rows)
    loaded, _ = cli.load_model(model, torch.device("cpu"))
    vectors = cli.embed(loaded, [cli.load_image(Path(f)) for f in manifest["file"]], IMAGE_SIZE,
                        torch.device("cpu"))
    index = root / "gallery.faiss"
    search.save_index(search.build_index(vectors), index)
    manifest.to_csv(index.with_suffix(".csv"), index=False)

    query = manifest.index[manifest["path"] == QUERY][0]
    distances = np.linalg.norm(vectors - vectors[query], axis=1)
    order = np.argsort(distances, kind="stable")
    below, above = distances[order[SAME - 1]], distances[order[SAME]]
    assert above - below > 1e-3, "the tiny model ties two neighbours: change the images"
    threshold = float((below + above) / 2)
    # As evaluate saves it: beside the checkpoint, with its SHA-256.
    thresholds.save(thresholds.card(threshold, model, "unfrozen", 40, "accuracy"),
                    thresholds.beside(model))
    card = gallery_files.card(model, vectors.shape[1], len(manifest), image_size=IMAGE_SIZE,
                              threshold=CARD_THRESHOLD)
    pd.Series(card).to_json(index.with_suffix(".json"))

    queries = root / "per_query.csv"
    picked = manifest.iloc[[i % len(manifest) for i in range(N_QUERIES)]]
    pd.DataFrame({"path": picked["path"].to_numpy(), "label": picked["label"].to_numpy(),
                  "file": picked["file"].to_numpy(), "ap": np.linspace(0.05, 1.0, N_QUERIES),
                  "precision_at_1": [0.0] * 10 + [1.0] * (N_QUERIES - 10)}
                 ).to_csv(queries, index=False)
    return types.SimpleNamespace(root=root, model=model, index=index, queries=queries,
                                 manifest=manifest, threshold=threshold,
                                 query_file=manifest["file"][query],
                                 expected=[(manifest["path"][i], distances[i]) for i in order[:K]])


@pytest.fixture(scope="module")
def server(gallery):
    """The app under uvicorn in a background thread on a free port of 127.0.0.1: its URL."""
    app = webapp.create_app(gallery.index, gallery.model, gallery.queries, "cpu", K)
    listener = cli.bind("127.0.0.1", 0)
    port = listener.getsockname()[1]
    served = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=served.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not served.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    served.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        reason = ("Debian's chromium is not installed (`apt-get install chromium`; .ci/run "
                  "installs it)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: the browser test must run in CI")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser download is not reachable offline: the system's chromium.
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    opened = browser.new_page()
    opened.set_default_timeout(5000)  # a missing element fails in 5 s, not Playwright's 30
    yield opened
    opened.close()


def texts(locator) -> list[str]:
    return [text.strip() for text in locator.all_inner_texts()]


# --------------------------------------------------------------------------- in the browser


def test_upload_shows_the_neighbours_with_classes_distances_and_decisions(server, page,
                                                                          gallery):
    page.goto(server + "/")
    assert page.get_by_test_id("example").count() == min(webapp.EXAMPLES, len(gallery.manifest))
    page.get_by_test_id("upload-input").set_input_files(gallery.query_file)
    page.get_by_test_id("upload-submit").click()
    page.wait_for_load_state()

    cards = page.get_by_test_id("neighbour")
    assert cards.count() == K
    assert texts(cards.get_by_test_id("rank")) == [str(r) for r in range(1, K + 1)]
    shown_paths = texts(cards.get_by_test_id("path"))
    distances = [float(d) for d in texts(cards.get_by_test_id("distance"))]
    assert shown_paths == [path for path, _ in gallery.expected]
    np.testing.assert_allclose(distances, [d for _, d in gallery.expected], atol=2e-4)
    # The uploaded file is in the gallery: it comes first, at distance ~0, flagged, and only it.
    assert shown_paths[0] == QUERY and distances[0] < 1e-3
    assert cards.first.get_by_test_id("self-flag").inner_text() == "the query itself"
    assert page.get_by_test_id("self-flag").count() == 1
    labels = texts(cards.get_by_test_id("label"))
    assert labels[0] == "blue_disc" and set(labels) <= set(SHAPES)
    assert labels == [path.split("/")[0] for path in shown_paths]
    # Decided at evaluate's threshold (not the checkpoint's, nor the card's copy), and the page
    # says which and where from.
    assert page.get_by_test_id("threshold-value").inner_text() == f"{gallery.threshold:.4f}"
    source = page.get_by_test_id("threshold-source").inner_text()
    assert "evaluate's" in source and thresholds.beside(gallery.model).as_posix() in source
    decisions = texts(cards.get_by_test_id("decision"))
    assert decisions == ["same"] * SAME + ["different"] * (K - SAME)
    # The thumbnails are served by /image/{id} and decode in the browser.
    widths = page.locator("[data-testid=neighbour] img").evaluate_all(
        "images => images.map(image => image.naturalWidth)")
    assert len(widths) == K and all(0 < w <= webapp.THUMBNAIL_SIDE for w in widths)
    assert page.locator("[data-testid=query] img").evaluate("image => image.naturalWidth") > 0


def test_test_queries_page_worst_first_and_link_to_their_results(server, page, gallery):
    page.goto(server + "/queries")
    rows = page.get_by_test_id("query-row")
    assert rows.count() == webapp.QUERIES_PER_PAGE
    assert "Page 1 of 2" in page.get_by_test_id("page-info").inner_text()
    aps = [float(a) for a in texts(page.get_by_test_id("query-ap"))]
    assert aps == sorted(aps) and aps[0] == pytest.approx(0.05, abs=1e-3)
    assert page.get_by_test_id("prev-page").count() == 0

    page.get_by_test_id("next-page").click()
    page.wait_for_load_state()
    assert page.get_by_test_id("query-row").count() == N_QUERIES - webapp.QUERIES_PER_PAGE
    assert "Page 2 of 2" in page.get_by_test_id("page-info").inner_text()
    assert page.get_by_test_id("next-page").count() == 0

    link = page.get_by_test_id("query-link").first
    path = link.inner_text().strip()
    link.click()
    page.wait_for_load_state()
    assert page.url.endswith(f"/queries/{webapp.QUERIES_PER_PAGE + 1}")
    assert page.get_by_test_id("query-title").inner_text() == path
    assert page.get_by_test_id("query-label").inner_text() == path.split("/")[0]
    cards = page.get_by_test_id("neighbour")
    assert cards.count() == K
    assert cards.first.get_by_test_id("path").inner_text() == path
    assert cards.first.get_by_test_id("self-flag").count() == 1


# --------------------------------------------------------------------------- plain HTTP


def fetch(request: urllib.request.Request | str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def upload(server: str, name: str, content: bytes) -> tuple[int, str]:
    boundary = "retrieval-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"'
            f"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + content + \
        f"\r\n--{boundary}--\r\n".encode()
    return fetch(urllib.request.Request(
        server + "/search", data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}))


def error_line(page: str) -> str:
    found = re.search(r'data-testid="error-message">(.*?)</p>', page, re.S)
    assert found, page[:500]
    message = html.unescape(found.group(1))
    assert "\n" not in message and "Traceback" not in page
    return message


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("notes.png", b"not an image at all", "the uploaded file notes.png is not an image"),
    ("empty.jpg", b"", "the uploaded file empty.jpg is empty: choose an image file"),
])
def test_a_bad_upload_is_a_400_page_with_one_line(server, name, content, expected):
    status, page = upload(server, name, content)
    assert status == 400
    assert error_line(page).startswith(expected)


def test_missing_queries_file_says_to_run_evaluate(server, gallery):
    moved = gallery.queries.with_suffix(".moved")
    gallery.queries.rename(moved)
    try:
        status, page = fetch(server + "/queries")
    finally:
        moved.rename(gallery.queries)
    assert status == 404
    assert "run `dvc repro evaluate`" in error_line(page)


@pytest.mark.parametrize(("path", "status", "expected"), [
    ("/image/99", 404, "the gallery has no item 99: ids run from 0 to 8"),
    ("/search?id=x", 400, "bad request: query id"),
    ("/queries?page=3", 404, "page 3 does not exist: the queries fill pages 1 to 2"),
    ("/queries/26", 404, "there is no test query 26"),
])
def test_bad_addresses_are_one_line_pages(server, path, status, expected):
    code, page = fetch(server + path)
    assert code == status and error_line(page).startswith(expected)


def test_a_gallery_item_can_be_the_query(server, gallery):
    status, page = fetch(server + "/search?id=4")
    assert status == 200
    assert page.count('data-testid="neighbour"') == K
    assert page.count('data-testid="self-flag"') == 1
    assert f'data-testid="query-title">{gallery.manifest["path"][4]}<' in page


# --------------------------------------------------------------------------- pieces


def test_compare_the_report_and_the_search_page_agree_on_the_threshold(server, gallery,
                                                                     capsys, tmp_path):
    """One threshold: `retrieval compare`, the report and the search page decide with the same
    one for the same checkpoint (evaluate's, saved beside it), and reach the same decisions."""
    query = gallery.manifest.index[gallery.manifest["path"] == QUERY][0]
    status, page = fetch(f"{server}/search?id={query}")
    assert status == 200
    shown = re.search(r'data-testid="threshold-value">([0-9.]+)<', page).group(1)
    paths = re.findall(r'data-testid="path">([^<]+)<', page)
    decisions = re.findall(r'data-testid="decision" class="(\w+)"', page)
    assert len(paths) == len(decisions) == K

    compared = {}
    for path, decision in zip(paths, decisions, strict=True):
        other = gallery.manifest["file"][gallery.manifest["path"] == path].iloc[0]
        code, out, _ = call_cli(["compare", gallery.query_file, other, "--model", gallery.model,
                                 "--output", tmp_path / "pair.png"], capsys)
        assert code == 0, out
        said = re.search(r"decision: +(same class|different classes) +\(same when distance <= "
                         r"threshold ([0-9.]+)\)", out)
        assert said.group(2) == shown, out
        assert "threshold:  evaluate's" in out
        compared[path] = "same" if said.group(1) == "same class" else "different"
        assert compared[path] == decision, (path, out)
    assert list(compared.values()) == ["same"] * SAME + ["different"] * (K - SAME)

    inputs = report.Inputs(metrics={"evaluate": {"unfrozen": {"threshold": gallery.threshold}}},
                           threshold=thresholds.of_evaluate(gallery.model))
    section = next(s for s in report.build_sections(inputs) if s.id == "verification")
    text = " ".join(block.text for block in section.blocks if isinstance(block, report.Text))
    assert f"distance <= {shown} is" in text and "evaluate's" in text
    assert thresholds.beside(gallery.model).as_posix() in text


def test_serve_checks_its_arguments_before_starting(gallery, capsys, tmp_path):
    code, _, err = call_cli(["serve", "--index", tmp_path / "none.faiss", "--model",
                             gallery.model], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "--index file" in err and "does not exist" in err
    code, _, err = call_cli(["serve", "--index", gallery.index, "--model", tmp_path / "m.pt"],
                            capsys)
    assert code == 2 and "--model file" in err
    busy = cli.bind("127.0.0.1", 0)
    try:
        code, _, err = call_cli(["serve", "--index", gallery.index, "--model", gallery.model,
                                 "--port", busy.getsockname()[1]], capsys)
    finally:
        busy.close()
    assert code == 2 and "cannot listen on 127.0.0.1" in err
