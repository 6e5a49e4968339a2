"""The README's Python snippets run as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "fastnet bench" in block[0]
    assert "pytest" in block[1] and "FASTNET_PURE=1" in block[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert block[1] in ci
