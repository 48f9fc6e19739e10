"""The README's "Use it from Python" example runs as written: the first ```python block of that section is
executed in a folder holding what its comments say it needs (a finished run in runs/digits, PNGs in photos/).
Skipped while README.md has no such section. SPINAL_README=path checks another markdown file (a draft)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

HEADING = "Use it from Python"
README = Path(__file__).resolve().parents[2] / "README.md"


def section_code(text: str, heading: str = HEADING) -> str | None:
    """The first ```python block between `heading` (any level) and the next heading of the same or a higher
    level (lines inside code fences are not headings: `# comment`); None when there is none."""
    level, block, fence = None, None, None
    for line in text.splitlines():
        if fence is not None:
            if line.startswith("```"):
                if fence == "python" and level is not None:
                    return "".join(block)
                fence = None
            elif block is not None:
                block.append(line + "\n")
            continue
        if line.startswith("```"):
            fence = line[3:].strip()
            block = [] if fence == "python" and level is not None else None
            continue
        m = re.match(r"(#+)\s+(.*?)\s*$", line)
        if m and level is not None and len(m.group(1)) <= level:
            return None
        if m and m.group(2) == heading:
            level = len(m.group(1))
    return None


def test_section_code_finds_the_first_python_block_of_the_section():
    text = "# A\n## Use it from Python\ntext\n```bash\nls\n```\n```python\nx = 1\n```\n```python\ny\n```\n## B\n"
    assert section_code(text) == "x = 1\n"
    assert section_code("## Use it from Python\n```bash\nls\n```\n## Next\n```python\nz\n```\n") is None
    assert section_code("## Other\n```python\nz\n```\n") is None
    assert section_code("## Use it from Python\n```bash\n# not a heading\n```\n```python\n# c\nx\n```\n") == "# c\nx\n"


def test_readme_predictor_example_runs(finished_run, three_digits, tmp_path, monkeypatch, capsys):
    readme = Path(os.environ.get("SPINAL_README", README))
    code = section_code(readme.read_text()) if readme.is_file() else None
    if code is None:
        pytest.skip(f"{readme} has no '{HEADING}' section with a ```python block yet")
    shutil.copytree(finished_run, tmp_path / "runs" / "digits")
    (tmp_path / "photos").mkdir()
    for f in sorted((three_digits / "test").rglob("*.png"))[::20]:
        shutil.copy(f, tmp_path / "photos" / f"{f.parent.name}_{f.name}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{readme}:{HEADING}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "digit_0" in out and "torch" in out
