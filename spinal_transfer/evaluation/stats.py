"""The paired significance test of two heads on the same test images, shared by `reproduce` and `compare`.

Why McNemar, per seed, and never pooled: two heads tested on the same images differ only where exactly one of
them is right (the discordant images); McNemar's exact test asks whether those split evenly. One test per
seed, because pooling the counts of several seeds would count the same test image once per seed as if it were
an independent observation, which overstates the evidence. A verdict says "better" or "worse" only when every
seed is significant in the same direction.

This module imports neither torch nor the run-folder code: the command line can show these numbers cheaply.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from ..runs.rundir import RunDir
from .interpret import read_predictions as prediction_rows

ALPHA = 0.05                        # significance level of the paired test

Scored = tuple[str, int, int]       # (image path, target, prediction)


class PairingError(ValueError):
    """Two runs' test predictions are not over the same images, so no paired test is possible."""


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b successes in b + c trials at 1/2 (binomial test).

    Only the discordant images (one head right, the other wrong) say which head is better; with none,
    nothing is evidence either way (p = 1)."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5).pvalue)


def read_predictions(run: RunDir) -> list[Scored]:
    """(image path relative to the run's data folder, target, prediction) per test image, in sample order;
    relative, so runs made from different data roots still pair."""
    data = run.read_config().data
    return [(os.path.relpath(r.path, data), r.target, r.prediction) for r in prediction_rows(run.predictions)]


def discordant(default: Sequence[Scored], other: Sequence[Scored]) -> tuple[int, int]:
    """(b, c): b = reference (`default`) right and other wrong, c = reference wrong and other right, over the
    same images in the same order (PairingError otherwise)."""
    if len(default) != len(other):
        raise PairingError(f"different test sets ({len(default)} vs {len(other)} images)")
    b = c = 0
    for (p1, t1, y1), (p2, t2, y2) in zip(default, other):
        if not p1 or p1 != p2 or t1 != t2:
            raise PairingError(f"test images differ ({p1 or 'unknown path'} vs {p2 or 'unknown path'})")
        b += y1 == t1 and y2 != t2
        c += y1 != t1 and y2 == t2
    return b, c


@dataclass(frozen=True)
class PairedTest:
    """McNemar's test of one seed: a head against the reference head (reproduce: the default head)."""

    seed: int
    b: int          # reference right, this head wrong
    c: int          # reference wrong, this head right
    p: float

    def verdict(self, head: str) -> str:
        if self.p >= ALPHA:
            return "no significant difference"
        return f"{head} {'better' if self.c > self.b else 'worse'} (p<{ALPHA:g})"


def paired_test(reference: RunDir, other: RunDir, seed: int) -> PairedTest:
    """The test of `other` against `reference` from their test_predictions.csv (PairingError if the images
    differ)."""
    b, c = discordant(read_predictions(reference), read_predictions(other))
    return PairedTest(seed, b, c, mcnemar_p(b, c))


def overall_verdict(tests: Sequence[PairedTest], head: str) -> str:
    """One verdict per seed; better/worse overall only when every seed says so. Counts are not pooled over
    seeds: the same test image would count once per seed as if independent, which overstates significance."""
    if not tests:
        return ""
    verdicts = [t.verdict(head) for t in tests]
    if len(set(verdicts)) == 1:
        return verdicts[0] + (f" in each of the {len(tests)} seeds" if len(tests) > 1 else "")
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    return "mixed: " + ", ".join(f"{v} in {n}" for v, n in counts.items()) + f" of {len(tests)} seeds"
