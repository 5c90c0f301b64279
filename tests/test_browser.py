"""The whole dashboard in a real browser: `streamlit run dashboard/app.py` serving the tiny run and a tiny
study (with a hand-made CapFilt output in its data/), Debian's Chromium driven by Playwright visiting every
page (home + pages 0-9), a real photo uploaded on the Caption page, the Runs page's health column, and a
screenshot of each under test-artifacts/browser/ (gitignored).

Without /usr/bin/chromium the test is skipped, except under CI (env CI set), where .ci/run installs
it and its absence is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from blipcore.paths import COCO_CC_BY_FIXTURE, PROJECT_ROOT

REPO = PROJECT_ROOT  # the checkout the installed packages come from
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
PHOTOS = COCO_CC_BY_FIXTURE / "images"  # real photos in the repository
ARTIFACTS = REPO / "test-artifacts" / "browser"
# URL path (st.Page derives it from the file name: views/5_Decoding_lab.py -> /Decoding_lab) -> the
# element that shows the page has drawn its content.
PAGES = {
    "": '[data-testid="stDataFrame"]',  # Runs (home): the runs table
    "Diagnosis": '[data-testid="stDataFrame"]',  # the findings table
    "Training": ".js-plotly-plot",
    "Alignment": ".js-plotly-plot",
    "Embeddings": '[data-testid="stVegaLiteChart"] .mark-symbol path',
    "Attention": ".js-plotly-plot",
    "Decoding_lab": '[data-testid="stDataFrame"]',  # its first tab: the captions side by side
    "Caption": '[data-testid="stTable"]',
    "Compare": '[data-testid="stDataFrame"]',  # its first tab: the metrics tables
    "Study": '[data-testid="stDataFrame"]',  # its first tab: the study table
    "CapFilt": ".js-plotly-plot",  # its first tab: the score histograms
}
PAGE_FILES = ("app.py", *(f"views/{n}_{p}.py" for n, p in enumerate([p for p in PAGES if p])))
START_TIMEOUT_S = 60
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; under CI .ci/run installs it, so this is a broken CI image")
        pytest.skip(reason)
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not answer {url}/_stcore/health within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serve(runs_dir: Path, log_name: str = "streamlit.log") -> Iterator[str]:
    """`streamlit run dashboard/app.py` on a free port, yielding its URL once healthy; always stopped."""
    missing = [f"dashboard/{p}" for p in PAGE_FILES if not (REPO / "dashboard" / p).is_file()]
    if missing:
        pytest.fail(f"the dashboard is incomplete, missing: {', '.join(missing)}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port, log = _free_port(), ARTIFACTS / log_name
    command = [
        sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--runs-dir", str(runs_dir),
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def runs_with_study(chromium: Path, tmp_path_factory, tiny_runs_dir: Path, shapes_root: Path) -> Path:
    """A copy of the tiny run beside a tiny study, `tiny-study` (1 seed x 2 variants, tests/test_study.py's
    plan): sorted after `tiny`, so every run picker still opens `tiny` first. The study's data/ holds a
    hand-made CapFilt output (tests/test_dashboard_capfilt.py's), which the CapFilt page opens."""
    from tests.test_dashboard_capfilt import make_capfilt_folder
    from tests.test_dashboard_study import build_tiny_study

    runs = tmp_path_factory.mktemp("browser-runs")
    shutil.copytree(tiny_runs_dir / "tiny", runs / "tiny", ignore=shutil.ignore_patterns("last"))
    build_tiny_study(shapes_root, runs / "tiny-study")
    make_capfilt_folder(runs / "tiny-study" / "data" / "boot", runs / "capfilt-images")
    return runs


@pytest.fixture(scope="module")
def server(chromium: Path, runs_with_study: Path) -> Iterator[str]:
    """The dashboard served on a free port for this module."""
    with serve(runs_with_study) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    opened = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        yield opened
    finally:
        opened.close()


def settle(page: Page) -> None:
    """Wait until Streamlit has finished running the page's script (and its reruns)."""
    state = "document.querySelector('[data-testid=stApp]')?.dataset.testScriptState"
    page.wait_for_function(f"{state} === 'notRunning'", timeout=PAGE_TIMEOUT_MS)


def assert_no_error(page: Page, where: str) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{where}: {exceptions.first.inner_text()[:2000]}"
    assert "Traceback" not in page.inner_text("body"), f"{where} shows a traceback"


def screenshot(page: Page, name: str) -> None:
    """The whole page (Streamlit scrolls inside its main block, so the viewport is stretched to it)."""
    height = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]')?.scrollHeight ?? 1000")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 150, 12_000)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.mark.parametrize("path", list(PAGES), ids=[p or "Runs" for p in PAGES])
