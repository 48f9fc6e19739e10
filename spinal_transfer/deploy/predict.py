"""`spinal-transfer predict`: top-k classes of image files and folders, from a bundle, its ONNX file or a run.

Inputs get the evaluation preprocessing stored with the model (export.eval_transform, which is
build_transforms(train=False)), so a prediction here is what evaluation would have computed. Decoding and
preprocessing are one function, `preprocess_input`, which `predict` (in DataLoader workers) and
`Predictor` (in process) both call: the same file gives the same tensor either way. A file that cannot be
decoded is skipped, not fatal: it is reported on stderr and in `<out>.skipped.txt` (tab-separated path and
reason, like a run's skipped_files.txt; always written, empty when nothing was skipped, so an old list
never outlives its CSV).

Probabilities are softmax(logits / T) with the temperature T stored with the model (calibration.py; fitted on
the run's val split at the end of training; T = 1 for a model without one); `calibrated=False`
(`--no-calibration`) gives the plain softmax. With `min_confidence` (`--min-confidence P`) the CSV gets a
`prediction` column: the top class, or `uncertain` where the top probability is below P.

Runners (`runner=`, `--runner`): `torch` (eager PyTorch), `onnx` (onnxruntime on the bundle's model.onnx),
`onnx-int8` (onnxruntime on the bundle's int8 model, `export --quantize int8`). `auto` takes, for a bundle
on the CPU, the int8 ONNX file when there is one, else the ONNX file, else torch; a run folder or
checkpoint is run by torch, an .onnx file by onnxruntime, and on a GPU a bundle is run by torch.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import CONFIG_FIELDS
from ..data.images import BadImage, decode_image, load_image, pil_to_rgb
from ..data.loaders import BadSample, ImageDataset, make_loader
from ..data.skiplog import SkipLog, skip_lines
from ..data.splits import list_images
from ..errors import CheckpointError, ConfigError, DataError, option_name
from ..evaluation.calibration import probabilities_note, temperature_of
from ..evaluation.evaluate import TTA, tta_probs
from ..models.restore import model_from_checkpoint
from ..runs.rundir import load_run_checkpoint
from ..utils.atomic import atomic_write_text
from ..utils.runtime import configure_process, pick_device, use_channels_last
from ..utils.stamp import csv_header
from .export import (
    CONFIG_FILE,
    FORMAT_FILES,
    INT8_FILE,
    WEIGHTS_FILE,
    Runner,
    bundle_config,
    eval_transform,
    load,
    onnx_runner,
    read_config,
    verify_bundle,
)

PathLike = Union[str, os.PathLike]
ImageInput = Any           # a path, the bytes of an image file, a PIL image or an HxWx3 uint8 RGB array
log = logging.getLogger("spinal_transfer")
TOPK = 5
RUNNERS = ("auto", "torch", "onnx", "onnx-int8")
UNCERTAIN = "uncertain"     # the prediction of an image whose top probability is below --min-confidence


@dataclass
class Predictions:
    paths: list[str]                    # the images that were read, in input order
    probs: torch.Tensor                 # (len(paths), num_classes) softmax, float64
    classes: list[str]
    skipped: list[tuple[str, str]]      # (path, reason) of files that could not be read
    tta: Optional[dict] = None          # the test-time augmentation used (TTA.to_dict()), None without
    runner: str = "torch"               # what ran the model: torch, onnx or onnx-int8
    seconds: float = 0.0                # wall time of decoding, preprocessing and running every image
    temperature: float = 1.0            # probs = softmax(logits / temperature); 1: plain softmax
    probabilities: str = ""             # how they were made, in words (calibration.probabilities_note)

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the k most probable (class, probability), most probable first."""
        return top_classes(self.probs, self.classes, k)

    @property
    def images_per_second(self) -> float:
        return len(self.paths) / self.seconds if self.seconds > 0 else 0.0

    def uncertain(self, min_confidence: float) -> torch.Tensor:
        """(len(paths),) bool: the images whose top probability is below `min_confidence`."""
        return self.probs.max(dim=1).values < min_confidence if len(self.paths) else torch.zeros(0, dtype=torch.bool)


