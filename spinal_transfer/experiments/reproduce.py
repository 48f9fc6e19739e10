"""`spinal-transfer reproduce`: run the paper recipes over seeds and tabulate ours against the published numbers.

Why this shape: the published numbers are single runs, mostly with the best epoch chosen on the split they
report, and the default-vs-spinal gaps are often a handful of test images. So each recipe runs over several
seeds, the default and spinal heads of the same seed are compared image by image (exact McNemar test), and
every number says which selection protocol and which overrides produced it.

Each (recipe, seed) is its own run directory, OUT/runs/<recipe>/seed<k>/: a finished one is skipped, an
interrupted one is resumed from its last.pt, and the results are rebuilt from those directories every time,
so an interrupted table is finished by rerunning the same command.
"""
from __future__ import annotations

import csv
import glob
import html
import io
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..config import TrainConfig, resolve_config
from ..errors import NonFiniteLoss, RunFolderError, UserError, rerun_resumes
from ..evaluation.stats import (
    ALPHA,
    PairedTest,
    PairingError,
    discordant,
    mcnemar_p,
    overall_verdict,
    read_predictions,
)
from ..runs.rundir import RunDir
from ..training import train
from ..utils.atomic import atomic_write_text
from ..utils.distributed import is_main
from ..utils.preemption import StopControl, parse_signals
from ..utils.stamp import html_generator, md_generator
from .multirun import refuse_others_in, run_dir, tracked_as

DEFAULT_SEEDS = 3
DEFAULT_RECIPES = "recipes/*.yaml"
DEFAULT_DATA_ROOT = "data"
DEFAULT_OUT = "runs/reproduce"
DEFAULT_HEAD = "default"            # recipe stems are <dataset>_<backbone>_<head>
PAPER_RESULTS = "paper_results.csv"  # read from each recipe's folder
RESULT_FILES = ("results.csv", "results.md", "results.html")

PathLike = Union[str, Path]


class ReproduceError(UserError, ValueError):
    """A problem the user can fix; the message says how."""


# --- recipes and run directories -----------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A recipe file; its stem `<dataset>_<backbone>_<head>` pairs it with the `_default` one of its group."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def group(self) -> str:
        return self.name.rsplit("_", 1)[0]

    @property
    def head(self) -> str:
        return self.name.rsplit("_", 1)[-1] if "_" in self.name else ""

    @property
    def partner(self) -> Optional[str]:
        """Stem of the default-head recipe this one is tested against (None for a default recipe)."""
        return None if self.head == DEFAULT_HEAD or not self.head else f"{self.group}_{DEFAULT_HEAD}"


def find_recipes(pattern: str) -> list[Recipe]:
    """Recipes matching the glob, plus the default-head partner of each spinal one (the paired test needs it);
    ordered by group, default first."""
    found = {Path(p) for p in glob.glob(os.path.expanduser(pattern)) if p.endswith((".yaml", ".yml"))}
    if not found:
        checkout = Path(__file__).resolve().parents[2]      # the source checkout the package is installed from
        there = str(checkout / os.path.expanduser(pattern))
        hint = (f"; the checked-in recipes are in the source checkout: {there!r} matches, so run from {checkout} or "
                f"give that path" if not os.path.isabs(os.path.expanduser(pattern)) and glob.glob(there) else "")
        raise ReproduceError(f"no recipe matches {pattern!r} (give a glob of YAML files, e.g. {DEFAULT_RECIPES!r})"
                             + hint)
    for p in list(found):
        partner = Recipe(p).partner
        found |= {q for q in (p.parent / f"{partner}.yaml", p.parent / f"{partner}.yml") if partner and q.is_file()}
    return sorted((Recipe(p) for p in found), key=lambda r: (r.group, r.head != DEFAULT_HEAD, r.name))


OVERRIDES = ("protocol", "select_on", "epochs", "limit_train_batches", "batch_size", "img_size", "amp", "device",
             "workers", "log_to", "tracking_uri", "experiment")
