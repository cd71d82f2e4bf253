"""The README's code blocks run verbatim (the sections that teach the SDE, model, adapter and sampler contracts)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("Ten lines", "SDEs: the pair", "Models:", "Using networks trained elsewhere", "Sampling",
            "One vocabulary")


def _blocks():
    text = README.read_text()
    out = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        if title.startswith(SECTIONS):
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", section, flags=re.S)):
                out.append(pytest.param(code, id=f"{title.split(':')[0][:24]}-{i}"))
    return out


@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
