"""`spinal-transfer compare`: every head x seed on one split of the user's folder, per-head means, and each
head tested image by image against the first (the reference).

Why this shape: "does a spinal head help here?" is usually answered from single runs whose best epoch was
picked on the test split. Here every head trains with the same options, on seeds 0..N-1, on the same
train/val/test split (one `split_seed`); each run picks its epoch on val and evaluates test once; and each
head is compared with the reference on the same test images, one exact McNemar test per seed, never pooled
(`stats`). Runs record their own splits.json, so the split is checked, not assumed: the tables say whether
every run recorded the same files.

Modes (`multirun`). `finetune` (default): every run trains as `train` does, so the verdict is about the model the
user would train. `frozen`, a fast screen that is not what train does: the backbone is frozen and its features
are cached (`features`) in ONE folder, OUT/feature-cache, shared by every head and seed, so the backbone runs
once per split for the whole comparison and each run trains only its head (seconds). The tables, the CSV and
the log name the mode (MODE_NAMES).

Layout: OUT/runs/<head>/seed<k>/ (ordinary run folders), OUT/feature-cache/ (frozen mode),
OUT/compare.{csv,md,html}.
Like `reproduce`, rerunning the command skips finished runs, resumes interrupted ones from last.pt, and
leaves a run that another process is training to it, so several processes can share one OUT; the tables
are rebuilt from the run folders after every run.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..config import TrainConfig, resolve_config, resolved
from ..data.splits import changed_splits, config_splits, fingerprints, recorded_fingerprints
from ..errors import ConfigError, NonFiniteLoss, RunFolderError, rerun_resumes
from ..evaluation.stats import ALPHA, PairedTest, PairingError, overall_verdict, paired_test
from ..evaluation.tables import Table, join, to_csv, to_html, to_markdown, write_files
from ..models.heads import create_head, head_options
from ..models.heads_spec import HeadSpec
from ..models.surgery import build_model
from ..runs.rundir import RunDir
from ..training import train
from ..utils.filelock import exclusive
from ..utils.preemption import StopControl, parse_signals
from .multirun import (
    DEFAULT_MODE,
    IGNORED,
    MODE_NAMES,
    RUNS,
    MultiRunError,
    check_out,
    mode_fields,
    refuse_others_in,
    refuse_torchrun,
    run_dir,
    tracked_as,
)

DEFAULT_SEEDS = 3
DEFAULT_OUT = "runs/compare"
RESULT_FILES = ("compare.csv", "compare.md", "compare.html")
# TrainConfig fields that compare sets itself (per head, per seed, per mode), so they are not its flags
CONTROLLED = ("head", "seed", "out", "freeze_backbone", "cache_features", "select_on")
METRICS = (("top1", "test top-1"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"))

PathLike = Union[str, Path]


class CompareError(MultiRunError):
    """A compare request that cannot run as given; the message says how to fix it."""


# --- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    """One run of the comparison: a head, a seed and the full config it trains with."""

    head: HeadSpec
    seed: int
    cfg: TrainConfig

    @property
    def run(self) -> RunDir:
        return RunDir(self.cfg.out)


def check_heads(first: Sequence[Planned], num_classes: int) -> None:
    """Before any table, lock or run folder is written (the caller has scanned the folder, as every run reads it:
    one train refuses, e.g. of one class, is refused here): every head can be built on this backbone's features.
    A spec such as spinal:splits=99 on 96 features failed only when its first run started, after the runs before
    it had trained. One backbone built without weights gives the width every head receives."""
    cfg = first[0].cfg
    width = build_model(cfg.backbone, num_classes, head="linear", weights="none", replace=cfg.replace,
                        img_size=cfg.img_size).spinal_info.feature_width
    seen: dict[str, str] = {}
    for p in first:
        try:
            head = create_head(p.cfg.head, width, num_classes, **head_options(p.cfg))
        except ConfigError as e:
            raise CompareError(f"head {p.head.text!r} cannot be built on {cfg.backbone}'s {width} features: {e}; "
                               f"change it (`spinal-transfer describe {cfg.backbone} --num-classes {num_classes}` "
                               f"shows what it takes)") from None
        # `spinal` and `spinal:width=W` are one head when W is the width the rule gives on these features
        resolved = {**p.cfg.to_dict(), "layer_width": getattr(head, "layer_width", p.cfg.layer_width)}
        key = _run_identity(resolved)
        if key in seen:
            raise CompareError(f"heads {seen[key]!r} and {p.head.text!r} are the same head on {cfg.backbone}'s "
                               f"{width} features (layer width {resolved['layer_width']} either way); give each "
                               f"head once")
        seen[key] = p.head.text


def plan(base: TrainConfig, heads: Sequence[HeadSpec], seeds: int, mode: str, out: PathLike) -> list[Planned]:
    """Every (seed, head) run, seed by seed with the reference first, so paired results appear early.

    All share `base` (options, split_seed), differ only in head, seed and folder; the data folder and OUT are
    made absolute (runs record them and may be resumed from anywhere)."""
    if seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {seeds}")
    if len(heads) < 2:
        raise CompareError("compare needs at least two heads (the first is the reference), e.g. "
                           "--heads linear spinal")
    if not base.data:
        raise CompareError("--data DIR is required (or a --recipe that sets data)")
    if base.select_on != "val":
        raise CompareError("compare picks every run's epoch on val and tests once; a recipe with "
                           "select_on: test cannot be compared fairly (remove it)")
    out = Path(out).expanduser().resolve()
    common = {"data": str(Path(base.data).expanduser().resolve()),
              **mode_fields(mode, out, base.cache_dir, base.cache_features, base.freeze_backbone)}
    runs = [Planned(h, seed, resolve_config(base, {**common, **h.config_fields(), "seed": seed,
                                                   "out": str(run_dir(out, h.slug, seed).path)}))
            for seed in range(seeds) for h in heads]
    _refuse_same_heads(runs[:len(heads)])
    return runs


def _run_identity(config: dict) -> str:
    """What makes two planned runs the same run: their whole config but the run folder."""
    return json.dumps({k: v for k, v in config.items() if k != "out"}, sort_keys=True, default=str)


def _refuse_same_heads(first_seed: Sequence[Planned]) -> None:
    """Two specs that make the same run (e.g. `spinal` and `spinal:resnet` with the default preset)."""
    seen: dict[str, str] = {}
    for p in first_seed:
        key = _run_identity(p.cfg.to_dict())
        if key in seen:
            raise CompareError(f"heads {seen[key]!r} and {p.head.text!r} are the same head with these options; "
                               f"give each head once")
        seen[key] = p.head.text


def check_settings(p: Planned) -> None:
    """Refuse to skip or resume a run folder made with other settings: the table would mix experiments."""
    if not p.run.config.is_file():
        return
    have, want = p.run.read_config().to_dict(), p.cfg.to_dict()
    diff = [f"{k}: {have[k]!r} there, {want[k]!r} asked for" for k in want
            if k not in IGNORED and have[k] != want[k] and p.cfg.applies(k) and not resolved(k, want[k])]
    if diff:
        raise CompareError(f"{p.run.path} was run with other settings ({'; '.join(diff)}); use another --out, "
                           f"or delete that run folder to redo it")


def check_split(p: Planned, now: dict[str, str]) -> None:
    """Refuse to skip or resume a run folder whose recorded split is not the one the data folder gives now
    (images added, removed or renamed since): the table would average test sets of other images."""
    recorded = recorded_fingerprints(p.run.read_json(p.run.splits)) if p.run.splits.is_file() else None
    changed = changed_splits(now, recorded)
    if changed:
        raise CompareError(f"{p.run.path} was run on another {'/'.join(changed)} split of {p.cfg.data} (images were "
                           f"added, removed or renamed since); use another --out, or delete that run folder to redo "
                           f"it")


# --- the driver ----------------------------------------------------------------------------------

def _stderr(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def run_one(p: Planned, where: str, log: Callable[[str], Any]) -> bool:
    """Train, resume or skip one run: finished runs are skipped, an interrupted one resumes from its last.pt, a
    diverged one is reported and left out of the tables. Returns False when another process is training it
    (left to that process), True otherwise."""
    state = p.run.state()
    if state == "finished":
        log(f"{where}: finished, skipped")
        return True
    if p.run.is_locked():
        log(f"{where}: being trained by another process, left to it")
        return False
    log(f"{where}: {'resuming' if state == 'interrupted' else 'starting'} -> {p.cfg.out}")
    try:       # a run that stopped before its first checkpoint starts over (train.check_new_run)
        train.run(p.cfg, resume=p.cfg.out if state == "interrupted" else None, track_as=tracked_as(p.cfg.out))
    except NonFiniteLoss as e:
        log(f"{where}: {e}")
        return True
    except RunFolderError as e:
        if p.run.is_locked():            # another process took it between the check above and train's lock
            log(f"{where}: taken by another process meanwhile, left to it")
            return False
        log(f"{where}: {e}")
        return True
    log(f"{where}: trained")
    return True


def wait_for_others(runs: Sequence[Planned], log: Callable[[str], Any], poll_s: float = 1.0,
                    control: Optional[StopControl] = None) -> None:
    """Block until no process holds any of `runs` (their locks die with their holders, so this ends), or until
    a signal (`control`, the command's) stops the command."""
    log(f"waiting for {len(runs)} run(s) that other processes are training")
    while any(p.run.is_locked() for p in runs):
        if control is not None:
            control.raise_if_stopped("while waiting for other processes' runs")
        time.sleep(poll_s)


def compare(base: TrainConfig, heads: Sequence[HeadSpec], seeds: int = DEFAULT_SEEDS, mode: str = DEFAULT_MODE,
            out: PathLike = DEFAULT_OUT, log: Callable[[str], Any] = _stderr) -> "Results":
    """Run every head x seed not finished yet, then write OUT/compare.{csv,md,html}; return the results.

    Every run's settings are checked against its folder before anything trains; the tables are rewritten
    after each run and on the way out of an interruption. Runs that other processes are training are waited
    for at the end (and taken over if their process died), so every process ends with the whole table."""
    refuse_torchrun("compare")
    check_out(out, base.data, "compare")        # before the table, the lock or a run is written there
    refuse_others_in(out, RESULT_FILES, CSV_COLUMNS)
    out = Path(out).expanduser().resolve()
    runs = plan(base, heads, seeds, mode, out)
    for p in runs:
        check_settings(p)
    splits = config_splits(runs[0].cfg)          # the split every run gets (heads and seeds share it)
    now = fingerprints(splits)
    for p in runs:
        check_split(p, now)
    check_heads(runs[:len(heads)], len(splits.classes))   # a folder train refuses, too
    log(f"mode: {MODE_NAMES[mode]}")
    others = sorted(set(str(d.parent) for d in (out / RUNS).glob("*/seed*/report.json")) -
                    {str(p.cfg.out) for p in runs})
    if others:                       # an earlier, larger comparison: its runs stay, its table is rewritten
        log(f"note: {len(others)} finished run(s) in {out / RUNS} are not in this comparison (other heads or "
            f"seeds, e.g. {Path(others[0]).relative_to(out)}): the tables show only the heads and seeds asked for")
    # the command's own handlers: a signal between runs used to kill it (143), and one a run received while
    # writing its report was forgotten when that run returned (the command trained every remaining run)
    with StopControl(parse_signals(base.stop_signals)) as stop, rerun_resumes("compare"):
        try:
            pending = runs
            while pending:
                left = []
                for p in pending:
                    where = f"[{runs.index(p) + 1}/{len(runs)}] {p.head.text} seed {p.seed}"
                    stop.raise_if_stopped(f"before {where}")
                    if not run_one(p, where, log):
                        left.append(p)
                    write_results(runs, mode, out)
                    stop.raise_if_stopped(f"after {where}")
                if left:
                    wait_for_others(left, log, control=stop)
                pending = left
        finally:
            results = write_results(runs, mode, out)
    log(results.splits.sentence())
    log(f"results: {', '.join(str(out / n) for n in RESULT_FILES)}")
    return results


# --- results -------------------------------------------------------------------------------------

@dataclass
class HeadResult:
    """One head's line of the table, rebuilt from its run folders."""

    head: HeadSpec
    reference: Optional[HeadSpec]                          # None for the reference itself
    seeds: int                                             # asked for
    metrics: dict[int, dict] = field(default_factory=dict)  # seed -> test metrics (fractions), finished only
    head_params: Optional[int] = None
    head_macs: Optional[int] = None
    train_seconds: dict[int, float] = field(default_factory=dict)   # seed -> sum of epoch times
    tests: list[PairedTest] = field(default_factory=list)
    note: str = ""                                         # why some paired tests are missing

    def values(self, key: str) -> list[float]:
        """Per finished seed, metric `key` in %."""
        return [100.0 * m[key] for m in self.metrics.values()]

    def mean_std(self, key: str) -> tuple[Optional[float], Optional[float]]:
        v = self.values(key)
        return (statistics.mean(v) if v else None), (statistics.stdev(v) if len(v) > 1 else None)

    @property
    def verdict(self) -> str:
        return overall_verdict(self.tests, self.head.text)


@dataclass(frozen=True)
class SplitCheck:
    """Whether every run recorded the same split (splits.json: class list and every train/val/test file with
    its size and modification time)."""

    runs: int                                  # runs that recorded a split
    sizes: dict                                # split -> images, of the first run
    differing: tuple[str, ...] = ()            # run folders whose split differs from the first run's

    @property
    def same(self) -> bool:
        return self.runs > 0 and not self.differing

    def sentence(self) -> str:
        if not self.runs:
            return "Splits: no run has recorded its split yet."
        if self.differing:
            return (f"SPLITS DIFFER: {len(self.differing)} of {self.runs} runs recorded another split than the "
                    f"first (other files, or the same files with another size or modification time: "
                    f"{', '.join(self.differing)}); the data folder changed between runs, so their seeds' paired "
                    f"tests are left out and their metrics may be of other images. Rerun into a new --out.")
        sizes = ", ".join(f"{k} {v}" for k, v in self.sizes.items())
        return (f"Splits: all {self.runs} runs recorded the same split (identical splits.json class lists and "
                f"files: {sizes} images).")


def check_splits(runs: Sequence[RunDir]) -> SplitCheck:
    first, sizes, differing, n = None, {}, [], 0
    for r in runs:
        if not r.splits.is_file():
            continue
        doc = r.read_json(r.splits)
        key = (doc["classes"], doc["splits"])
        n += 1
        if first is None:
            first, sizes = key, {k: len(v) for k, v in doc["splits"].items()}
        elif key != first:
            differing.append(str(r.path))
    return SplitCheck(n, sizes, tuple(differing))


@dataclass
class Results:
    heads: list[HeadResult]
    splits: SplitCheck
    seeds: int
    mode: str
    settings: str                               # what every run shared, in words

    @property
    def comparisons(self) -> int:
        return sum(len(h.tests) for h in self.heads)

    @property
    def complete(self) -> bool:
        return all(len(h.metrics) == h.seeds for h in self.heads)


def _train_seconds(run: RunDir) -> float:
    """Time of the run's epochs (train + val), from metrics.jsonl: what differs between heads. Frozen mode's
    one-off feature extraction is not in it (the first run pays it for all)."""
    return sum(r.get("seconds", 0.0) for r in run.read_metrics())


def collect(runs: Sequence[Planned], mode: str) -> Results:
    """The tables as they stand on disk: finished runs only, so they can be rebuilt at any moment."""
    heads = list(dict.fromkeys(p.head for p in runs))
    seeds = len({p.seed for p in runs})
    by_key = {(p.head, p.seed): p.run for p in runs}
    splits = check_splits([p.run for p in runs])
    ref = heads[0]
    rows = []
    bn: dict[str, set[str]] = {}                  # head -> what its runs did with the BatchNorm statistics
    for h in heads:
        row = HeadResult(h, None if h == ref else ref, seeds)
        notes = set()
        for seed in range(seeds):
            run = by_key[h, seed]
            if not run.is_finished():
                continue
            report = run.read_report()
            bn.setdefault(h.text, set()).add(run.read_config().bn_stats)
            row.metrics[seed] = {k: report["test"][k] for k, _ in METRICS}
            row.head_params, row.head_macs = report["head"]["head_params"], report["head"]["head_macs"]
            row.train_seconds[seed] = _train_seconds(run)
            if row.reference is None:
                continue
            if not by_key[ref, seed].is_finished():
                notes.add(f"{ref.text} seed {seed} not finished")
                continue
            if {str(run.path), str(by_key[ref, seed].path)} & set(splits.differing):
                notes.add(f"seed {seed} not paired: its runs recorded different splits")
                continue
            try:
                row.tests.append(paired_test(by_key[ref, seed], run, seed))
            except PairingError as e:
                notes.add(f"seed {seed} not paired: {e}")
        row.note = "; ".join(sorted(notes))
        rows.append(row)
    return Results(rows, splits, seeds, mode, _settings(runs[0].cfg, mode, seeds, bn))


def _bn_words(bn: dict[str, set[str]]) -> str:
    """What the finished runs did with the backbone's BatchNorm statistics, as their config.yaml records it: with
    --bn-stats auto the folder decides, and a head with dropout re-estimates them, so heads can differ."""
    kept = [h for h, done in bn.items() if "frozen" in done]
    if not kept:
        return ""
    if len(kept) == len(bn):
        return ", its BatchNorm statistics kept as loaded"
    return (f", its BatchNorm statistics kept as loaded for {', '.join(kept)} and re-estimated for "
            f"{', '.join(h for h in bn if h not in kept)} (--bn-stats auto re-estimates them under a head with dropout)")


def _settings(cfg: TrainConfig, mode: str, seeds: int, bn: dict[str, set[str]]) -> str:
    if mode == "frozen":
        how = f"features cached once in {cfg.cache_dir}"
    else:
        how = (f"backbone frozen for the first {cfg.freeze_epochs} epoch(s), as train does" if cfg.freeze_epochs
               else "end to end from the first epoch") + _bn_words(bn)
    epochs = "+".join(str(s.epochs) for s in cfg.resolved_stages())
    return (f"Mode: {MODE_NAMES[mode]}. Data {cfg.data}; backbone {cfg.backbone} (weights {cfg.weights}), {how}; "
            f"{epochs} epochs, lr "
            f"{cfg.lr:g}, batch {cfg.batch_size}; seeds 0..{seeds - 1}; split seed {cfg.split_seed}; every run "
            f"picks its epoch on val and evaluates test once.")


def _mean_std_text(row: HeadResult, key: str) -> str:
    mean, std = row.mean_std(key)
    return "" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def cells(row: HeadResult) -> dict[str, str]:
    """Display text of a row; the Markdown and HTML tables both come from here."""
    secs = list(row.train_seconds.values())
    return {
        "head": row.head.text + (" (reference)" if row.reference is None else ""),
        "seeds_done": f"{len(row.metrics)}/{row.seeds}",
        **{k: _mean_std_text(row, k) for k, _ in METRICS},
        "per_seed": "; ".join(f"seed{s}: {100 * m['top1']:.2f}" for s, m in row.metrics.items()),
        "params": "" if row.head_params is None else f"{row.head_params:,}",
        "macs": "" if row.head_macs is None else f"{row.head_macs:,}",
        "train_s": f"{statistics.mean(secs):.1f}" if secs else "",
        "mcnemar": "; ".join(f"seed{t.seed}: b={t.b} c={t.c} p={t.p:.3g}" for t in row.tests) or row.note,
        "verdict": row.verdict,
    }


CSV_COLUMNS = ("head", "kind", "reference", "seeds", "finished_seeds",
               *(f"test_{k}_{s}" for k, _ in METRICS for s in ("mean", "std")), "test_top1_per_seed",
               "head_params", "head_macs", "train_seconds_mean", "mcnemar_seeds", "mcnemar_b", "mcnemar_c",
               "mcnemar_p", "verdict", "same_split", "mode", "note")


def csv_text(res: Results) -> str:
    """Machine-readable: metrics in %, full precision; per-seed values joined by ';' in the order of
    finished_seeds (metrics) and mcnemar_seeds (tests)."""
    def rows():
        for r in res.heads:
            secs = list(r.train_seconds.values())
            yield [r.head.text, r.head.kind, r.reference.text if r.reference else "", r.seeds, join(r.metrics),
                   *("" if v is None else v for k, _ in METRICS for v in r.mean_std(k)), join(r.values("top1")),
                   "" if r.head_params is None else r.head_params, "" if r.head_macs is None else r.head_macs,
                   statistics.mean(secs) if secs else "", join(t.seed for t in r.tests), join(t.b for t in r.tests),
                   join(t.c for t in r.tests), join(t.p for t in r.tests), r.verdict,
                   "yes" if res.splits.same else "no", MODE_NAMES[res.mode], r.note]

    return to_csv(CSV_COLUMNS, rows())


def table(res: Results) -> Table:
    ref = res.heads[0].head.text
    others = len(res.heads) - 1
    columns = (("head", "head"), ("seeds", "seeds_done"), *((f"{name} % (mean ± std)", k) for k, name in METRICS),
               ("top-1 per seed", "per_seed"), ("head params", "params"), ("head MACs / image", "macs"),
               ("train time s (mean)", "train_s"), (f"McNemar vs {ref} (per seed)", "mcnemar"),
               (f"verdict vs {ref}", "verdict"))
    intro = [res.settings, res.splits.sentence(),
             f"Reference head: {ref}. {res.comparisons} McNemar tests made so far, of {others * res.seeds} planned "
             f"({others} head{'s' if others != 1 else ''} x {res.seeds} seed{'s' if res.seeds != 1 else ''}); each "
             f"at p < {ALPHA:g}, with no correction for the number of tests."]
    notes = [
        "Metrics are on the test split, in %: mean ± sample std over the finished seeds. Seeds change the head's "
        "initialisation and the batch order (and in finetune mode the augmentation), never the split.",
        f"McNemar: exact two-sided binomial test on the test images where exactly one of the two heads is right; "
        f"b = {ref} right and this head wrong, c = the reverse; same seed, same images. One test per seed: counts "
        f"are not pooled over seeds (the same image would count once per seed as if independent).",
        f"The verdict says better or worse only when every seed's test is significant (p < {ALPHA:g}) in the same "
        f"direction; otherwise 'no significant difference' or 'mixed'. It is about this data, split and backbone "
        f"only. 'No significant difference' does not mean the heads are equal: with few discordant images the "
        f"test cannot see a small gap.",
        "Head params and MACs are the new head's alone, in closed form (MACs per image: multiply-accumulates of its "
        "Linear layers). Train time is the sum of the run's epoch times (train + val) on this machine, mean over "
        "seeds; in frozen mode the one-off feature extraction, paid once for all runs, is not in it.",
    ]
    return Table("Which head for this data?", columns, [cells(r) for r in res.heads], intro, notes,
                 muted=[i for i, r in enumerate(res.heads) if len(r.metrics) < r.seeds])


def write_results(runs: Sequence[Planned], mode: str, out: PathLike) -> Results:
    """Rebuild the tables from the run folders and write compare.{csv,md,html} atomically. Several processes
    may share OUT: the rebuild and write happen under one lock, so the last write sees every finished run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".compare.lock"):
        res = collect(runs, mode)
        t = table(res)
        write_files(out, dict(zip(RESULT_FILES, (csv_text(res), to_markdown(t), to_html(t)))))
    return res