# What must agree between a run on disk and the run asked for, or the table would mix protocols (workers and the
# trackers do not change what a run learns, so a rerun may change them).
PROTOCOL = ("seed", "protocol", "select_on", "limit_train_batches", "batch_size", "img_size", "amp", "device")


def recipe_config(recipe: Recipe, data_root: PathLike, out: PathLike, seed: int,
                  overrides: Optional[dict] = None) -> TrainConfig:
    """The recipe with reproduce's settings: data under data_root (absolute paths kept), the seed, the run
    folder, and the overrides (OVERRIDES; None values ignored), through config.resolve_config as `train` does
    (so `epochs` replaces every stage's length and keeps its lr). split_seed stays the recipe's, so the default
    and spinal runs of a seed are tested on the same images."""
    cfg = TrainConfig.from_yaml(recipe.path)
    if not cfg.data:
        raise ReproduceError(f"{recipe.path}: the recipe sets no data folder (data: <name under --data-root>)")
    unknown = set(overrides or {}) - set(OVERRIDES)
    if unknown:
        raise ReproduceError(f"reproduce cannot override {', '.join(sorted(unknown))}")
    flags: dict[str, Any] = {"data": str((Path(data_root).expanduser() / Path(cfg.data).expanduser()).resolve()),
                             "seed": seed, "out": str(run_dir(out, recipe.name, seed).path), **(overrides or {})}
    return resolve_config(cfg, {k: v for k, v in flags.items() if v is not None})


def _protocol(cfg: TrainConfig) -> dict:
    """What must agree between a run on disk and the run asked for (PROTOCOL, and the schedule)."""
    return {**{k: getattr(cfg, k) for k in PROTOCOL},
            "stages (epochs, lr)": [(s.epochs, s.lr) for s in cfg.resolved_stages()]}


def check_protocol(cfg: TrainConfig, collect: bool = False) -> None:
    """Refuse to skip or resume a run made with other settings (e.g. a smoke run, or the other selection); to
    `collect` one, the command repeats the overrides the runs were made with (the table names them)."""
    run = RunDir(cfg.out)
    if not run.config.is_file():
        return
    have, want = _protocol(run.read_config()), _protocol(cfg)
    diff = [f"{k}: {have[k]} there, {want[k]} asked for" for k in want if have[k] != want[k]]
    if diff:
        raise ReproduceError(f"{run.path} was run with other settings ({'; '.join(diff)}). " + (
            "--collect reads the runs as they were made: give it the overrides they were made with (e.g. --epochs)"
            if collect else "Use another --out, or delete that run directory to redo it."))


# --- results -------------------------------------------------------------------------------------

@dataclass
class Row:
    """One recipe's line of the table, rebuilt from its run directories."""

    recipe: str
    head: str
    compared_with: str                                  # the default recipe; "" for a default recipe
    seeds: int                                          # asked for
    backbone: str = ""                                  # the recipe's, as train builds it (timm/..., torchvision/...)
    top1: dict[int, float] = field(default_factory=dict)     # seed -> test top-1 (%), finished runs only
    selected_on: str = ""                               # split that picked the best epoch (ours)
    protocol: str = ""                                  # honest or paper
    train_images: dict[int, int] = field(default_factory=dict)   # seed -> images the run trained on
    overrides: str = ""
    paper: list[dict] = field(default_factory=list)    # matching rows of paper_results.csv
    tests: list[PairedTest] = field(default_factory=list)
    test_note: str = ""                                 # why some paired tests are missing

    @property
    def mean_std(self) -> tuple[Optional[float], Optional[float]]:
        v = list(self.top1.values())
        return (statistics.mean(v) if v else None), (statistics.stdev(v) if len(v) > 1 else None)


