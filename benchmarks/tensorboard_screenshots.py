"""Screenshots of a run's TensorBoard export: the Time Series tab and the projector, as docs/dashboard.md shows them.

Exports the run with `python -m train export` into a temporary folder, serves it with `tensorboard` on a free
port, and drives Debian's Chromium with Playwright (software WebGL, which the projector needs):

- tensorboard-scalars.png: the Time Series tab, its tag filter set to --tags (default "loss": training and
  validation losses on one chart each);
- tensorboard-projector.png: the projector on the first epoch's image and text embeddings, in PCA, coloured by
  modality, with the images' thumbnails.

    python benchmarks/tensorboard_screenshots.py --run-dir runs/demo --out docs/screenshots

Each screenshot is taken once the page says it is drawn (the charts of the filtered cards rendered; the projector's
PCA computed and its point count shown), not after a fixed wait.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from page_render_times import CHROMIUM_ARGS as DASHBOARD_CHROMIUM_ARGS
from page_render_times import local_server
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from blipcore.paths import PROJECT_ROOT

# The projector draws with WebGL: headless Chromium has it only through SwiftShader, the software renderer
CHROMIUM_ARGS = [*(arg for arg in DASHBOARD_CHROMIUM_ARGS if arg != "--disable-gpu"),
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
# Per scalar card of the Time Series tab, how many series its line chart has drawn (SVG paths with data: the charts
# are drawn in SVG, `?forceSVG=true`, so that the page can tell when they are done)
SERIES_DRAWN = """() => [...document.querySelectorAll('scalar-card')].map(card =>
  [...card.querySelectorAll('line-chart svg path')].filter(p => (p.getAttribute('d') || '').length > 50).length)"""


def tensorboard_server(logdir: Path) -> contextlib.AbstractContextManager[str]:
    """`tensorboard --logdir logdir` on a free port; yields its URL once it answers."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", "{port}"]
    return local_server(f"tensorboard --logdir {logdir}", command, "/data/environment", timeout_s=120)


def scalars(page: Page, url: str, tags: str, path: Path, timeout_s: float) -> None:
    """The Time Series tab filtered to `tags`, once every card shows a series and nothing has been drawn for 1 s."""
    page.goto(f"{url}/?forceSVG=true#timeseries")
    page.locator("metrics-tag-filter input").fill(tags)
    page.keyboard.press("Escape")  # close the filter's suggestions
    deadline = time.monotonic() + timeout_s
    drawn, since = None, time.monotonic()
    while True:
        now = page.evaluate(SERIES_DRAWN)
        if now != drawn:
            drawn, since = now, time.monotonic()
        elif drawn and all(drawn) and time.monotonic() - since >= 1.0:
            break
        if time.monotonic() > deadline:
            raise PlaywrightTimeoutError(f"the Time Series cards drew {drawn} series (one count a card)")
        page.wait_for_timeout(200)
    page.screenshot(path=str(path))


def projector(page: Page, url: str, colour_by: str, path: Path, timeout_s: float) -> None:
    page.goto(f"{url}/#projector")
    page.reload()  # a fresh load: the projector plugin starts with its first tensor, in PCA
    # the plugin is a page of its own inside TensorBoard's plugin frame
    plugin = page.frame_locator('iframe[src*="name=projector"]').frame_locator('iframe[src*="projector_binary"]')
    plugin.get_by_text("Total variance described").wait_for(timeout=timeout_s * 1000)  # PCA computed and drawn
    menu = plugin.locator('paper-dropdown-menu[label="Color by"]')
    menu.click()
    menu.locator("paper-item").filter(has_text=colour_by).first.click()
    page.wait_for_timeout(1000)  # the points recoloured
    page.mouse.move(0, 0)  # no hover label on the picture
    page.screenshot(path=str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="the run to export and show")
    parser.add_argument("--out", type=Path, required=True, help="folder for the two PNG files")
    parser.add_argument("--tags", default="loss", help="the Time Series tag filter, a regex (default: loss)")
    parser.add_argument("--colour-by", default="modality",
                        help="the projector's 'Color by' metadata column (default: modality: image or text)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a tab may take to draw (default 300)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser Playwright drives")
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        raise SystemExit(f"{args.chromium} not found: install Debian's chromium (apt-get install -y chromium)")

    with tempfile.TemporaryDirectory() as logdir:
        export = subprocess.run(
            [sys.executable, "-m", "train", "export", "--run-dir", str(args.run_dir), "--tensorboard", logdir,
             "--no-progress"], cwd=PROJECT_ROOT, capture_output=True, text=True,
        )
        if export.returncode != 0:
            raise SystemExit(f"train export failed: {(export.stderr.strip().splitlines() or ['no message'])[-1]}")
        args.out.mkdir(parents=True, exist_ok=True)
        with tensorboard_server(Path(logdir)) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            try:
                scalars(page, url, args.tags, args.out / "tensorboard-scalars.png", args.timeout)
                projector(page, url, args.colour_by, args.out / "tensorboard-projector.png", args.timeout)
            except PlaywrightTimeoutError as err:
                why = err.message.splitlines()[0]
                raise SystemExit(f"TensorBoard did not draw within {args.timeout:.0f} s: {why}") from None
            finally:
                browser.close()
    print(f"wrote {args.out / 'tensorboard-scalars.png'} and {args.out / 'tensorboard-projector.png'}")


if __name__ == "__main__":
    main()
