"""Running a model over a split: logits in sample order on every rank, per-image predictions, `evaluate`.

Every batch carries the sample indices of its images, so outputs map back to their exact files: under
torchrun each rank evaluates its shard and the gathered outputs are sorted by index (each image once), and a
file that fails to decode simply has no row.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.leakage import duplicates_of
from ..data.loaders import ShardSampler, make_loader
from ..data.skiplog import SkipLog
from ..data.splits import (changed_splits, config_splits, fingerprints, holds_recorded, labelled_images, load_recorded,
                           recorded_fingerprints)
from ..data.transforms import build_transforms
from ..errors import ConfigError, DataError, few, option_value
from ..models.restore import model_from_checkpoint
from ..runs.rundir import RunDir, load_run_checkpoint
from ..utils.distributed import gather_objects, is_main
from ..utils.runtime import amp_dtype, configure_process, pick_device, use_channels_last
from .calibration import calibrated_softmax, temperature_of
from .interpret import write_predictions_csv
from .metrics import classification_metrics

log = logging.getLogger("spinal_transfer")


@dataclass
class Outputs:
    """What a model said about a split: logits (N, C), targets (N,), and each row's index in the sample list."""

    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# --- test-time augmentation ------------------------------------------------------------------------

TTA_CROPS = (0, 5)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the prediction is the mean of the softmax over views of each (preprocessed) image:
    the image itself, its horizontal mirror (`flip`), and with `crops=5` the four corner crops and the centre crop
    of `crop_fraction` of the side, each resized back to the input size (and mirrored too when `flip`).

    Views are cut from the evaluation tensor, so any model and runner (eager, ONNX) takes them, and the flip of an
    image is exactly the mirror of what plain evaluation sees. Averaging probabilities, not logits, is what
    fastai's `tta` and timm's `--tta` do: one confident view cannot swamp the others by its logit scale."""

    flip: bool = True
    crops: int = 0
    crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.crops not in TTA_CROPS:
            raise ConfigError(f"{option_value('tta_crops', self.crops)} is not one of {TTA_CROPS} (0: none; 5: four "
                              f"corners and the centre)", key="tta_crops")
        if not 0 < self.crop_fraction < 1:
            raise ConfigError(f"TTA crop_fraction must be in (0, 1), got {self.crop_fraction}")

    @property
    def num_views(self) -> int:
        return (1 + self.crops) * (2 if self.flip else 1)

    def to_dict(self) -> dict:
        """What a report records: the setting and how many views each image was seen in."""
        return {**asdict(self), "views": self.num_views}

    @classmethod
    def from_dict(cls, d: dict) -> "TTA":
        """The TTA that `to_dict` recorded."""
        return cls(flip=d["flip"], crops=d["crops"], crop_fraction=d["crop_fraction"])

    def as_trained(self, hflip: Optional[float]) -> "TTA":
        """Without the mirror view when the model was trained with `--hflip 0` (`hflip` is the run's setting; None:
        the policy's, or unknown for a bundle exported before it was recorded): the user said a mirrored image is
        not of the same class (text, digits, arrows), and averaging it in lowered accuracy. Said in the log."""
        if not self.flip or hflip != 0:
            return self
        log.info("TTA: no mirror view: the model was trained with --hflip 0 (a mirrored image is not of its class)"
                 + ("" if self.crops else "; with no crops (--tta-crops) that leaves the image alone, the same as "
                                          "without TTA"))
        return replace(self, flip=False)

    def describe(self) -> str:
        parts = ["image"] + (["its mirror"] if self.flip else []) + \
            ([f"{self.crops} crops of {self.crop_fraction:g} of the side" + (" (and mirrors)" if self.flip else "")]
             if self.crops else [])
        return f"TTA: mean softmax over {self.num_views} views ({', '.join(parts)})"


def tta_views(x: torch.Tensor, tta: TTA) -> list[torch.Tensor]:
    """The views of a (N, C, H, W) batch, the unchanged batch first."""
    bases = [x]
    if tta.crops:
        h, w = x.shape[-2:]
        ch, cw = max(1, round(h * tta.crop_fraction)), max(1, round(w * tta.crop_fraction))
        corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
        bases += [F.interpolate(x[..., t:t + ch, l:l + cw], size=(h, w), mode="bilinear", align_corners=False)
                  for t, l in corners]
    return [v for b in bases for v in ([b, b.flip(-1)] if tta.flip else [b])]


def tta_probs(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: Optional[TTA],
              dtype: torch.dtype = torch.float32, temperature: float = 1.0) -> torch.Tensor:
    """softmax(log(p) / temperature) in `dtype`, p the mean over the views of their plain softmax (as train's
    TTA and TTAModel average them): the temperature scales the averaged prediction, so calibration never changes
    a class (averaging each view's calibrated softmax did, under TTA). One view: softmax(logits / T). `predict`,
    `Predictor` and anything serving a model compute their probabilities here."""
    views = tta_views(x, tta) if tta is not None else [x]
    return calibrated_softmax(log_mean_softmax([run(v).to(dtype) for v in views]), temperature, dtype)


def log_mean_softmax(logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean softmax of several views' logits, as a log-mean-exp of log-softmaxes (no underflow to
    log(0) for a confident view); one view's own logits, unchanged."""
    if len(logits) == 1:
        return logits[0]
    return torch.logsumexp(torch.stack([o.log_softmax(1) for o in logits]), 0) - math.log(len(logits))


class TTAModel(nn.Module):
    """`model` seen through test-time augmentation. Its output is the log of the mean softmax over the views, so
    every consumer of logits (argmax, softmax, cross-entropy loss, top-k) reads the averaged probabilities; with a
    single view it is the model's own logits, unchanged. With `keep_plain`, the plain logits come first and the
    TTA output after them along dim 1 (`predict_logits_tta` splits them: both from one pass over the data)."""

    def __init__(self, model: nn.Module, tta: TTA, keep_plain: bool = False):
        super().__init__()
        self.model, self.tta, self.keep_plain = model, tta, keep_plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.model(v).float() for v in tta_views(x, self.tta)]
        out = log_mean_softmax(outs)
        return torch.cat([outs[0], out], dim=1) if self.keep_plain else out


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, device: torch.device, dtype: Optional[torch.dtype] = None,
                   channels_last: bool = False, desc: str = "eval", total: Optional[int] = None,
                   tta: Optional[TTA] = None) -> Outputs:
    """Logits of every `(images, labels, indices)` batch, gathered over ranks in sample order (a collective
    under torchrun: every rank calls it, each with its shard). With `tta`, the log of the mean softmax over the
    test-time views (see TTAModel), which every metric reads as logits."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module      # per-rank evaluation: no collective inside forward (shards differ in length)
    if tta is not None:
        model = TTAModel(model, tta)
    model.eval()
    logits, targets, index = [], [], []
    for x, y, idx in tqdm(batches, desc=desc, leave=False, disable=not is_main(), total=total):
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y)
        index.append(idx)
    mine = Outputs(torch.cat(logits) if logits else torch.zeros(0, 0),
                   torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
                   torch.cat(index) if index else torch.zeros(0, dtype=torch.long))
    parts = [p for p in gather_objects(mine) if len(p)]
    if not parts:
        return mine
    out = Outputs(*(torch.cat([getattr(p, k) for p in parts]) for k in ("logits", "targets", "index")))
    order = out.index.argsort()
    return Outputs(out.logits[order], out.targets[order], out.index[order])


def predict_logits_tta(model: nn.Module, batches: Iterable, device: torch.device, tta: TTA,
                       dtype: Optional[torch.dtype] = None, channels_last: bool = False, desc: str = "eval",
                       total: Optional[int] = None) -> tuple[Outputs, Outputs]:
    """(plain outputs, TTA outputs) from one pass over the data: the report of a run with TTA, and `evaluate
    --tta`, show the metric with and without it at the cost of the extra views only."""
    both = predict_logits(TTAModel(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model,
                                   tta, keep_plain=True), batches, device, dtype, channels_last, desc, total)
    c = both.logits.shape[1] // 2
    return (Outputs(both.logits[:, :c], both.targets, both.index), Outputs(both.logits[:, c:], both.targets, both.index))


def write_predictions(path: Path, samples: Sequence[tuple[str, int]], out: Outputs, classes: Sequence[str]) -> None:
    """The per-image predictions CSV (interpret.py's format): each row with its image's exact path."""
    write_predictions_csv(path, [samples[i][0] for i in out.index.tolist()], out.logits, out.targets, classes)


# --- `evaluate`: a trained run or checkpoint on one split -----------------------------------------

@dataclass
class Evaluation:
    metrics: dict           # with TTA: the TTA metrics (metrics["tta"] records the setting)
    outputs: Outputs
    samples: list
    classes: list[str]
    source: str             # which images were used, in words
    plain_metrics: Optional[dict] = None      # with TTA: the same split without it
    tta: Optional[TTA] = None                 # the views used (TTA.as_trained of the one asked for)


def evaluate(source: str | Path, data: Optional[str | Path] = None, split: str = "test", device: str = "auto",
             batch_size: Optional[int] = None, workers: Optional[int] = None,
             tta: Union[TTA, bool, str, None] = None, calibrated: bool = True) -> Evaluation:
    """Metrics of a run's best checkpoint (or any checkpoint file) on one split; with `tta` (a TTA, or True: the
    image and its mirror; "run": the run's own --tta setting, so a run trained with --tta gets report.json's
    metrics), the metrics with test-time augmentation (`metrics["tta"]` records its setting) and, in
    `plain_metrics`, without.

    `calibrated`: logits divided by the checkpoint's temperature (calibration.py; T = 1 when it has none), so
    the loss and the predictions CSV are of the calibrated probabilities; accuracy metrics are the same either
    way. `metrics["temperature"]` records the T applied.

    Without `data` (or with the run's own data folder, where it is now if it moved, or a copy of it: see
    `_eval_samples`) the run's recorded split is used, so the accuracy metrics match report.json's exactly (the
    loss too with `calibrated=False`). Another folder is read by
    `labelled_images`: its split folder, or all its images when it is a flat class-folder tree (never a carved
    split), its class folders labelled by the model's classes."""
    tta = (TTA(flip=True) if tta else None) if isinstance(tta, bool) else tta
    ckpt = load_run_checkpoint(source)
    model, cfg, dc, classes = model_from_checkpoint(ckpt)
    if tta == "run":
        tta = TTA(flip=True, crops=cfg.tta_crops) if cfg.tta else None
    tta = tta.as_trained(cfg.hflip) if tta is not None else None
    skips = SkipLog()                      # the scan's and the decoder's: metrics list every file not scored
    samples, used = _eval_samples(Path(source), cfg, data, split, classes, ckpt.get("split_fingerprints"),
                                  skips=skips)
    dev = pick_device(device)
    configure_process(dev)
    channels_last = use_channels_last(cfg.channels_last, dev)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    temperature = temperature_of(ckpt) if calibrated else 1.0
    loader = make_loader(samples, build_transforms(dc, train=False), batch_size or cfg.batch_size,
                         workers if workers is not None else cfg.workers, dev, ShardSampler(len(samples)))

    plain_m = None
    if tta is None:
        out = predict_logits(model, skips.watch(loader), dev, amp_dtype(cfg.amp, dev), channels_last, desc=split)
    else:
        plain, out = predict_logits_tta(model, skips.watch(loader), dev, tta, amp_dtype(cfg.amp, dev), channels_last,
                                        desc=f"{split} (TTA x{tta.num_views})")
        plain = scaled(plain, temperature)
        plain_m = {**classification_metrics(plain.logits, plain.targets, classes), "tta": None}
    out = scaled(out, temperature)        # after TTA's average (tta_probs): calibration changes no class
    m = classification_metrics(out.logits, out.targets, classes)
    m["tta"] = tta.to_dict() if tta is not None else None
    m["temperature"] = temperature
    m["num_skipped_files"] = len(skips)
    m["skipped_files"] = [[p, r] for p, r in skips.entries.items()]
    return Evaluation(m, out, samples, classes, used + _unscored(samples, out.targets, classes), plain_m, tta)