def _overrides(ran: TrainConfig, recipe: TrainConfig) -> str:
    """The settings of a run that differ from its recipe's, as `key=value` (smoke runs, small machines)."""
    parts = []
    epochs = [s.epochs for s in ran.resolved_stages()]
    if epochs != [s.epochs for s in recipe.resolved_stages()]:
        parts.append("epochs=" + "+".join(map(str, epochs)))
    parts += [f"{k}={getattr(ran, k)}" for k in ("limit_train_batches", "batch_size", "img_size", "amp", "device")
              if getattr(ran, k) != getattr(recipe, k) and not (k == "img_size" and recipe.img_size is None)]
    return ", ".join(parts) or "none"


def load_paper_results(recipes: Sequence[Recipe]) -> dict[str, list[dict]]:
    """recipe stem -> rows of the paper_results.csv next to the recipes."""
    table: dict[str, list[dict]] = {}
    for folder in sorted({r.path.parent for r in recipes}):
        path = folder / PAPER_RESULTS
        if path.is_file():
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    if r.get("recipe"):
                        table.setdefault(r["recipe"], []).append(r)
    return table


def table_rows(recipes: Sequence[Recipe], seeds: int, out: PathLike) -> list[Row]:
    """The table as it stands on disk: finished runs only, so it can be rebuilt at any moment."""
    paper = load_paper_results(recipes)
    names = {r.name for r in recipes}
    rows = []
    for r in recipes:
        row = Row(r.name, r.head, r.partner or "", seeds, paper=paper.get(r.name, []))
        recipe_cfg = TrainConfig.from_yaml(r.path)
        row.backbone = recipe_cfg.backbone
        selections, protocols, overrides, notes = set(), set(), set(), set()
        for seed in range(seeds):
            d = run_dir(out, r.name, seed)
            if not d.is_finished():
                continue
            report = d.read_report()
            row.top1[seed] = 100.0 * report["test"]["top1"]
            row.train_images[seed] = report["num_images"]["train"]
            selections.add(report["selected_on"])
            protocols.add(report["protocol"])
            overrides.add(_overrides(d.read_config(), recipe_cfg))
            if r.partner is None:
                continue
            partner = run_dir(out, r.partner, seed)
            if not partner.is_finished():
                notes.add(f"{r.partner} not finished" if r.partner in names else f"no recipe {r.partner}")
                continue
            try:
                b, c = discordant(read_predictions(partner), read_predictions(d))
            except PairingError as e:
                notes.add(f"not paired: {e}")
                continue
            row.tests.append(PairedTest(seed, b, c, mcnemar_p(b, c)))
        row.selected_on, row.protocol = ", ".join(sorted(selections)), ", ".join(sorted(protocols))
        row.overrides = "; ".join(sorted(overrides))
        row.test_note = "; ".join(sorted(notes))
        rows.append(row)
    return rows


def _pct(x: Optional[float], sign: bool = False) -> str:
    return "" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def _paper_protocol(p: dict) -> str:
    chosen_on = p["split"] if str(p.get("selected_on_same_split", "")).lower() == "true" else "val"
    return f"{p['split']} (best epoch on {chosen_on})"


def cells(row: Row) -> dict[str, str]:
    """Display text of a row; the CSV, Markdown and HTML tables all come from here."""
    mean, std = row.mean_std
    paper = [float(p["top1"]) for p in row.paper]
    return {
        "recipe": row.recipe,
        "seeds_done": f"{len(row.top1)}/{row.seeds}",
        "selected_on": row.selected_on,
        "protocol": row.protocol,
        "train_images": "; ".join(f"{n:,}" for n in sorted(set(row.train_images.values()))),
        "overrides": row.overrides,
        "paper_top1": "; ".join(f"{p:.2f}" for p in paper) or "not reported",
        "paper_protocol": "; ".join(_paper_protocol(p) for p in row.paper),
        "ours_top1": "" if mean is None else _pct(mean) + ("" if std is None else f" ± {std:.2f}"),
        "ours_per_seed": "; ".join(f"seed{s}: {v:.2f}" for s, v in row.top1.items()),
        "diff": "" if mean is None else "; ".join(_pct(mean - p, sign=True) for p in paper),
        "mcnemar": "; ".join(f"seed{t.seed}: b={t.b} c={t.c} p={t.p:.3g}" for t in row.tests) or row.test_note,
        "verdict": overall_verdict(row.tests, row.head),
    }


