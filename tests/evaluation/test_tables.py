"""Result tables: the Markdown, HTML and CSV of one table hold the same cells, read back by independent parsers."""
from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

from spinal_transfer.evaluation.tables import Table, join, to_csv, to_html, to_markdown, write_files

TABLE = Table(title="heads <compared>", columns=[("head", "h"), ("top-1", "t"), ("note", "n")],
              rows=[{"h": "linear", "t": "0.912", "n": "a|b"}, {"h": "spinal", "t": "0.925"}],
              intro=["3 seeds & 1 split"], notes=["muted: diverged"], muted=[1])


class _Cells(HTMLParser):
    """Rows of <td>/<th> text, which <tr> carries class="muted", and whether anything external is referenced."""

    def __init__(self):
        super().__init__()
        self.rows, self.muted, self.external, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
            self.muted.append(a.get("class") == "muted")
        elif tag in ("td", "th"):
            self._cell = ""
        self.external += [v for k, v in attrs if k in ("src", "href") and not str(v).startswith("data:")]
        self.external += ["<script>"] if tag == "script" else []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None


def test_markdown_and_html_hold_the_same_cells():
    expected = [["head", "top-1", "note"], ["linear", "0.912", "a|b"], ["spinal", "0.925", ""]]
    md = to_markdown(TABLE).splitlines()
    assert md[0] == "# heads <compared>" and "3 seeds & 1 split" in md and "* muted: diverged" in md
    table = [line for line in md if line.startswith("|") and not line.startswith("|---")]
    cells = [[c.strip().replace("\\|", "|") for c in __import__("re").split(r"(?<!\\)\|", line)[1:-1]]
             for line in table]
    assert cells == expected
    parser = _Cells()
    parser.feed(to_html(TABLE))
    assert parser.rows == expected and parser.muted == [False, False, True] and parser.external == []


def test_csv_round_trips_and_files_are_written(tmp_path):
    text = to_csv(["head", "top1_per_seed"], [["linear", join([0.9, 0.91])], ["spin,al", join([])]])
    assert list(csv.reader(io.StringIO(text))) == [["head", "top1_per_seed"], ["linear", "0.9;0.91"],
                                                   ["spin,al", ""]]
    paths = write_files(tmp_path / "out", {"results.csv": text, "results.md": to_markdown(TABLE)})
    assert [p.read_bytes() for p in paths] == [text.encode(), to_markdown(TABLE).encode()]