def top_classes(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row of `probs`, the k most probable (class, probability), most probable first."""
    values, index = probs.topk(min(k, len(classes)), dim=1)
    return [[(classes[i], p) for i, p in zip(row_i, row_v)] for row_i, row_v in zip(index.tolist(), values.tolist())]


# --- decoding and preprocessing: the one path every input takes -----------------------------------

def decode_input(item: ImageInput, min_size: Optional[int] = None) -> np.ndarray:
    """HxWx3 uint8 RGB of a file path (images.load_image, as training decodes), the bytes of an image file
    (images.decode_image: the same pixels as that file from its path), a PIL image (images.pil_to_rgb: one
    fresh from `Image.open` as its file; else its EXIF orientation, alpha on white, at the resolution it has,
    which for a large JPEG differs a little from the reduced-scale decode of its file) or an HxWx3 uint8 RGB
    array (used as is).
    BadImage when a file cannot be decoded; DataError for anything else."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, min_size)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(bytes(item), min_size)
    from PIL import Image

    if isinstance(item, Image.Image):
        return pil_to_rgb(item, min_size)
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8 or 0 in item.shape:
            raise DataError(f"an image array must be HxWx3 uint8 RGB with H, W >= 1; got shape {item.shape}, dtype "
                            f"{item.dtype}")
        return np.ascontiguousarray(item)
    raise DataError(f"cannot read an image from a {type(item).__name__}: give a path, the bytes of an image file, "
                    f"a PIL image or an HxWx3 uint8 array")


def preprocess_input(item: ImageInput, transform: Any) -> torch.Tensor:
    """The normalized CHW tensor the model sees for one input: decode_input, then the evaluation transform.
    `predict` and `Predictor` both preprocess through here."""
    return transform(image=decode_input(item, getattr(transform, "decode_min_size", None)))["image"]


class InputDataset(ImageDataset):
    """ImageDataset whose items go through preprocess_input (no augmentation seeds: evaluation only)."""

    def __getitem__(self, key: Any):
        i = key[0] if isinstance(key, tuple) else key
        item, label = self.samples[i]
        try:
            return preprocess_input(item, self.transform), label, i
        except BadImage as e:
            return BadSample(str(item), str(e), i)


# --- models and runners ---------------------------------------------------------------------------

def _has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_runner(source: PathLike, runner: str = "auto", device: Optional[torch.device] = None) -> tuple[str, Path]:
    """(runner, path) that runs `source`: ("torch", bundle folder / safetensors / run / checkpoint) or
    ("onnx" | "onnx-int8", the .onnx file). See the module docstring for what `auto` chooses."""
    if runner not in RUNNERS:
        raise ConfigError(f"{option_name('runner')}must be one of {', '.join(RUNNERS)}; got {runner!r}", key="runner")
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such bundle, ONNX file, run folder or checkpoint")
    if path.suffix == ".onnx":                # a file named is the one run, unless --runner names another kind
        kind = "onnx-int8" if path.name == INT8_FILE else "onnx"
        if runner in ("auto", kind):
            return kind, path
        path = path.parent                   # another runner of the same bundle
    if path.suffix == ".safetensors" and runner == "auto":
        return "torch", path                 # the weights file named: PyTorch runs it, not the folder's ONNX
    bundle = (path / CONFIG_FILE).is_file() or path.suffix == ".safetensors"
    if not bundle and path.is_dir() and (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} has {WEIGHTS_FILE} but no {CONFIG_FILE}, which names its backbone, classes and "
                              f"preprocessing: copy the whole bundle, or re-export it")
    if not bundle:
        if runner in ("auto", "torch"):
            return "torch", path
        raise ConfigError(f"{option_name('runner')}{runner} needs a bundle with its ONNX files; {path} is a run "
                          f"folder or checkpoint: export it first (spinal-transfer export RUN --out DIR --format onnx "
                          f"--quantize int8)", key="runner")
    folder = path if path.is_dir() else path.parent
    files = {"onnx": folder / FORMAT_FILES["onnx"], "onnx-int8": folder / INT8_FILE}
    if runner == "auto":
        listed = (read_config(folder).get("files") or {}) if (folder / CONFIG_FILE).is_file() else {}
        gone = [f.name for f in files.values() if f.name in listed and not f.is_file()]
        if gone:              # removed since export: said, as auto would otherwise quietly run another model file
            log.warning(f"{', '.join(gone)} of {folder} {'is' if len(gone) == 1 else 'are'} missing though "
                        f"{CONFIG_FILE} lists {'it' if len(gone) == 1 else 'them'} (removed since export); --runner "
                        f"auto runs what is there")
        if (device is None or device.type == "cpu") and _has_onnxruntime():
            for kind in ("onnx-int8", "onnx"):
                if files[kind].is_file():
                    return kind, files[kind]
        return "torch", path
    if runner == "torch":
        return "torch", path
    if not files[runner].is_file():
        how = "--format onnx --quantize int8" if runner == "onnx-int8" else "--format onnx"
        raise ConfigError(f"{folder} has no {files[runner].name} for {option_name('runner')}{runner}: export it "
                          f"with `spinal-transfer export RUN --out {folder} {how}`", key="runner")
    return runner, files[runner]