CSV_COLUMNS = ("recipe", "dataset", "backbone", "head", "compared_with", "seeds", "finished_seeds", "protocol",
               "train_images", "selected_on", "overrides", "paper_top1", "paper_split", "paper_selected_on_same_split",
               "ours_top1_mean", "ours_top1_std", "ours_top1_per_seed", "diff_vs_paper", "mcnemar_seeds", "mcnemar_b",
               "mcnemar_c", "mcnemar_p", "verdict", "note")


def _join(values: Any) -> str:
    return ";".join(str(v) for v in values)


def to_csv(rows: Sequence[Row]) -> str:
    """Machine-readable: full precision; several values in one cell (seeds, paper rows) are joined by ';', in the
    order of finished_seeds (the seed numbers of the finished runs; `seeds` is how many were asked for),
    mcnemar_seeds and the paper rows. `backbone` is the recipe's own (e.g. torchvision/wide_resnet101_2), not the
    short name in its file name."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        mean, std = r.mean_std
        dataset = r.recipe.rsplit("_", 1)[0].rpartition("_")[0]        # <dataset>_<backbone>_<head>
        w.writerow([r.recipe, dataset, r.backbone, r.head, r.compared_with, r.seeds, _join(r.top1), r.protocol,
                    _join(r.train_images.values()), r.selected_on, r.overrides,
                    _join(p["top1"] for p in r.paper) or "not reported", _join(p["split"] for p in r.paper),
                    _join(p.get("selected_on_same_split", "") for p in r.paper), "" if mean is None else mean,
                    "" if std is None else std, _join(r.top1.values()),
                    "" if mean is None else _join(mean - float(p["top1"]) for p in r.paper),
                    _join(t.seed for t in r.tests), _join(t.b for t in r.tests), _join(t.c for t in r.tests),
                    _join(t.p for t in r.tests), overall_verdict(r.tests, r.head), r.test_note])
    return buf.getvalue()


TABLE = (("recipe", "recipe"), ("seeds", "seeds_done"), ("protocol", "protocol"), ("training images", "train_images"),
         ("ours selected on", "selected_on"),
         ("overrides", "overrides"), ("paper top-1 %", "paper_top1"), ("paper split (selection)", "paper_protocol"),
         ("ours top-1 % (mean ± std)", "ours_top1"), ("ours per seed", "ours_per_seed"), ("ours − paper", "diff"),
         ("McNemar vs default (per seed)", "mcnemar"), ("verdict", "verdict"))

NOTES = [
    "Top-1 accuracy on the test split, in %; mean ± sample std over the finished seeds.",
    "'protocol' says which experiment produced each number: honest (the default: the best epoch is chosen on a "
    "val split held out of train) or paper (--protocol paper: the authors' training set and selection split, "
    "usually the test split they reported); 'training images' is how many images the runs trained on. "
    "'ours selected on' is the split that picked the best epoch. 'overrides' other than none mark a shortened "
    "(smoke) or resized run whose numbers are not comparable to the paper's.",
    "McNemar: exact two-sided binomial test on the test images where exactly one head is right; b = default right "
    "and this head wrong, c = the reverse; same seed, same images. One test per seed (counts are not pooled: the "
    f"same image would count once per seed as if independent). Significant means p < {ALPHA:g}; the verdict is "
    "better/worse only if every seed agrees. No correction for the many rows.",
    "'paper' lists every row of paper_results.csv for the recipe; its split says where the published number was "
    "measured and where its best epoch was chosen.",
]


def to_markdown(rows: Sequence[Row]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(h for h, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in rows:
        c = cells(r)
        lines.append("| " + " | ".join(esc(c[k]) for _, k in TABLE) + " |")
    return ("# SpinalNet transfer results\n\n" + "\n".join(lines) + "\n\n" + "".join(f"* {n}\n" for n in NOTES)
            + "\n" + md_generator())


def to_html(rows: Sequence[Row]) -> str:
    """One file, no external assets: opens anywhere, can be attached to a report."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h, _ in TABLE)
    body = []
    for r in rows:
        c = cells(r)
        smoke = ' class="smoke"' if r.overrides not in ("", "none") else ""
        body.append(f"<tr{smoke}>" + "".join(f"<td>{e(c[k])}</td>" for _, k in TABLE) + "</tr>")
    notes = "".join(f"<li>{e(n)}</li>" for n in NOTES)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{html_generator()}<title>SpinalNet transfer results</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #eee; }}
