"""The README's Python snippet runs as written, and its two commands exist in the Makefile."""

import re

from tests.conftest import REPO_ROOT


def test_readme_python_snippet_runs(capsys):
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "parameters" in printed and "'itc'" in printed and "'lm'" in printed and "nan" not in printed


def test_readme_commands_are_make_targets():
    readme = (REPO_ROOT / "README.md").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)