def test_page_renders_without_errors(server: str, page: Page, path: str) -> None:
    page.goto(f"{server}/{path}")
    page.wait_for_selector(PAGES[path], timeout=PAGE_TIMEOUT_MS)
    settle(page)
    assert_no_error(page, f"/{path}")
    screenshot(page, path or "Runs")


# (page, tab to click, text that only the tab's content has): lazy tabs rerun the page and draw then
TABS = [
    ("Training", "Optimisation", "learning rate"),
    ("Alignment", "Retrieval R@K", "Chance level with"),
    ("Decoding_lab", "Step by step: probability and entropy", "how unsure the model was"),
    ("Compare", "How far the embeddings moved", "Mean cosine distance between"),
    ("Study", "Curves by variant", "One colour per variant"),
    ("CapFilt", "Threshold", "Each row: what keeping"),
]


@pytest.mark.parametrize("path, tab, content", TABS, ids=[t[0] for t in TABS])
def test_a_lazy_tab_draws_its_section_when_clicked(server: str, page: Page, path: str, tab: str, content: str):
    page.goto(f"{server}/{path}")
    page.wait_for_selector(PAGES[path], timeout=PAGE_TIMEOUT_MS)
    settle(page)
    assert content not in page.inner_text('[data-testid="stMain"]')
    page.get_by_role("tab", name=tab).click()
    page.get_by_text(content).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_selector('[data-testid="stMain"] .js-plotly-plot', timeout=PAGE_TIMEOUT_MS)  # its chart drawn
    settle(page)
    assert_no_error(page, f"/{path}, tab {tab}")


def test_embeddings_hover_shows_the_image_and_a_click_picks_the_pair(server: str, page: Page) -> None:
    page.goto(f"{server}/Embeddings")
    page.wait_for_selector(PAGES["Embeddings"], timeout=PAGE_TIMEOUT_MS)
    settle(page)
    dots = page.locator('[data-testid="stVegaLiteChart"] .mark-symbol').first.locator("path")
    tooltip = page.locator("#vg-tooltip-element")
    dot = dots.nth(dots.count() - 1)  # the last caption drawn: on top of everything else of its layer
    dot.hover()
    tooltip.locator("img").wait_for(timeout=PAGE_TIMEOUT_MS)  # the thumbnail of the pair's image
    assert tooltip.locator("img").get_attribute("src").startswith("data:image/webp;base64,")
    pair = int(re.search(r"pair\s*(\d+)", tooltip.inner_text()).group(1))
    assert pair != 0  # the inspector starts on pair 0; the click must move it
    dot.click()
    page.get_by_text(f"image {pair}", exact=True).wait_for(timeout=PAGE_TIMEOUT_MS)  # the inspector follows
    settle(page)
    assert_no_error(page, "/Embeddings after a click")


def sidebar_choice(page: Page, label: str) -> str:
    """The value a sidebar selectbox shows (its combobox input holds it)."""
    return page.locator(f'[data-testid="stSidebar"] input[role="combobox"][aria-label="{label}"]').input_value()


def test_a_page_url_opens_its_run_and_the_next_page_keeps_it(server: str, page: Page, runs_with_study: Path):
    """`?run=NAME` (a bookmark, a shared link, the screenshot command) opens that run rather than the first one;
    the sidebar's link to another page carries the choice."""
    from blipcore.runs.rundir import list_runs

    name = list_runs(runs_with_study)[-1].name  # a study's run: "tiny-study/<stage>-<variant>-seed0", not the first
    page.goto(f"{server}/Alignment?run={urllib.parse.quote(name)}")
    page.wait_for_selector(PAGES["Alignment"], timeout=PAGE_TIMEOUT_MS)
    settle(page)
    assert sidebar_choice(page, "Run") == name
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Embeddings").first.click()
    page.wait_for_selector(PAGES["Embeddings"], timeout=PAGE_TIMEOUT_MS)
    settle(page)
    assert sidebar_choice(page, "Run") == name
    assert urllib.parse.unquote(page.url).endswith(f"Embeddings?run={name}")
    assert_no_error(page, "/Embeddings opened from a bookmarked /Alignment")


