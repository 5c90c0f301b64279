"""Render time of every dashboard page in a real browser, with warm caches.

Starts `streamlit run dashboard/app.py` on a free port, opens every page once to fill the caches
(model loads, decoding, projections), then times each page again: from navigation until Streamlit
has finished the script run and the page's main element (a chart or table) is drawn. Needs Debian's
chromium and the runs folder to hold at least one trained run.

    python benchmarks/page_render_times.py --runs-dir runs --repeat 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
PAGES = {
    "Runs": ("", '[data-testid="stDataFrame"]'),
    "Training": ("Training", ".js-plotly-plot"),
    "Alignment": ("Alignment", ".js-plotly-plot"),
    "Embeddings": ("Embeddings", ".js-plotly-plot"),
    "Attention": ("Attention", ".js-plotly-plot"),
    "Decoding lab": ("Decoding_lab", ".js-plotly-plot"),
    "Caption": ("Caption", '[data-testid="stTable"]'),
    "Compare": ("Compare", ".js-plotly-plot"),
}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCRIPT_DONE = "document.querySelector('[data-testid=stApp]')?.dataset.testScriptState === 'notRunning'"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"streamlit did not answer at {url} within {timeout_s} s")


def render_time(page, url: str, selector: str) -> float:
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_selector(selector, timeout=120_000)
    page.wait_for_function(SCRIPT_DONE, timeout=120_000)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
         "--server.headless", "true", "--", "--runs-dir", args.runs_dir],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_healthy(url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            cold = {name: render_time(page, f"{url}/{path}", sel) for name, (path, sel) in PAGES.items()}
            print(f"{'page':14s} {'first visit':>12s} {'warm median':>12s} {'warm min':>9s}")
            for name, (path, selector) in PAGES.items():
                warm = [render_time(page, f"{url}/{path}", selector) for _ in range(args.repeat)]
                print(f"{name:14s} {cold[name]:11.2f}s {statistics.median(warm):11.2f}s {min(warm):8.2f}s")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
