"""`Predictor`: a trained model as a Python object that classifies images in memory.

    from spinal_transfer import Predictor

    p = Predictor("bundles/pets")                  # a bundle folder, a run folder or a bundle's .onnx file
    p.predict(["cat.jpg", pil_image, rgb_array, jpeg_bytes])   # per image: [(class, probability), ...]

It opens the model once (predict.open_model: the same runners, `auto` included) and preprocesses every
input with predict.preprocess_input, the one function `spinal-transfer predict` uses too: for the same
files, the same runner and TTA it gives the same classes and probabilities as `predict`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..config import CONFIG_FIELDS
from ..data.images import BadImage
from ..errors import ConfigError, DataError, flag_name, option_name, option_value
from ..evaluation.calibration import temperature_of
from ..evaluation.evaluate import TTA, tta_probs
from ..utils.runtime import configure_process, pick_device
from .export import eval_transform
from .predict import TOPK, ImageInput, open_model, preprocess_input, top_classes

PathLike = Union[str, os.PathLike]
log = logging.getLogger("spinal_transfer")


def _is_single(images: Any) -> bool:
    """One image, not a sequence of them (something not iterable, an int or None, is one too: decode_input
    then says what it takes)."""
    from PIL import Image

    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)) or \
        not isinstance(images, Iterable)


def _whole(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


class Predictor:
    """Classify images with a bundle folder, a run folder (its best checkpoint) or a bundle's .onnx file.

    device: auto, cpu, cuda or mps. runner: auto, torch, onnx, onnx-int8 (as `predict --runner`; `auto` runs a
    bundle on the CPU with its int8 ONNX file, else its ONNX file, else PyTorch). tta: average the softmax over
    the image and its mirror; tta_crops=5 adds the four corner crops and the centre crop (each mirrored).
    batch_size: images per model call (default: training's). calibrated: probabilities are softmax(logits / T)
    with the model's temperature (`temperature`; 1 for a model without one); False: the plain softmax.
    verify: check a bundle's file against the digest in its config.json first (False, as `predict --no-verify`:
    for bundles edited on purpose)."""

    def __init__(self, source: PathLike, device: str = "auto", runner: str = "auto", tta: bool = False,
                 tta_crops: int = 0, batch_size: Optional[int] = None, calibrated: bool = True, verify: bool = True):
        if tta_crops and not tta:
            raise ConfigError(f"{option_name('tta_crops').strip()} needs {flag_name('tta')}", key="tta_crops")
        asked = TTA(flip=True, crops=tta_crops) if tta else None     # a bad --tta-crops refused before loading
        self.batch_size = CONFIG_FIELDS["batch_size"].default if batch_size is None else batch_size
        if not _whole(self.batch_size):
            raise ConfigError(f"{option_value('batch_size', self.batch_size)} is out of range: it must be a whole "
                              f"number >= 1", key="batch_size")
        self.device = pick_device(device)
        configure_process(self.device)
        self.source = str(source)
        self.config, self._run, self.runner = open_model(source, self.device, runner, verify)
        self.tta: Optional[TTA] = asked.as_trained(self.config.get("train_hflip")) if asked else None
        self.classes: list[str] = list(self.config["classes"])
        self.temperature = temperature_of(self.config) if calibrated else 1.0
        self.transform = eval_transform(self.config)
        self.skipped: list[tuple[str, str]] = []    # (path, reason) of the last call's skipped files

    def __repr__(self) -> str:
        return (f"Predictor({self.source!r}, runner={self.runner!r}, device={str(self.device)!r}, "
                f"{len(self.classes)} classes{', TTA' if self.tta else ''})")

    def batch_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(len(x), len(classes)) softmax(logits / temperature), float64, of a batch of preprocessed inputs
        (predict.preprocess_input): the one place a Predictor turns model outputs into probabilities, TTA included,
        as `predict` does; `serve` runs its dynamic batches through here too, so both answer alike."""
        return tta_probs(self._run, x, self.tta, torch.float64, self.temperature)

    def probabilities(self, images: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """(len(images), len(classes)) softmax(logits / temperature), float64, in input order; one image may be
        given alone."""
        items = [images] if _is_single(images) else list(images)
        return self._probabilities(items, "raise")[0]

    def _probabilities(self, items: list, on_error: str) -> tuple[torch.Tensor, list[int]]:
        """(softmax of the readable items, their indices); with on_error "skip" an unreadable file is recorded
        in `self.skipped` (path, reason) and left out, else it raises DataError."""
        out, kept = [], []
        self.skipped = []
        for i in range(0, len(items), self.batch_size):
            xs = []
            for j, item in enumerate(items[i:i + self.batch_size], start=i):
                try:
                    xs.append(preprocess_input(item, self.transform))
                except BadImage as e:
                    if on_error != "skip":
                        what = "image bytes" if isinstance(item, (bytes, bytearray, memoryview)) else item
                        raise DataError(f"{what}: {e}") from None
                    self.skipped.append((str(item), str(e)))
                    log.warning(f"skipped {item}: {e}")
                    continue
                kept.append(j)
            if xs:
                out.append(self.batch_probabilities(torch.stack(xs)))
        return (torch.cat(out) if out else torch.zeros(0, len(self.classes), dtype=torch.float64)), kept

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], topk: int = TOPK,
                on_error: str = "raise") -> list[Optional[list[tuple[str, float]]]]:
        """Per image (paths, bytes of image files, PIL images or HxWx3 uint8 RGB arrays; one may be given alone), its `topk` most
        probable (class, probability), most probable first. An unreadable file raises DataError; with
        on_error="skip" it is skipped as `spinal-transfer predict` skips it: None in its place, (path, reason)
        in `self.skipped` and a warning in the log."""
        if not _whole(topk):
            raise ConfigError(f"{option_value('topk', topk)} is out of range: it must be a whole number >= 1",
                              key="topk")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"{option_name('on_error')}must be raise or skip, got {on_error!r}", key="on_error")
        items = [images] if _is_single(images) else list(images)
        probs, kept = self._probabilities(items, on_error)
        out: list[Optional[list[tuple[str, float]]]] = [None] * len(items)
        for j, top in zip(kept, top_classes(probs, self.classes, topk)):
            out[j] = top
        return out