def test_the_screenshot_command_opens_the_run_it_is_given(chromium: Path, runs_with_study: Path, tmp_path: Path):
    """benchmarks/page_render_times.py, which takes the docs' screenshots: --run opens the pages on that run (the
    Embeddings page caches its PCA layout in the run it shows), and a name it does not know, or --pages naming no
    page, is one line listing what there is."""
    from PIL import Image

    from blipcore.runs.rundir import list_runs

    script = [sys.executable, str(REPO / "benchmarks" / "page_render_times.py"), "--runs-dir", str(runs_with_study),
              "--chromium", str(chromium), "--repeat", "1"]
    wrong = subprocess.run([*script, "--run", "no-such-run"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and f"no run named 'no-such-run' in {runs_with_study}; its runs: tiny" in wrong.stderr
    no_page = subprocess.run([*script, "--pages", "Nowhere"], capture_output=True, text=True, timeout=60)
    assert no_page.returncode == 1 and "names no page; the pages are: , Diagnosis, Training" in no_page.stderr

    run = list_runs(runs_with_study)[1]  # a study's run, neither the first (which pages open by default) nor the
    assert not (run.path / "projections").exists()  # one the other tests open by URL
    done = subprocess.run([*script, "--run", run.name, "--pages", "Embeddings", "--screenshots", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^Embeddings\s+\d+\.\d\ds", done.stdout, re.MULTILINE), done.stdout
    assert [p.name for p in (run.path / "projections").glob("pca_epoch_*.npz")]  # the page showed this run
    assert [p.name for p in tmp_path.iterdir()] == ["05_embeddings.png"]
    with Image.open(tmp_path / "05_embeddings.png") as shot:
        assert shot.width == 1400 and shot.height > 600


def test_the_tensorboard_screenshot_command_draws_both_tabs(chromium: Path, tiny_runs_dir: Path, tmp_path: Path):
    """benchmarks/tensorboard_screenshots.py exports the run, serves it with TensorBoard and saves the Time Series
    tab once its charts have drawn their series, and the projector once its PCA is drawn, coloured by modality."""
    from PIL import Image

    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tensorboard_screenshots.py"), "--run-dir",
         str(tiny_runs_dir / "tiny"), "--out", str(tmp_path), "--chromium", str(chromium), "--timeout", "120"],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensorboard-projector.png", "tensorboard-scalars.png"]
    with Image.open(tmp_path / "tensorboard-projector.png") as shot:
        assert shot.size == (1400, 900)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # the projector's canvas drew something: a blank plot is a few flat colours
    missing = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tensorboard_screenshots.py"), "--run-dir", str(tmp_path / "none"),
         "--out", str(tmp_path), "--chromium", str(chromium)], capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert missing.returncode == 1 and missing.stderr.startswith("train export failed:")


def test_the_runs_page_shows_each_runs_health(server: str, page: Page) -> None:
    """The health column (the worst finding of the run's diagnosis, or "healthy") and the findings in one line,
    as the browser draws them: the runs table is a canvas, so its cells are read from the grid's accessible text."""
    page.goto(server)
    page.wait_for_selector(PAGES[""], timeout=PAGE_TIMEOUT_MS)
    settle(page)
    table = page.locator('[data-testid="stDataFrame"]').first
    # the grid fills its accessible cells after it draws, and only for the columns in view ("diagnosis" is further
    # right): wait for the health column and one of its values
    table.locator('[role="columnheader"]', has_text="health").first.wait_for(state="attached", timeout=PAGE_TIMEOUT_MS)
    health = re.compile(r"^\s*(healthy|info|warning|error)\s*$")
    table.locator('[role="gridcell"]').filter(has_text=health).first.wait_for(state="attached", timeout=PAGE_TIMEOUT_MS)
    assert_no_error(page, "/ (the Runs page)")
    screenshot(page, "Runs_health")


def test_caption_page_captions_an_uploaded_photo(server: str, page: Page) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert photos, f"no photos in {PHOTOS}"
    page.goto(f"{server}/Caption")
    page.wait_for_selector('[data-testid="stTable"]', timeout=PAGE_TIMEOUT_MS)  # the sample validation image
    settle(page)
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(photos[0])
    page.get_by_text(photos[0].name).first.wait_for(timeout=PAGE_TIMEOUT_MS)  # its thumbnail's caption
    page.wait_for_function("document.querySelectorAll('[data-testid=stTable]').length === 2", timeout=PAGE_TIMEOUT_MS)
    settle(page)
    assert_no_error(page, "/Caption after an upload")
    rows = page.locator('[data-testid="stTable"]').first.inner_text()
    assert re.search(r"tiny\s+2\s+\S+", rows), f"no caption by tiny epoch 2 for {photos[0].name}: {rows!r}"
    screenshot(page, "Caption_upload")


def test_a_fresh_servers_first_request_for_a_page_gets_the_dashboards_navigation(chromium, tiny_runs_dir, page):
    """A bookmark opened on a just-started server: the page must run inside app.py's navigation (sections,
    "Runs" home), not alone as a Streamlit v1 multipage app listing file names ("app", ...)."""
    with serve(tiny_runs_dir, "streamlit_first_request.log") as url:
        page.goto(f"{url}/Alignment")
        page.wait_for_selector(PAGES["Alignment"], timeout=PAGE_TIMEOUT_MS)
        settle(page)
        nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
        assert "Training dynamics" in nav and "Runs" in nav, nav
        assert not re.search(r"^app$", nav, re.MULTILINE), nav
        assert_no_error(page, "/Alignment as a fresh server's first request")