def open_model(source: PathLike, device: torch.device, runner: str = "auto",
               verify: bool = True) -> tuple[dict, Runner, str]:
    """(bundle config, batch -> logits, runner used) of a bundle folder (or its model.safetensors), an .onnx
    file next to its config.json, a RUN folder (its best.pt) or a checkpoint file; `runner` as in
    resolve_runner. `verify`: a bundle's file is checked against the digest in its config.json first."""
    kind, path = resolve_runner(source, runner, device)
    if kind != "torch":
        config = read_config(path)
        if verify:
            verify_bundle(path.parent, config, path.name)
        return config, _checked(onnx_runner(path, device.type), config, path), kind
    if (path / CONFIG_FILE).is_file() or path.suffix == ".safetensors":
        config, model = read_config(path), load(path, verify)
    else:
        ckpt = load_run_checkpoint(path)          # weights_only: a crafted pickle is refused here
        config, model = bundle_config(ckpt), model_from_checkpoint(ckpt)[0]
    model.to(device)
    memory_format = torch.channels_last if use_channels_last(None, device) else torch.contiguous_format
    model.to(memory_format=memory_format)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, non_blocking=True).contiguous(memory_format=memory_format)).float().cpu()

    return config, _checked(run, config, path), kind


def _checked(run: Runner, config: dict, path: Path) -> Runner:
    """`run` once it gave one finite score per class of config.json on a blank image: a config.json of another
    model (used with --no-verify) would otherwise fail mid-way with a traceback, or name the wrong classes; a
    model file that loads but does not compute (NaN weights) would write NaN probabilities. predict, Predictor
    and serve (before it is ready) all open a model here."""
    size, n = config["input"]["img_size"], len(config["classes"])
    try:
        logits = torch.as_tensor(run(torch.zeros(1, 3, size, size)))
    except Exception as e:       # the runtimes raise their own types (onnxruntime's Fail, torch's RuntimeError)
        raise CheckpointError(f"{path} does not run on {CONFIG_FILE}'s {size} px input ({str(e).splitlines()[0]}); "
                              f"re-export the bundle") from None
    if logits.shape[-1] != n:
        raise CheckpointError(f"{path} gives {logits.shape[-1]} scores an image but {CONFIG_FILE} lists {n} classes; "
                              f"re-export the bundle")
    if not bool(torch.isfinite(logits.float()).all()):
        raise CheckpointError(f"{path} gives non-finite scores (NaN or inf) on a blank image: its weights are broken; "
                              f"re-export the bundle from a good checkpoint")
    return run


