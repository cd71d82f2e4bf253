"""Every Python block of the README runs verbatim (each block defines what it uses)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    text = README.read_text()
    out = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", section, flags=re.S)):
            out.append(pytest.param(code, id=f"{title.split(':')[0][:24]}-{i}"))
    return out


def test_every_python_block_is_collected():
    """The blocks are found (a change of fence style would otherwise silently test nothing)."""
    assert len(_blocks()) == README.read_text().count("```python")


@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