def _unscored(samples: list, scored: torch.Tensor, classes: list[str]) -> str:
    """What the metrics leave out of `samples` (listed for scoring) because the decoder skipped them, in words
    for the line saying which images were evaluated ("" when every one was scored); a class none of whose images
    could be read is named in a warning, since its recall is then not measured at all."""
    if len(scored) == len(samples):
        return ""
    lost = sorted({classes[y] for _, y in samples} - {classes[int(y)] for y in scored})
    if lost:
        log.warning(f"no image of {len(lost)} class(es) could be decoded, so the metrics say nothing of them: "
                    f"{few(lost)} (the skipped files are listed in the metrics)")
    return f"; {len(scored)} of them scored, {len(samples) - len(scored)} could not be decoded"


def scaled(out: Outputs, temperature: float) -> Outputs:
    """`out` with its logits (a TTA output's log of the mean softmax) divided by the temperature: what every
    consumer of logits (metrics, the predictions CSV) then reads as calibrated probabilities."""
    return out if temperature == 1.0 else Outputs(out.logits / temperature, out.targets, out.index)


# `evaluate` of a run whose recorded files are gone: the folder restored or at its new place is read as the run's;
# one that does not hold most of its files is scored as it is (`_eval_samples`, `splits.holds_recorded`)
GONE_ADVICE = ("score another labelled folder with --data: one that does not hold most of the run's files is "
               "read as it is (its --split folder, or all its images)")


