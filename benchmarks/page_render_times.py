"""Render time of every dashboard page in a real browser, with warm caches, against Streamlit's floor.

Starts `streamlit run dashboard/app.py` on a free port, opens every page once to fill the caches
(model loads, decoding, projections), then times each page two ways:

- reload: a fresh page load of the page's URL (a bookmark, F5): Streamlit's frontend starts, opens a
  connection to the server and runs the page's script;
- click: the page's link in the sidebar clicked from another page (how people move around the app).

Each is timed from the action until the script run has finished and everything on the page is
drawn: no element is stale or still a loading placeholder, every plotly and Vega-Lite chart has
its SVG, every image has loaded. The peer,
measured in the same run, is Streamlit's own floor: a second server with a one-line page, timed the
same way; the ratio column says how many of those floors a page costs. Needs Debian's chromium and
a runs folder holding at least one trained run (`make train-demo`).

    python benchmarks/page_render_times.py --runs-dir runs --repeat 5
    python benchmarks/page_render_times.py --runs-dir runs --repeat 1 --screenshots docs/screenshots
    python benchmarks/page_render_times.py --runs-dir runs --run study-small-data/screening-augment-seed0 \
        --pages Alignment,Embeddings --umap --repeat 1 --screenshots docs/screenshots/small-data

With --screenshots DIR it also saves a full-page screenshot of every page timed (01_runs.png,
02_training.png, ...), taken once the page is completely drawn: the docs' screenshots come from here.
--run opens every page on that run (the page URL's `?run=`, as a bookmark would) instead of the
first one; --umap presses the Embeddings page's UMAP button first (the layouts are cached in the run
folder), so that its screenshot shows UMAP rather than PCA.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from blipcore.paths import PROJECT_ROOT
from blipcore.runs.rundir import list_runs

# URL path of each page (st.Page derives it from the file name) -> (its link's label in the sidebar,
# the start of its title: how a timing knows that the new page, not the previous one, is showing)
PAGES = {
    "": ("Runs", "BLIP Lab"), "Diagnosis": ("Diagnosis", "Diagnosis"), "Training": ("Training", "Training"),
    "Alignment": ("Alignment", "Alignment"),
    "Embeddings": ("Embeddings", "Embeddings"), "Attention": ("Attention", "Attention"),
    "Decoding_lab": ("Decoding lab", "Decoding lab"), "Caption": ("Caption", "Caption"),
    "Compare": ("Compare", "Compare"), "Study": ("Study", "Study"), "CapFilt": ("CapFilt", "CapFilt"),
}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# True once the page titled `title` shows, its script run has finished and every chart and image of
# the main area is drawn.
ALL_DRAWN = """title => {
  const app = document.querySelector('[data-testid=stApp]');
  if (!app || app.dataset.testScriptState !== 'notRunning') return false;
  const main = document.querySelector('[data-testid=stMain]');
  if (!main || !(main.querySelector('h1')?.textContent || '').startsWith(title)) return false;
  // stale: left from the previous run; stSkeleton: an element whose code is still loading
  if (main.querySelector('[data-stale=true], [data-testid=stSkeleton]')) return false;
  if (![...main.querySelectorAll('[data-testid=stPlotlyChart]')].every(c => c.querySelector('.main-svg'))) return false;
  if (![...main.querySelectorAll('[data-testid=stVegaLiteChart]')].every(c => c.querySelector('.marks'))) return false;
  return [...main.querySelectorAll('img')].every(i => i.complete);
}"""
# The peer: two one-line pages, so that a click is timed through the same navigation as the dashboard's.
FLOOR_APP = """import streamlit as st
st.set_page_config(layout="wide")
def one(): st.title("One")
def two(): st.title("Two")
st.navigation([st.Page(one, title="One", default=True), st.Page(two, title="Two")]).run()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(what: str, command: list[str], health_path: str, timeout_s: float = 90) -> Iterator[str]:
    """Start `command` (which reads its port from "{port}") on a free port of 127.0.0.1; yield its URL once
    `health_path` answers there, and stop the server afterwards. `what` names the server in an error."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [part.replace("{port}", str(port)) for part in command], cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}{health_path}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{what} did not answer at {url}") from None
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


def streamlit_server(script: Path, *extra: str) -> contextlib.AbstractContextManager[str]:
    """`streamlit run script` on a free port; yields its URL once it answers its health check."""
    return local_server(f"streamlit run {script}",
                        [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", "{port}",
                         "--server.headless", "true", "--browser.gatherUsageStats", "false", *extra],
                        "/_stcore/health")


def wait_drawn(page: Page, title: str, timeout_s: float = 120) -> None:
    try:
        page.wait_for_function(ALL_DRAWN, arg=title, timeout=timeout_s * 1000, polling=20)
    except PlaywrightTimeoutError:
        raise SystemExit(
            f"the page titled '{title}' was not drawn within {timeout_s:.0f} s (now at {page.url})"
        ) from None


def reload_time(page: Page, url: str, title: str) -> float:
    start = time.perf_counter()
    page.goto(url)
    wait_drawn(page, title)
    return time.perf_counter() - start


def click_time(page: Page, label: str, title: str) -> float:
    link = page.locator('[data-testid="stSidebarNav"] a').filter(has_text=label).first
    start = time.perf_counter()
    link.click()
    wait_drawn(page, title)
    return time.perf_counter() - start


def compute_umap(page: Page) -> None:
    """Press the Embeddings page's "Compute UMAP" button, if it shows one, and wait until the page has
    redrawn with UMAP (every epoch's layout fitted and cached in the run folder)."""
    button = page.get_by_role("button", name="Compute UMAP for all epochs")
    if button.count():
        button.first.click()
        page.get_by_text("Compute UMAP for all epochs").wait_for(state="detached", timeout=600_000)
        wait_drawn(page, PAGES["Embeddings"][1], timeout_s=600)


def save_screenshot(page: Page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main block, so the viewport is stretched to fit it
    (charts re-lay themselves out on resize, hence the short settle), then restored."""
    viewport = page.viewport_size
    height = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]')?.scrollHeight ?? 1000")
    page.set_viewport_size({"width": viewport["width"], "height": min(int(height) + 120, 12_000)})
    page.wait_for_timeout(800)
    page.screenshot(path=str(path))
    page.set_viewport_size(viewport)


def floor_times(page: Page, repeat: int) -> tuple[float, float]:
    """Median reload and click time of a one-line Streamlit page (the peer)."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "floor.py"
        script.write_text(FLOOR_APP)
        with streamlit_server(script) as url:
            reload_time(page, f"{url}/two", "Two")
            reloads = [reload_time(page, f"{url}/two", "Two") for _ in range(repeat)]
            clicks = []
            for _ in range(repeat):
                reload_time(page, url, "One")
                clicks.append(click_time(page, "Two", "Two"))
    return statistics.median(reloads), statistics.median(clicks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs", help="runs folder the dashboard reads (default: runs)")
    parser.add_argument("--repeat", type=int, default=5, help="timed visits per page and way (median printed)")
    parser.add_argument("--pages", help="comma-separated URL paths to time and screenshot (default: every page; "
                                        "'' is Runs)")
    parser.add_argument("--screenshots", type=Path, metavar="DIR",
                        help="also save a full-page screenshot of every page timed here (NN_page.png)")
    parser.add_argument("--run", metavar="NAME",
                        help="open every page on this run (as the Runs page names it: a study's run is "
                             "STUDY/RUN) instead of the first one")
    parser.add_argument("--umap", action="store_true",
                        help="press the Embeddings page's UMAP button first, so that it shows UMAP, not PCA")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser Playwright drives")
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        raise SystemExit(f"{args.chromium} not found: install Debian's chromium (apt-get install -y chromium)")
    chosen = PAGES if args.pages is None else {p: PAGES[p] for p in args.pages.split(",") if p in PAGES}
    if not chosen:
        raise SystemExit(f"--pages {args.pages!r} names no page; the pages are: {', '.join(PAGES)} ('' is Runs)")
    if args.run is not None:
        names = [run.name for run in list_runs(args.runs_dir)]
        if args.run not in names:
            raise SystemExit(f"no run named {args.run!r} in {args.runs_dir}; its runs: {', '.join(names) or 'none'}")
    query = f"?run={urllib.parse.quote(args.run)}" if args.run else ""

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        floor_reload, floor_click = floor_times(page, args.repeat)
        with streamlit_server(PROJECT_ROOT / "dashboard" / "app.py", "--", "--runs-dir", args.runs_dir) as url:
            for number, (path, (label, title)) in enumerate(PAGES.items(), start=1):
                if path not in chosen:
                    continue
                reload_time(page, f"{url}/{path}{query}", title)  # warms every cache (models, decoding, projections)
                if path == "Embeddings" and args.umap:
                    compute_umap(page)
                if args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    save_screenshot(page, args.screenshots / f"{number:02d}_{label.lower().replace(' ', '_')}.png")
            print(f"{'page':14s} {'reload':>8s} {'× floor':>8s} {'click':>8s} {'× floor':>8s}")
            print(f"{'(floor)':14s} {floor_reload:7.2f}s {1:8.2f} {floor_click:7.2f}s {1:8.2f}")
            for path, (label, title) in chosen.items():
                reloads = [reload_time(page, f"{url}/{path}{query}", title) for _ in range(args.repeat)]
                clicks = []
                for _ in range(args.repeat):  # from another page, light to draw; the sidebar link carries the run
                    other = "Compare" if path == "Caption" else "Caption"
                    reload_time(page, f"{url}/{other}{query}", PAGES[other][1])
                    clicks.append(click_time(page, label, title))
                reload, click = statistics.median(reloads), statistics.median(clicks)
                print(f"{label:14s} {reload:7.2f}s {reload / floor_reload:8.2f} "
                      f"{click:7.2f}s {click / floor_click:8.2f}", flush=True)
        browser.close()


if __name__ == "__main__":
    main()
