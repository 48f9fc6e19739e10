"""`spinal-transfer report`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError, RunFolderError
from ..utils.textfiles import open_text
from . import output_file, positive_int

if TYPE_CHECKING:
    from ..runs.rundir import RunDir

EXAMPLES = """\
  spinal-transfer report runs/pets                          # rewrite runs/pets/report.html (test split)
  spinal-transfer report runs/pets --split val --out runs/pets/report_val.html
  spinal-transfer report runs/pets --screenshot docs/report.png --max-height 2600    # the README's picture
Reads a finished run folder (report.json, metrics, predictions, plots) and writes its self-contained
page again; training writes the same page at the end of a run. A resumed run gets one line per resume
(where, and each setting it changed: config.yaml holds only those in force at the end). --screenshot
renders the page in headless Chromium (chromium or google-chrome on PATH)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="finished run folder (with report.json)")
    parser.add_argument("--split", default="test", choices=["val", "test"], help="split the page shows (default: test)")
    parser.add_argument("--out", metavar="HTML", help="file to write (default: RUN/report.html)")
    parser.add_argument("--top", type=positive_int, default=16, metavar="N",
                        help="images in the top-losses grid (default: 16)")
    parser.add_argument("--screenshot", metavar="PNG", help="also render the page in headless Chromium to this PNG")
    parser.add_argument("--width", type=positive_int, default=1280, metavar="PX",
                        help="screenshot viewport width in CSS px (default: 1280)")
    parser.add_argument("--max-height", type=positive_int, default=None, metavar="PX",
                        help="cut the screenshot at this height in CSS px (default: the whole page)")


def _images_gone(run: RunDir) -> int:
    """How many images of the run's test predictions are not at their recorded paths any more."""
    import csv

    if not run.predictions.is_file():
        return 0
    with open_text(run.predictions) as f:     # a name that is not UTF-8 reads back as its file's path
        return sum(not Path(row["path"]).is_file() for row in csv.DictReader(f))


def main(args: argparse.Namespace) -> int:
    from ..evaluation.browser import screenshot  # lazy: no torch at --help
    from ..evaluation.report_page import resume_texts, write_report_html  # lazy: no torch at --help
    from ..runs.rundir import RunDir  # lazy: no torch at --help

    replaced = args.out is not None and output_file(args.out, (".html", ".htm"))
    if args.screenshot:
        output_file(args.screenshot, (".png",), "--screenshot")
    run = RunDir(args.run)
    unfinished = run.unfinished()
    if unfinished:
        raise RunFolderError(f"{unfinished} (a run's report comes when it finishes)")
    gone = _images_gone(run)
    if gone and args.out is None:       # the run's own page has its pictures: one without them does not replace it
        raise DataError(f"{gone} of the test images the run predicted are no longer where it read them (was the data "
                        f"folder moved?): a page written now would show placeholders instead of them; move the data "
                        f"back, or write the page elsewhere with --out")
    page = write_report_html(args.run, args.out, args.split, args.top)
    if gone:
        print(f"note: {gone} of the test images are no longer where the run read them; the page shows placeholders "
              f"for them", file=sys.stderr)
    print(page)
    for text in resume_texts(run.read_report().get("resumes") or [], arrow="->"):   # its settings changed then
        print(f"resumed {text}", file=sys.stderr)
    if replaced:
        print(f"(replaced the page that was at {page})", file=sys.stderr)
    if args.screenshot:
        print(screenshot(page, args.screenshot, width=args.width, max_height=args.max_height))
    return 0
