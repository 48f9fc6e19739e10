"""The skip log: every unreadable image met while loading, listed once with its reason."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..utils.atomic import atomic_write_text
from ..utils.distributed import gather_objects, is_main
from ..utils.textfiles import read_text
from .images import first_readable

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def skip_lines(pairs: Iterable[tuple[str, str]]) -> str:
    """The `path<TAB>reason` lines of a skip list, one per entry: a backslash, tab, newline or carriage return in a
    path is written escaped (\\\\, \\t, \\n, \\r), so a file named with one stays one line and reads back."""
    return "".join(f"{''.join(_ESCAPES.get(c, c) for c in str(p))}\t{' '.join(str(r).split())}\n" for p, r in pairs)


def _unescape(path: str) -> str:
    """A path of `skip_lines` as it was (a backslash before another character, as a list from before the escapes
    may hold, is kept)."""
    back = {v[1]: k for k, v in _ESCAPES.items()}
    out, chars = [], iter(path)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            c = back.get(nxt, c + nxt)
        out.append(c)
    return "".join(out)


class SkipLog:
    """Every unreadable file met in any split, at any time, on any rank: listed once with its reason in
    skipped_files.txt (`skip_lines`) and counted in report.json.

    Loaders yield `(images, labels, indices, bad)`; `watch` takes `bad` out of each batch and yields the
    rest, so no loop handles bad files itself. `sync` gathers every rank's finds and rank 0 writes the file.
    """

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self.entries: dict[str, str] = {}
        if path is not None and path.is_file():
            for line in read_text(path).splitlines():     # a name that is not UTF-8: its own bytes
                p, _, reason = line.rpartition("\t")
                if p:
                    self.entries[_unescape(p)] = reason
        self._written = dict(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def add(self, pairs: Iterable[tuple[str, str]]) -> None:
        for p, reason in pairs:
            self.entries.setdefault(str(p), " ".join(str(reason).split()))

    def moved_to(self, root: str, files: Iterable[str]) -> None:
        """Entries outside `root`, the data folder the run reads now, listed at their place under it: an entry
        whose path ends with the path of one of `files` (the run's files under `root`) relative to `root`
        becomes that file, the longest such ending first. A run resumed from its data folder's new place (or a
        later one: the log holds the paths of the last place read) lists each skipped file once, where it is."""
        if all(Path(p).is_relative_to(root) for p in self.entries):
            return
        here = {Path(f).relative_to(root).parts: str(f) for f in files}
        out: dict[str, str] = {}
        for p, reason in self.entries.items():
            parts = Path(p).parts
            new = next((here[parts[i:]] for i in range(1, len(parts)) if parts[i:] in here), p)
            out.setdefault(new, reason)
        self.entries = out

    def per_split(self, samples: dict[str, list]) -> dict[str, int]:
        """Skipped files per split ({name: [(path, label), ...]}), and under "scan" those skipped while the
        folder was scanned (in no split: e.g. a wrong extension, a bad header, a link out of its class)."""
        where = {str(p): name for name, items in samples.items() for p, _ in items}
        counts = {name: 0 for name in samples} | {"scan": 0}
        for p in self.entries:
            counts[where.get(p, "scan")] += 1
        return counts

    def emptied(self, samples: dict[str, list], classes: list[str]) -> dict[str, list[str]]:
        """Per split, the classes whose every image is unreadable (truncated files pass the scan's header check
        and fail only when decoded): a class train never saw, or one the test metrics do not cover. A class with
        a skipped image has its other images decoded here until one reads: training's dropped last batch may
        have left some never decoded. Those that fail are added to the log."""
        out = {}
        for name, items in samples.items():
            lost = []
            for y in sorted({y for p, y in items if str(p) in self.entries}):
                found, failed = first_readable([str(p) for p, c in items if c == y and str(p) not in self.entries])
                self.add(failed)
                if found is None:
                    lost.append(classes[y])
            if lost:
                out[name] = lost
        return out

    def watch(self, batches: Iterable) -> Iterator[tuple]:
        """The batches of a loader without their unreadable files, which are recorded here."""
        for images, labels, index, bad in batches:
            if bad:
                self.add(bad)
            yield images, labels, index

    def watched(self, batches: Iterable) -> Iterable[tuple]:
        """`watch` as an iterable that can be passed over again (each pass a new `watch` of `batches`)."""
        return _Rewatch(self, batches)

    def sync(self, write: bool = True) -> None:
        """Merge every rank's entries (a collective under torchrun), then rank 0 writes the file if it changed or
        is not there yet (it is always written, empty when nothing was skipped, so the log may point to it)."""
        for part in gather_objects(self.entries):
            for p, r in part.items():
                self.entries.setdefault(p, r)
        if write and self.path is not None and is_main() and (self.entries != self._written or
                                                               not self.path.is_file()):
            atomic_write_text(self.path, skip_lines(self.entries.items()))
            self._written = dict(self.entries)


@dataclass
class _Rewatch:
    skips: SkipLog
    batches: Iterable

    def __iter__(self) -> Iterator[tuple]:
        return self.skips.watch(self.batches)