def predict(source: PathLike, paths: Sequence[PathLike], batch_size: Optional[int] = None,
            workers: Optional[int] = None, device: str = "auto", tta: Optional[TTA] = None,
            runner: str = "auto", calibrated: bool = True, verify: bool = True,
            min_confidence: Optional[float] = None) -> Predictions:
    """Class probabilities of every image in `paths` (files, or folders searched recursively);
    batch size and workers default to training's. With `tta`, the mean softmax over its views of each
    preprocessed image (evaluation.TTA; works with every runner). `runner`: auto, torch, onnx, onnx-int8.
    `calibrated`: softmax(logits / T) with the model's temperature (else T = 1). `verify`: check a bundle's file
    against its recorded digest before use (False: for bundles edited on purpose). `min_confidence`: the gate
    write_csv will apply, checked against the class names before any image is read (a class named `uncertain`
    could not be told from its marker)."""
    from torch.utils.data import SequentialSampler

    files = list_images(list(paths))
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    dev = pick_device(device)
    configure_process(dev)
    config, run, kind = open_model(source, dev, runner, verify)
    if min_confidence is not None and UNCERTAIN in config["classes"]:
        raise ConfigError(f"the model has a class named {UNCERTAIN!r}, the word written for an image below the "
                          f"minimum confidence: the two could not be told apart; leave the minimum out and filter "
                          f"on prob_1", key="min_confidence")
    temperature = temperature_of(config) if calibrated else 1.0
    tta = tta.as_trained(config.get("train_hflip")) if tta is not None else None
    start = time.perf_counter()
    loader = make_loader([(f, -1) for f in files], eval_transform(config),
                         batch_size or CONFIG_FIELDS["batch_size"].default, workers, dev,
                         SequentialSampler(range(len(files))), dataset_class=InputDataset)
    probs, index, skips = [], [], SkipLog()
    with tqdm(total=len(files), desc="predict", unit="img") as bar:
        for x, _, idx in skips.watch(loader):
            if len(x):
                probs.append(tta_probs(run, x, tta, torch.float64, temperature))
                index.append(idx)
            bar.n = len(skips) + sum(len(i) for i in index)
            bar.refresh()
    seconds = time.perf_counter() - start
    order = torch.cat(index).tolist() if index else []
    num_classes = len(config["classes"])
    return Predictions([files[i] for i in order], torch.cat(probs) if probs else torch.zeros(0, num_classes),
                       config["classes"], list(skips.entries.items()), tta.to_dict() if tta is not None else None,
                       kind, seconds, temperature, probabilities_note(config, calibrated))


def write_csv(preds: Predictions, out: PathLike, topk: int = TOPK, min_confidence: Optional[float] = None) -> Path:
    """`out`: path, label_1, prob_1, ..., label_k, prob_k per image (with `min_confidence`, a `prediction`
    column after path: label_1, or `uncertain` where prob_1 is below it); `<out>.skipped.txt`: the skipped
    files. Returns the skip list's path."""
    k = min(topk, len(preds.classes))
    buf = io.StringIO()
    writer = csv.writer(buf)
    gate = min_confidence is not None
    writer.writerow(csv_header(k, gate))
    unsure = preds.uncertain(min_confidence).tolist() if gate else [False] * len(preds.paths)
    for path, top, no in zip(preds.paths, preds.top(k), unsure):
        writer.writerow([path] + ([UNCERTAIN if no else top[0][0]] if gate else []) +
                        [v for label, p in top for v in (label, f"{p:.6f}")])
    atomic_write_text(out, buf.getvalue())
    skipped_path = Path(f"{out}.skipped.txt")
    atomic_write_text(skipped_path, skip_lines(preds.skipped))
    return skipped_path