def _eval_samples(source: Path, cfg, data: Optional[str | Path], split: str, classes: list[str],
                  recorded: Optional[dict] = None, advice: str = GONE_ADVICE, needed: Optional[Sequence[str]] = None,
                  log_changes: bool = True, skips: Optional[SkipLog] = None) -> tuple[list, str]:
    """The samples `evaluate` reads, and a sentence saying which they are. `recorded`: the checkpoint's split
    fingerprints; splits that do not match them are refused (another run's splits.json, or a folder that changed
    since the run: either may hold images the model trained on). `advice`: what the calling command suggests when
    recorded files are gone (`load_recorded`); `needed`: the recorded splits whose gone files are refused (default
    `split` alone: a gone train image does not change a test score; export's int8 reads train and val, and passes
    them), those of the others are dropped with a warning (`log_changes`: the warnings about the folder, off for a
    second read). `skips`: where the files another folder's scan skipped are listed.

    `data` is the run's data folder when it is the recorded one, or when it holds the run's train and `split`
    images at their recorded paths and sizes (`holds_recorded`: the folder moved, or a copy of it, even while the
    recorded folder is still there): the run's recorded split is read from it, never all its images, training
    images included. Any other folder is read by `labelled_images`."""
    run, doc, own, reads_record = split_source(source, cfg, data, split)
    if reads_record:
        changed = changed_splits(recorded_fingerprints(doc), recorded)
        if changed:
            raise DataError(f"the {'/'.join(changed)} split(s) recorded in {run.splits} are not those {source} was "
                            f"trained on (the checkpoint's split fingerprints differ: it comes from another run), so "
                            f"the {split} split may hold images the model trained on; evaluate the checkpoint in its "
                            f"own run folder, or give another folder with --data")
        images = load_recorded(doc, data or cfg.data, log_changes, advice, needed or (split,)).get(split)
        where = "" if own else f"; read under {data}, which holds the run's files (its data folder, moved or copied)"
        return images, f"the run's recorded {split} split ({len(images)} images, {run.splits}){where}"
    if own:           # a checkpoint away from its run folder: the split is made again the way the run made it
        splits = config_splits(cfg)
        changed = changed_splits(fingerprints(splits), recorded)
        if changed:
            raise DataError(f"the {'/'.join(changed)} split(s) of {cfg.data} made again from the run's settings are "
                            f"not those the run used (images were added, removed or renamed since), so its {split} "
                            f"split may hold images the model trained on; evaluate the run folder (its splits.json), "
                            f"or give another folder with --data")
        return splits.get(split), (f"the {split} split of {cfg.data} made again from the run's settings (no "
                                   f"splits.json beside the checkpoint): {len(splits.get(split))} images")
    samples, used = labelled_images(data, split, classes, cfg.follow_links, skips)
    _warn_trained_on(samples, doc)
    return samples, used


