"""The README's Python snippet runs as written, its two commands exist in the Makefile, it stays a short page,
and every relative link of the README and docs/ resolves to a file of the repository (and to a heading there)."""

import re
from pathlib import Path

import pytest

from blipcore.evaluation import metrics
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
PAGES = [README, REPO_ROOT / "benchmarks" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def test_readme_python_snippet_runs(capsys):
    readme = README.read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(snippets) == 1, "the README keeps exactly one ```python block: the one this test runs"
    exec(compile(snippets[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "parameters" in printed and "'itc'" in printed and "'lm'" in printed and "nan" not in printed


def test_readme_commands_are_make_targets():
    readme = README.read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)


def test_readme_is_a_short_page():
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines: reference material belongs in docs/, one page per concern"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces as hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for title in HEADING.findall(FENCE.sub("", page.read_text())):
        text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or not file.is_relative_to(REPO_ROOT):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(REPO_ROOT)}")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: " + "; ".join(broken)


def test_anchor_rules_match_githubs():
    page = REPO_ROOT / "docs" / "data.md"
    assert "streaming-shards-past-one-machines-disk" in anchors(page) and "coco-2017-by-url" in anchors(page)


def test_docs_collapse_table_is_the_registrys():
    """docs/metrics.md lists every collapse measure as the registry declares it (the README's table is checked
    by tests/test_metrics.py)."""
    page = (REPO_ROOT / "docs" / "metrics.md").read_text()
    for m in metrics.metrics_in("collapse"):
        if m.better is not None or m.fmt != "s":  # every collapse number, not the caption itself
            assert f"| `{m.key}` | {m.doc} |" in page, m.key


PROCESS_WORDS = re.compile(r"\bsessions?\b|\bissues?([- ]?[0-9]+|'s)|\blent\b|travell", re.I)


@pytest.mark.parametrize("page", [*PAGES, *sorted((REPO_ROOT / "studies").glob("*.toml"))],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_text_speaks_of_the_project_not_of_how_it_was_made(page):
    """A measurement names its command, machine and date; nothing else about how the work was done (no work
    sessions, issue numbers, borrowed machines). Streamlit's session state is another matter."""
    text = re.sub(r"session[ _-]state", "", page.read_text(), flags=re.I)
    hits = [line.strip() for line in text.splitlines() if PROCESS_WORDS.search(line)]
    assert not hits, hits
