"""Every number the README quotes from benchmarks/RESULTS.md is there: the benchmark table's results column, the
prediction-speed table, the defaults table's results and the figures quoted beside `bench_*.py` names. A quoted
number may be rounded (5.3x for 5.31x) but not made up or left stale when RESULTS.md is regenerated."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?=x\b|\b)")


def _numbers(text: str) -> set[float]:
    return {float(m.group(1)) for m in NUMBER.finditer(text.replace(",", ""))}


def _decimals(token: str) -> int:
    return len(token.split(".")[1]) if "." in token else 0


def _quoted(readme: str) -> list[tuple[str, str]]:
    """(README line, number token) for each figure quoted from RESULTS.md."""
    out = []
    in_defaults = False                      # the table of bench_defaults' results ("Your own folder")
    for line in readme.splitlines():
        if line.startswith("| setting |") and "fewshot12" in line:
            in_defaults = True
            continue
        in_defaults = in_defaults and line.startswith("|")
        if in_defaults:
            text = " ".join(c for c in line.strip("|").split(" | ")[1:])      # the results, not the setting's name
            out += [(line, m.group(1)) for m in NUMBER.finditer(text.replace(",", ""))]
            continue
        if line.startswith("| `bench_"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            text = cells[2]
        elif re.match(r"\| (ResNet-50|ResNet-18|ViT-S/16|EfficientNet-Lite0) \+ spinal head", line):
            text = line
        else:
            continue
        text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)|EfficientNet-Lite0|ResNet-\d+|ViT-[SB]/16|WRN-101-2|VGG-19-bn|H200|w\d+|\d+ px|"
                      r"4096-4096|ResNet-18|4 heads x 3 seeds|1,600 JPEGs|8 architectures", "", text)
        out += [(line, m.group(1)) for m in NUMBER.finditer(text.replace(",", ""))]
    return out


def test_every_number_the_readme_quotes_from_results_md_is_there():
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    have = _numbers(results)
    quoted = _quoted(readme)
    assert len(quoted) >= 20, "the README's benchmark tables were not found"
    missing = [(tok, line[:60]) for line, tok in quoted
               if not any(round(v, _decimals(tok)) == float(tok) for v in have)]
    assert not missing, f"README numbers not in benchmarks/RESULTS.md: {missing}"


def test_results_md_names_its_machines():
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    sections = re.findall(r"<!-- begin (\w+) -->(.*?)<!-- end \1 -->", results, re.S)
    assert sections
    for name, body in sections:
        assert re.search(r"^cpu: .+, \d+ cores", body, re.M), f"section {name} does not say which machine it ran on"


def _target_rows(text: str) -> list[list[str]]:
    """The Targets table's rows, split on the pipes Markdown splits on (not the escaped ones)."""
    table = text.split("## Targets", 1)[1].split("\n\n", 2)[1]
    return [re.split(r"(?<!\\)\|", row)[1:-1] for row in table.splitlines()[2:]]


def test_the_targets_table_keeps_each_verdict_in_its_line_column(tmp_path, monkeypatch):
    """A benchmark's verdict line that is itself a table row ("| train | ours | 1.26x | target: MISS |") must stay
    one cell: Markdown drops every cell past the header's two, and with them the verdict."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "RESULTS.md")
    run_all.write({"train": "<!-- begin train -->\n| ours_fp32 | 54 img/s | 1.26x | target >= 1.3x: MISS |\n"
                            "bf16 costs no accuracy: PASS\n<!-- end train -->\n"})
    rows = _target_rows(run_all.RESULTS.read_text())
    assert [len(r) for r in rows] == [2, 2]
    assert rows[0][1].strip().endswith("MISS") and rows[1][1].strip().endswith("PASS")
    for row in _target_rows((ROOT / "benchmarks" / "RESULTS.md").read_text()):       # the checked-in file too
        assert len(row) == 2 and re.search(r"\b(PASS|MISS)\b", row[1]), row