def _warn_trained_on(samples: Sequence, doc: Optional[dict]) -> None:
    """One warning when images of another folder are byte-identical to the run's train or val images (its
    recorded splits, where its data folder still is): their score is not that of new images (data/leakage.py's
    check, which train runs on its own splits)."""
    if doc is None or not Path(doc["root"]).is_dir():
        return
    seen = [(str(Path(doc["root"]) / rel), y) for s in ("train", "val") for rel, y, *_ in doc["splits"][s]]
    copies = duplicates_of(seen, samples)
    if copies:
        log.warning(f"{len(copies)} of the {len(samples)} images evaluated are byte-identical to images the run "
                    f"trained on or chose its best epoch on (e.g. {copies[0][0]} = {copies[0][1]}): their score says "
                    f"nothing of new images")


def _run_record(source: Path) -> tuple[RunDir, Optional[dict]]:
    """The run folder of a run or checkpoint `source`, and its splits.json (None when it has none)."""
    run = RunDir(source if source.is_dir() else source.parent.parent)
    return run, run.read_json(run.splits) if run.splits.is_file() else None


class SplitSource(NamedTuple):
    """`_eval_samples`' decision. `own`: `data` names the data folder the run recorded (or none is given);
    `reads_record`: the run's recorded split is read (from that folder, or from `data` when it holds the run's train and
    split images: `holds_recorded`); neither: `data` is another folder, read as it is (`labelled_images`)."""

    run: RunDir
    doc: Optional[dict]              # the run's splits.json, None when it has none
    own: bool
    reads_record: bool


def split_source(source: Path, cfg, data: Optional[str | Path], split: str) -> SplitSource:
    run, doc = _run_record(source)
    own = data is None or Path(data).expanduser().resolve() == Path(cfg.data).resolve()
    return SplitSource(run, doc, own, doc is not None and (own or holds_recorded(doc, data, split)))