tr.smoke td {{ background: #fff4d6; }}
</style></head><body>
<h1>SpinalNet transfer results</h1>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<ul>{notes}<li>Shaded rows are smoke runs (overrides).</li></ul>
</body></html>
"""


def write_results(recipes: Sequence[Recipe], seeds: int, out: PathLike) -> list[Row]:
    """Rebuild the table from the run folders and write results.{csv,md,html} atomically (rank 0 only)."""
    if not is_main():
        return []
    rows = table_rows(recipes, seeds, out)
    for name, text in zip(RESULT_FILES, (to_csv(rows), to_markdown(rows), to_html(rows))):
        atomic_write_text(Path(out) / name, text)
    return rows


# --- the driver ----------------------------------------------------------------------------------

def _stderr(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def estimated_cost(cfg: TrainConfig) -> float:
    """Relative cost of a run for balancing shards, as the README's GPU-time table estimates it: per epoch
    (training images + evaluated images / 3, forward-only) x crop side squared, summed over the epochs. Image
    counts come from the data folder (prepare.json's counts, else the files); a folder not there yet counts 1.
    Under --protocol paper a recipe that selected on test trains on train + val and evaluates test each epoch."""
    counts = _image_counts(Path(cfg.data))
    # --protocol paper with selection on test: val joins the training set and test is evaluated every epoch
    paper_test = cfg.protocol == "paper" and cfg.paper_select_on == "test"
    train = counts.get("train", 1) + (counts.get("val", 0) if paper_test else 0)
    if cfg.limit_train_batches:
        train = min(train, cfg.limit_train_batches * cfg.batch_size)
    evaluated = (0 if paper_test else counts.get("val", 0)) + \
        (counts.get("test", 0) if paper_test or cfg.select_on == "test" else 0)
    side = cfg.img_size or 224
    return cfg.total_epochs() * (train + evaluated / 3) * side * side


def _image_counts(data: Path) -> dict[str, int]:
    manifest = data / "prepare.json"
    if manifest.is_file():
        return {k: int(v) for k, v in json.loads(manifest.read_text()).get("counts", {}).items()}
    if not data.is_dir():
        return {}
    return {split: sum(1 for p in (data / split).rglob("*") if p.is_file()) for split in ("train", "val", "test")
            if (data / split).is_dir()} or {"train": sum(1 for p in data.rglob("*") if p.is_file())}


def shard_of(costs: Sequence[float], k: int, n: int) -> list[int]:
    """Positions of the plan shard k of n runs: largest first to the least loaded shard (ties: lowest index),
    so the shards' estimated costs are balanced, and every shard computes the same split on its own."""
    load = [0.0] * n
    owner: dict[int, int] = {}
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        j = min(range(n), key=lambda j: (load[j], j))
        owner[i], load[j] = j, load[j] + costs[i]
    return sorted(i for i, j in owner.items() if j == k)


def shard_from_env(spec: str, environ: Optional[dict] = None) -> tuple[int, int]:
    """(k, n) of `--shard`: "K/N" as given; "auto" or "auto/N" from the scheduler's environment: a SLURM job
    array (SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with
    N given). k counts from 0."""
    env = os.environ if environ is None else environ
    given, _, n_text = spec.partition("/")
    n = int(n_text) if n_text.isdigit() else None
    if given.isdigit() and n:
        k = int(given)
    elif given == "auto" and "SLURM_ARRAY_TASK_ID" in env:
        step, low = int(env.get("SLURM_ARRAY_TASK_STEP", 1)), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        k = (int(env["SLURM_ARRAY_TASK_ID"]) - low) // step
        count = int(env["SLURM_ARRAY_TASK_COUNT"]) if "SLURM_ARRAY_TASK_COUNT" in env else None
        if n is not None and count is not None and n != count:
            raise ReproduceError(f"--shard {spec}: the SLURM array has {count} tasks, not {n}")
        n = n or count
    elif given == "auto" and "JOB_COMPLETION_INDEX" in env:
        k = int(env["JOB_COMPLETION_INDEX"])
    else:
        raise ReproduceError(f"--shard {spec}: give K/N (0 <= K < N), or auto inside a SLURM job array or a "
                             f"Kubernetes Indexed Job (with auto/N there: Kubernetes does not tell the count)")
    if not n or not 0 <= k < n:
        raise ReproduceError(f"--shard {spec}: shard {k} of {n} does not exist (K counts from 0 to N-1)")
    return k, n


def check_prepared(folders: Sequence[str], data_root: PathLike) -> None:
    """ReproduceError, before the first run, naming every dataset of the plan not prepared under `data_root`
    and the command that prepares it (datasets are never downloaded by reproduce)."""
    from ..data.prepare import DATASETS  # lazy: the dataset table is needed only when something is missing

    missing = sorted({Path(f).name for f in folders if not Path(f).is_dir()})
    if not missing:
        return
    fetched = [m for m in missing if m in DATASETS and DATASETS[m].downloadable]
    bundled = [m for m in missing if m in DATASETS and not (DATASETS[m].needs or DATASETS[m].fetch)]
    manual = [m for m in missing if m not in fetched and m not in bundled]

    def which(names: list[str]) -> str:
        return "it" if len(names) == 1 else "each of " + ", ".join(names)
    how = ([f"`spinal-transfer prepare {fetched[0]} --root {data_root} --download` fetches {which(fetched)} (the "
            f"network once)"] if fetched else []) + \
        ([f"`spinal-transfer prepare {bundled[0]} --root {data_root}` makes {which(bundled)} from images installed "
          f"packages ship (nothing to fetch)"] if bundled else []) + \
        ([f"`spinal-transfer prepare {manual[0]} --root {data_root}` says where to get the raw files of "
          f"{which(manual)} (prepare cannot download them)"] if manual else [])
    raise ReproduceError(f"not prepared under {data_root}: {', '.join(missing)}; prepare each first: "
                         + "; ".join(how))


def plan_runs(recipes: Sequence[Recipe], data_root: PathLike, out: Path, seeds: int,
              overrides: Optional[dict] = None) -> list[tuple[Recipe, int, TrainConfig]]:
    """Every (recipe, seed) of the table in order: seed by seed, each default recipe before its spinal ones."""
    return [(r, seed, recipe_config(r, data_root, out, seed, overrides))
            for group in dict.fromkeys(r.group for r in recipes)
            for seed in range(seeds) for r in recipes if r.group == group]


def reproduce(recipes: Sequence[Recipe], data_root: PathLike = DEFAULT_DATA_ROOT, out: PathLike = DEFAULT_OUT,
              seeds: int = DEFAULT_SEEDS, overrides: Optional[dict] = None, shard: Optional[tuple[int, int]] = None,
              log: Callable[[str], Any] = _stderr) -> list[Row]:
    """Run every (recipe, seed) of this shard (all of them without one) not finished yet, then write the tables.

    Every run's settings are checked against its folder before anything trains; the tables are rebuilt from
    every finished run after each run and on the way out of an interruption, so any shard, or `collect`, writes
    the whole table as it stands. A run whose loss becomes non-finite is reported and skipped (its row shows
    fewer finished seeds); a run another process is training is left to it (run folders are locked)."""
    if seeds < 1:
        raise ReproduceError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out).expanduser().resolve()      # runs record absolute paths: resume works from any directory
    refuse_others_in(out, RESULT_FILES, CSV_COLUMNS)
    plan = plan_runs(recipes, data_root, out, seeds, overrides)
    for _, _, cfg in plan:
        check_protocol(cfg)
    mine = shard_of([estimated_cost(cfg) for _, _, cfg in plan], *shard) if shard else range(len(plan))
    if shard:
        log(f"shard {shard[0]}/{shard[1]}: {len(mine)} of the {len(plan)} runs")
    check_prepared([plan[i][2].data for i in mine], data_root)
    # the command's own handlers (the first run's signals: a recipe's stop_signals): a signal between runs used
    # to kill it (143), and one a run received while writing its report was forgotten when that run returned
    signals = parse_signals(plan[mine[0]][2].stop_signals) if len(mine) else []
    with StopControl(signals) as stop, rerun_resumes("reproduce"):
        try:
            for n, i in enumerate(mine, 1):
                r, seed, cfg = plan[i]
                run, where = RunDir(cfg.out), f"[{n}/{len(mine)}] {r.name} seed {seed}"
                stop.raise_if_stopped(f"before {where}")
                state = run.state()
                if state == "finished":
                    log(f"{where}: finished, skipped")
                    continue
                if run.is_locked():
                    log(f"{where}: being trained by another process, left to it")
                    continue
                log(f"{where}: {'resuming' if state == 'interrupted' else 'starting'} -> {cfg.out}")
                try:       # a run that stopped before its first checkpoint starts over
                    train.run(cfg, resume=cfg.out if state == "interrupted" else None, overwrite=state == "started",
                              track_as=tracked_as(cfg.out))
                except (NonFiniteLoss, RunFolderError) as e:
                    log(f"{where}: {e}")
                write_results(recipes, seeds, out)
                stop.raise_if_stopped(f"after {where}")
        finally:
            rows = write_results(recipes, seeds, out)
    log(f"results: {', '.join(str(out / n) for n in RESULT_FILES)}")
    return rows


def seeds_asked(out: PathLike) -> Optional[int]:
    """How many seeds the reproduce that wrote OUT asked for (results.csv's `seeds`, which every shard writes
    after each run), or None when OUT has no table yet: what `--collect` without --seeds tabulates."""
    try:
        with open(Path(out) / RESULT_FILES[0], newline="", encoding="utf-8") as f:
            asked = [int(row["seeds"]) for row in csv.DictReader(f) if str(row.get("seeds", "")).isdigit()]
    except (OSError, ValueError, csv.Error):
        return None
    return max(asked, default=None)


def collect(recipes: Sequence[Recipe], data_root: PathLike, out: PathLike, seeds: int,
            overrides: Optional[dict] = None, log: Callable[[str], Any] = _stderr) -> list[Row]:
    """The tables from whatever has finished (no training), and what is still missing, said."""
    out = Path(out).expanduser().resolve()
    refuse_others_in(out, RESULT_FILES, CSV_COLUMNS)
    plan = plan_runs(recipes, data_root, out, seeds, overrides)
    for _, _, cfg in plan:
        check_protocol(cfg, collect=True)
    missing = [f"{r.name} seed {seed} ({RunDir(cfg.out).state()})" for r, seed, cfg in plan
               if not RunDir(cfg.out).is_finished()]
    rows = write_results(recipes, seeds, out)
    log(f"results: {', '.join(str(out / n) for n in RESULT_FILES)}")
    if missing:
        log(f"not finished yet ({len(missing)} of {len(plan)} runs): " + "; ".join(missing))
    return rows
