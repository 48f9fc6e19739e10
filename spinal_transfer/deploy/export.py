"""`spinal-transfer export`: a trained model as a self-describing bundle, plus deployable formats.

A bundle is model.safetensors (weights only: reading it runs no code), config.json (all that is
needed to rebuild the architecture offline and to preprocess inputs exactly as evaluation did) and
README.md (a model card). Each extra format (torch.export, TorchScript, ONNX) is written to a staging
folder, read back from its file and compared with the eager model on the same inputs; only a file
that passed is moved into the bundle, so what is in the bundle is what was checked.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import __version__
from ..config import TrainConfig
from ..data.images import _pil_to_rgb
from ..data.loaders import make_loader
from ..data.skiplog import SkipLog
from ..data.splits import SPLIT_NAMES, fit_and_held_out
from ..data.transforms import DataConfig, build_transforms
from ..errors import CheckpointError, DataError, MissingDependency, UserError, few, first_line, option_name
from ..evaluation.evaluate import _eval_samples, split_source
from ..evaluation.report_page import schedule_words
from ..models.restore import model_from_checkpoint, recorded_transform_input, set_transform_input
from ..models.surgery import build_model, get_head
from ..runs.rundir import RunDir, load_run_checkpoint
from ..utils.atomic import atomic_write_text, file_sha256, system_error
from .quantize import CALIBRATION_IMAGES, GUARD_ADVICE, QuantizationError, quantize_and_check

log = logging.getLogger("spinal_transfer")
PathLike = Union[str, os.PathLike]
Runner = Callable[[torch.Tensor], torch.Tensor]

WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
FORMAT_FILES = {"export": "model.pt2", "torchscript": "model.torchscript", "onnx": "model.onnx"}
INT8_FILE = "model.int8.onnx"   # --quantize int8: onnxruntime static int8 of model.onnx (config["formats"]["onnx-int8"])
STANDALONE = Path(__file__).with_name("predict_onnx.py")   # copied beside model.onnx: predicts without this package
QUANTIZE = ("int8",)
MAX_ACCURACY_DROP = 1.0         # top-1 points int8 may lose against fp32 ONNX before the export is refused
# --quantize int8 --data OTHER without train/ and val/ (or test/) folders: this share of its images, stratified by
# class with this seed, is held out for the accuracy guard; up to CALIBRATION_IMAGES of the rest calibrate
GUARD_FRACTION, GUARD_SEED = 0.5, 0
# --quantize int8 of a run whose recorded files are gone: what works instead (`_int8_images` reads another folder)
GONE_ADVICE = ("calibrate and check int8 on another labelled folder with --data: one that does not hold most of "
               "the run's files is read as it is, its train/ and val/ (or test/), or its images split in two "
               "(export --help)")
# what makes a coarse accuracy guard (too few images for its bound) finer when it scored half of another --data
# folder (`quantize.coarse_guard_warning`; quantize.GUARD_ADVICE when it scored the run's val or test split)
OTHER_GUARD_ADVICE = "give a bigger --data folder (or one with train/ and val/ folders)"
ATOL = 1e-4                 # max abs logit difference an exported format may have from the eager model
TRACE_BATCH = 2             # example batch for tracing/exporting ...
CHECK_BATCHES = (1, 3)      # ... and the batches compared: other sizes, so a baked-in batch size fails
ONNX_EXTRA = 'pip install -e ".[onnx]"  (or pip install onnx onnxruntime onnxscript)'


class ExportError(UserError):
    """A format could not be written, or its outputs differ from the eager model's."""


# --- bundle: config, weights, loading ------------------------------------------------------------

def bundle_config(ckpt: dict) -> dict:
    """config.json of a training checkpoint: what rebuilds the model and its eval preprocessing."""
    info = ckpt["head_info"]
    return {
        "spinal_transfer_version": __version__,
        "backbone": info["backbone"],
        "head": {"kind": info["head"], "replace": info["replace"], "options": dict(info["head_options"])},
        "classes": list(ckpt["classes"]),            # index i is logit i
        "input": dict(ckpt["data_config"]),
        "epoch": ckpt.get("epoch") or ckpt.get("progress", {}).get("epoch"),     # 1-based
        # probabilities are softmax(logits / temperature) (evaluation/calibration.py); null: not calibrated (T = 1)
        "temperature": ckpt.get("temperature"),
        # why a finished run fitted none (calibration.unfittable), said by predict/serve; null: none recorded
        "calibration_note": ckpt.get("calibration_note"),
        # 0: trained with --hflip 0, so TTA shows no mirror view (TTA.as_trained); null: the policy's flips
        "train_hflip": ckpt["config"].get("hflip"),
        # torchvision GoogLeNet/Inception v3's input remap as trained (restore.recorded_transform_input); null: none
        "transform_input": recorded_transform_input(info),
    }


CONFIG_KEYS = ("backbone", "head", "classes", "input")     # what rebuilds the model and its preprocessing


def read_config(bundle: PathLike) -> dict:
    """config.json of a bundle folder (or of the folder holding a bundle file such as model.onnx); one line, not a
    traceback, for one that is not JSON or lacks what rebuilds the model."""
    folder = Path(bundle)
    folder = folder.parent if folder.is_file() else folder
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a spinal-transfer bundle: no {CONFIG_FILE} there "
                                f"(make one with `spinal-transfer export RUN --out DIR`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))   # an editor may have saved it with a BOM
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
    missing = [k for k in CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not the config.json export wrote; re-export the "
                              f"bundle")
    problem = _config_problem(config)
    if problem:                      # checked with --no-verify too: a wrong type would fail mid-way or mislabel
        raise CheckpointError(f"{path}: {problem}; re-export the bundle")
    return config


def _config_problem(config: dict) -> Optional[str]:
    """What makes config.json unusable whatever its digest says, or None: classes that are not distinct names, a
    temperature that is not a positive number, an input size that is not a whole number of pixels."""
    classes, t = config["classes"], config.get("temperature")
    size = config["input"].get("img_size") if isinstance(config["input"], dict) else None
    names = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    if not names or len(set(classes)) < len(classes):
        return "classes must be a list of distinct class names"
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
        return f"temperature must be a positive number or null, not {t!r}"
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"input.img_size must be a whole number of pixels, not {size!r}"
    return None


CONFIG_DIGEST_SINCE = (0, 3)      # bundles of this version on record config_sha256: one without it was edited


def _version(config: dict) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(config.get("spinal_transfer_version", "0")))[:3])


def config_sha256(config: dict) -> str:
    """The digest of config.json's content (its keys sorted, the digest itself left out) that export records in
    it: the file digests cover the model files, this covers the classes, preprocessing and temperature."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build_from_config(config: dict) -> nn.Module:
    """The bundle's architecture with random weights; weights=None, so nothing is downloaded."""
    head = config["head"]
    model = build_model(config["backbone"], len(config["classes"]), head=head["kind"], weights=None,
                        replace=head["replace"], img_size=config["input"]["img_size"], **head["options"])
    set_transform_input(model, config.get("transform_input", False))   # a bundle before the key: exported off
    return model


def verify_bundle(folder: Path, config: dict, used: str) -> None:
    """Refuse, in one line naming the file, config.json or a bundle file `used` (and its companions, e.g.
    model.onnx.data) that differs from the sha256 export recorded: an edited or corrupted file would change
    labels or predictions without a word (reversed classes name every prediction wrong). A bundle of an earlier
    version without the config's digest has its files checked only; one without digests at all, nothing."""
    if "config_sha256" in config or _version(config) >= CONFIG_DIGEST_SINCE:
        if config.get("config_sha256") != config_sha256(config):
            why = ("its content does not match the sha256 recorded in it" if "config_sha256" in config else
                   "the sha256 of its content that export records was removed")
            raise CheckpointError(f"{folder / CONFIG_FILE} was changed since export ({why}), so its classes, "
                                  f"preprocessing or temperature may no longer fit the model; re-export the bundle, "
                                  f"or pass --no-verify to use it as it is")
    for name, want in (config.get("files") or {}).items():
        if name != used and not name.startswith(used + "."):
            continue
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {CONFIG_FILE} lists it; re-export the bundle")
        if file_sha256(path) != want:
            raise CheckpointError(f"{path} does not match the sha256 recorded in {CONFIG_FILE} (edited or corrupted "
                                  f"since export); re-export the bundle, or pass --no-verify to use it as it is")


def load(bundle: PathLike, verify: bool = True) -> nn.Module:
    """A bundle folder -> its model in eval mode, rebuilt offline; weights come from safetensors,
    so loading runs no code from the bundle. `verify`: check model.safetensors against config.json's digest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(bundle)
    folder = folder.parent if folder.is_file() else folder
    config = read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    if verify:
        verify_bundle(folder, config, WEIGHTS_FILE)
    model = build_from_config(config)
    try:
        load_model(model, str(folder / WEIGHTS_FILE))
    except SafetensorError as e:    # a file cut short, or not safetensors (with --no-verify)
        raise CheckpointError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file ({e}); re-export the "
                              f"bundle") from None
    except RuntimeError as e:    # e.g. another class count: the config.json of another model (with --no-verify)
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit the model {CONFIG_FILE} describes ("
                              f"{len(config['classes'])} classes, {config['backbone']}): "
                              f"{' '.join(str(e).split())[:300]}; re-export the bundle") from None
    return model.eval()


class EvalTransform:
    """The evaluation preprocessing of a bundle: `transform(image)` with a PIL image or an HxWx3 uint8 RGB array
    gives the normalized CHW tensor the model takes; `transform(image=array)` is the albumentations call (a dict
    with the tensor under "image"), which the data loaders make."""

    def __init__(self, pipeline: Callable[..., dict]):
        self.pipeline = pipeline
        self.decode_min_size = getattr(pipeline, "decode_min_size", None)

    def __call__(self, img: Any = None, /, **targets: Any) -> Any:
        if img is None:
            return self.pipeline(**targets)
        if isinstance(img, Image.Image):
            img = _pil_to_rgb(img)          # EXIF orientation, alpha on white: as a file of it would be read
        if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
            what = f"shape {img.shape}, dtype {img.dtype}" if isinstance(img, np.ndarray) else type(img).__name__
            raise DataError(f"eval_transform takes a PIL image or an HxWx3 uint8 RGB array; got {what}")
        return self.pipeline(image=np.ascontiguousarray(img))["image"]


def eval_transform(config: dict) -> EvalTransform:
    """The evaluation preprocessing of a bundle config: build_transforms(train=False), as in training."""
    return EvalTransform(build_transforms(DataConfig(**config["input"]), train=False))


# --- formats: write, read back, compare ----------------------------------------------------------

_BATCH = torch.export.Dim("batch", min=1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TorchScript and the TorchScript-based ONNX exporter are deprecated upstream; we use them on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _write_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: _BATCH},)), path)


def _write_script(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():
        torch.jit.script(model).save(str(path))


def _write_trace(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():
        torch.jit.trace(model, example).save(str(path))


def _write_onnx_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) >= 2**31   # protobuf's limit
    torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=({0: _BATCH},),
                      input_names=["input"], output_names=["logits"], external_data=big, verbose=False)


def _write_onnx_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def onnx_runner(path: PathLike, device: str = "cpu") -> Runner:
    """An onnxruntime session as a (batch -> logits) function; CUDA when asked for and available."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependency(f"running {path} needs onnxruntime, from the optional extra `onnx`: "
                                f"{ONNX_EXTRA}") from None
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:      # onnxruntime's own types (InvalidProtobuf, Fail): a file cut short or not ONNX
        raise CheckpointError(f"{path} is not a loadable ONNX model ({' '.join(str(e).split())[:200]}); re-export "
                              f"the bundle") from None
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])


def _read_program(path: Path) -> Runner:
    return torch.export.load(path).module()


def _read_torchscript(path: Path) -> Runner:
    with _quiet():
        return torch.jit.load(str(path), map_location="cpu")


# Per format: the ways to write it, in order of preference (the next is tried when one raises or
# fails the check), and how to read it back.
WAYS = {
    "export": [("torch.export", _write_program)],
    "torchscript": [("script", _write_script), ("trace", _write_trace)],
    "onnx": [("dynamo", _write_onnx_dynamo), ("torchscript-based", _write_onnx_legacy)],
}
READERS: dict[str, Callable[[Path], Runner]] = {
    "export": _read_program, "torchscript": _read_torchscript, "onnx": onnx_runner}


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"--format onnx needs onnx, onnxruntime and onnxscript ({e}); they are the "
                                f"optional extra `onnx`: {ONNX_EXTRA}") from None


@torch.no_grad()
def max_abs_diff(run: Runner, inputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    return max(float((run(x).float() - e).abs().max()) for x, e in zip(inputs, expected))


def static_same_padding(model: nn.Module, size: int) -> nn.Module:
    """A copy of `model` whose TF-style 'SAME' convolutions (timm's Conv2dSame in the `tf_*` models) pad by fixed
    amounts for a `size` x `size` input. Computed from the input shape at run time, their padding exports as a
    Shape/Gather/Sub/Ceil/.../Pad chain in front of every strided convolution, which stays fp32 between
    quantize/dequantize pairs in int8 (95 float ops in EfficientNet-Lite0); fixed, the graph is plain Conv. The
    outputs are the same; other models are returned as they are (copied)."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model).eval()
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, tuple(a[0].shape[-2:])))
             for n, m in model.named_modules() if isinstance(m, Conv2dSame)]
    if hooks:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for name, hw in seen.items():
        old = model.get_submodule(name)
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation,
                         old.groups, old.bias is not None)
        conv.load_state_dict(old.state_dict())
        parent, _, leaf = name.rpartition(".")
        pad = nn.ZeroPad2d(pad_same_arg(hw, old.kernel_size, old.stride, old.dilation))
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Sequential(pad, conv))
    return model


def _export_format(fmt: str, model: nn.Module, example: torch.Tensor, inputs: list, expected: list,
                   stage: Path, atol: float) -> dict:
    """Write `fmt` into `stage`, read it back and compare; the first way that passes wins. ONNX is written
    with fixed 'SAME' padding (`static_same_padding`): the bundle's input size is fixed anyway."""
    path = stage / FORMAT_FILES[fmt]
    if fmt == "onnx":
        model = static_same_padding(model, example.shape[-1])
    failures = []
    for method, write in WAYS[fmt]:
        for f in stage.glob(path.name + "*"):          # a failed attempt's leftovers (model.onnx.data)
            f.unlink()
        try:
            write(model, example, path)
            diff = max_abs_diff(READERS[fmt](path), inputs, expected)
        except Exception as e:     # exporters fail in many ways; each is reported, the next way is tried
            failures.append(f"{method}: {type(e).__name__}: {first_line(e, None)}")
            continue
        if diff <= atol:
            return {"file": path.name, "method": method, "max_abs_diff": diff}
        failures.append(f"{method}: max abs logit difference {diff:.3g} > {atol:g}")
    raise ExportError(f"--format {fmt} failed for {model.spinal_info.backbone}; tried:\n  " + "\n  ".join(failures))


# --- the export ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back for the block and delivered after it: steps that must not stop half-way (moving
    a bundle into place, removing the scratch folder) finish first."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A scratch folder inside `out` (same file system, so moving a file out of it is atomic); `out` and the
    folders made for it are removed again when the export fails or is interrupted before publishing."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    stage: Optional[Path] = None
    try:
        with _uninterrupted():
            try:
                out.mkdir(parents=True, exist_ok=True)
                stage = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
            except OSError as e:              # read-only, no permission, a file where a folder should be
                raise system_error(e, Path(e.filename or out)) from None
        yield stage
    finally:
        with _uninterrupted():
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            for folder in made:           # innermost first; a published bundle is not empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def bundle_files_in(out: Path) -> list[Path]:
    """The files in `out` that an export writes (an earlier export's, or a user's file of the same name): what
    a re-export replaces, and what serve's digest covers (not a notes.txt a user keeps beside them)."""
    return sorted(f for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, *FORMAT_FILES.values(), INT8_FILE,
                                 STANDALONE.name) for f in out.glob(name + "*") if f.is_file())


def check_out(out: Path) -> list[Path]:
    """The earlier bundle's files that exporting to `out` replaces; ExportError, before any work, for an `out`
    that is a file, a run folder, a folder of other files and no bundle (the data folder), or a folder holding
    files of a bundle's names that no export wrote (a user's README.md or config.json): they are never
    replaced. Files a user added beside an earlier bundle stay."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; a bundle is a folder: give a new or empty folder")
    if RunDir(out).state() != "new":
        raise ExportError(f"--out {out} is a run folder; a bundle is a folder of its own: give a new or empty folder")
    earlier = bundle_files_in(out) if out.is_dir() else []
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if others and not earlier:          # the data folder, a folder of notes: a bundle would be mixed into it
        raise ExportError(f"--out {out} holds other files ({few(others, 5)}) "
                          f"and no earlier bundle; give a new or empty folder")
    if earlier:
        try:
            read_config(out)
        except CheckpointError:
            raise ExportError(f"--out {out} holds {', '.join(f.name for f in earlier)} that no export wrote (no "
                              f"spinal-transfer {CONFIG_FILE}); give a new or empty folder") from None
    return earlier


def _publish(stage: Path, out: Path) -> None:
    """Move the staged files into `out`, first removing an earlier export's files (no stale formats), with
    Ctrl-C held back until all are in place. Temp files are created owner-only; a bundle is meant to be shared,
    so it is made world-readable."""
    with _uninterrupted():
        for f in bundle_files_in(out):
            f.unlink()
        for f in sorted(stage.iterdir()):
            f.chmod(0o644)
            os.replace(f, out / f.name)


def _report(source: Path, ckpt: dict) -> Optional[dict]:
    """report.json of the run behind a RUN folder or a RUN/checkpoints/<file>, if there is one and `ckpt` is that
    run's (a checkpoint file from another run, put in its checkpoints folder, would get its metrics and
    temperature interval on the model card)."""
    run = RunDir(source if source.is_dir() else source.parent.parent)
    if not run.is_finished():
        return None
    try:
        run.check_own(ckpt, source, "")
    except CheckpointError as e:
        log.warning(f"{e}the model card leaves out {run.report}'s metrics")
        return None
    return run.read_report()


def export(source: PathLike, out: PathLike, formats: Sequence[str] = (), atol: float = ATOL,
           quantize: Optional[str] = None, max_accuracy_drop: float = MAX_ACCURACY_DROP, force: bool = False,
           batch_size: Optional[int] = None, workers: Optional[int] = 0, data: Optional[PathLike] = None) -> dict:
    """Write the bundle of `source` (a RUN dir, whose best.pt is used, or a checkpoint file) to `out`,
    plus each of `formats` ("export", "torchscript", "onnx"), each checked against the eager model.
    With `quantize="int8"` (implies "onnx"), also model.int8.onnx: quantize_int8, refused when int8 loses
    more than `max_accuracy_drop` top-1 points against fp32 ONNX (unless `force`), on the run's own images
    (`data`: its data folder's new place, if it moved).
    All or nothing: `out` changes only when every file passed, and then an earlier export's files
    there are replaced. Returns the bundle's config."""
    from safetensors.torch import save_model

    formats = list(dict.fromkeys([formats] if isinstance(formats, str) else formats))     # "onnx" is one format
    unknown = [f for f in formats if f not in FORMAT_FILES]
    if unknown:
        raise ExportError(f"unknown format(s) {unknown}; choose from {list(FORMAT_FILES)}")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ExportError(f"{option_name('quantize')}must be one of {list(QUANTIZE)}; got {quantize!r}")
        if "onnx" not in formats:
            formats.append("onnx")          # int8 is quantized from the checked fp32 ONNX file
    if "onnx" in formats:
        _require_onnx()
    source, out = Path(source), Path(out)
    check_out(out)
    ckpt = load_run_checkpoint(source)              # weights_only: a crafted pickle is refused here
    trained, *_ = model_from_checkpoint(ckpt)
    config = bundle_config(ckpt)
    size = config["input"]["img_size"]
    g = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, 3, size, size, generator=g)
    inputs = [torch.randn(b, 3, size, size, generator=g) for b in CHECK_BATCHES]
    with torch.no_grad():
        expected = [trained(x).float() for x in inputs]

    with _staging(out) as stage:
        save_model(trained, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_text(stage / CONFIG_FILE, json.dumps(config, indent=1))    # rewritten with the formats below
        model = load(stage, verify=False)           # export what a user of the bundle gets (no digests yet)
        diff = max_abs_diff(model, inputs, expected)
        if diff != 0:
            raise ExportError(f"the bundle reloaded from {WEIGHTS_FILE} differs from the checkpoint (max abs "
                              f"logit difference {diff:.3g})")
        config["formats"] = {}
        for fmt in formats:
            config["formats"][fmt] = _export_format(fmt, model, example, inputs, expected, stage, atol)
        if "onnx" in formats:
            shutil.copyfile(STANDALONE, stage / STANDALONE.name)
        if quantize == "int8":
            config["formats"]["onnx-int8"] = quantize_int8(source, ckpt, stage, max_accuracy_drop, force,
                                                           batch_size, workers, out, data)
        atomic_write_text(stage / CARD_FILE, model_card(config, model, ckpt["config"], _report(source, ckpt), source))
        config["files"] = {f.name: file_sha256(f) for f in sorted(stage.iterdir())
                           if f.is_file() and f.name != CONFIG_FILE}      # checked before use (verify_bundle)
        config["config_sha256"] = config_sha256(config)                   # and config.json itself
        atomic_write_text(stage / CONFIG_FILE, json.dumps(config, indent=1))
        _publish(stage, out)
    return config


# --- int8 ----------------------------------------------------------------------------------------

def _loader(samples: list, ckpt: dict, batch_size: int, workers: Optional[int],
            limit: Optional[int] = None) -> tuple[list, int]:
    """(labelled (inputs, labels) batches with the evaluation preprocessing, images read) of `samples`; at most
    `limit` images, drawn with a fixed seed (int8 calibration needs no more)."""
    import random

    from torch.utils.data import SequentialSampler

    if limit is not None and len(samples) > limit:
        samples = random.Random(0).sample(samples, limit)
    loader = make_loader(samples, eval_transform(bundle_config(ckpt)), batch_size, workers, torch.device("cpu"),
                         SequentialSampler(range(len(samples))))
    skips = SkipLog()
    return [(x, y) for x, y, _ in skips.watch(loader) if len(x)], len(samples) - len(skips)


def _split_loader(source: Path, ckpt: dict, split: str, batch_size: Optional[int], workers: Optional[int],
                  limit: Optional[int] = None, data: Optional[PathLike] = None, needed: Sequence[str] = SPLIT_NAMES,
                  log_changes: bool = True) -> tuple[list, int, str]:
    """`_loader` of the run's recorded `split` (as `evaluate` reads it; `data`: where the run's data folder is now,
    if it moved; `needed`: the recorded splits whose gone files are refused), and which images they are, in
    words."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    samples, words = _eval_samples(source, cfg, data, split, list(ckpt["classes"]), ckpt.get("split_fingerprints"),
                                   GONE_ADVICE, needed, log_changes)
    return (*_loader(samples, ckpt, batch_size or cfg.batch_size, workers, limit), words)


def _int8_needs(doc: Optional[dict]) -> tuple[str, ...]:
    """The recorded splits (of splits.json `doc`) int8 reads: train to calibrate, val for the guard, test when val
    has no image. A file gone from another split does not stop it."""
    val = doc is not None and bool(doc.get("splits", {}).get("val"))
    return ("train", "val") if val else ("train", "val", "test")


def _int8_images(source: Path, ckpt: dict, batch_size: Optional[int], workers: Optional[int],
                 data: Optional[PathLike]) -> tuple[tuple, tuple, str, str]:
    """((batches, images, words) to calibrate int8 on, (batches, images, words) its accuracy guard scores, the
    guard's split, what makes the guard finer), never an image in both. The run's data folder (recorded, moved or
    copied): up to CALIBRATION_IMAGES of its recorded train split, and its val split (test when val has no image).
    Another folder (`data` read as `evaluate --data` reads one that is not the run's): `_other_folder`."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    where = split_source(source, cfg, data, "val")
    if not where.own and not where.reads_record:      # as `evaluate --data` reads a folder not the run's
        return _other_folder(ckpt, cfg, batch_size, workers, Path(data))
    needed = _int8_needs(where.doc)
    calibration = _split_loader(source, ckpt, "train", batch_size, workers, CALIBRATION_IMAGES, data, needed)
    split = "val"
    evaluation = _split_loader(source, ckpt, split, batch_size, workers, data=data, needed=needed, log_changes=False)
    if not evaluation[1]:
        split = "test"
        evaluation = _split_loader(source, ckpt, split, batch_size, workers, data=data, needed=needed,
                                   log_changes=False)
    return calibration, evaluation, split, GUARD_ADVICE


def _other_folder(ckpt: dict, cfg: TrainConfig, batch_size: Optional[int], workers: Optional[int],
                  data: Path) -> tuple[tuple, tuple, str, str]:
    """`_int8_images` of a folder that is not the run's: `splits.fit_and_held_out`, its train/ and val/ (else
    test/) folders, or else its images split in two (stratified by class, GUARD_FRACTION held out for the guard,
    seed GUARD_SEED); up to CALIBRATION_IMAGES of the other part calibrate. DataError, saying what works, when
    none is left for the guard (one image of each class)."""
    parts = fit_and_held_out(data, list(ckpt["classes"]), GUARD_FRACTION, GUARD_SEED, cfg.follow_links)
    if not parts.held:
        raise DataError(f"--quantize int8 --data {data}: no image is left for the accuracy guard ({parts.fit_words}, "
                        f"none of a class with two or more); it needs at least 2 images of a class (one to calibrate, "
                        f"one for the guard), or train/ and val/ (or test/) folders")
    if parts.unheld:
        log.warning(f"the int8 accuracy guard scores no image of {len(parts.unheld)} class(es) of {data}: "
                    f"{few(parts.unheld)} (too few images to hold one out; they only calibrate)")
    batch = batch_size or cfg.batch_size
    return ((*_loader(parts.fit, ckpt, batch, workers, CALIBRATION_IMAGES), parts.fit_words),
            (*_loader(parts.held, ckpt, batch, workers), parts.held_words), parts.held_name, OTHER_GUARD_ADVICE)


def quantize_int8(source: Path, ckpt: dict, stage: Path, max_accuracy_drop: float = MAX_ACCURACY_DROP,
                  force: bool = False, batch_size: Optional[int] = None, workers: Optional[int] = 0,
                  out: Optional[Path] = None, data: Optional[PathLike] = None) -> dict:
    """model.int8.onnx from the staged model.onnx (quantize.quantize_and_check): calibrated on up to
    quantize.CALIBRATION_IMAGES images and top-1 of fp32 ONNX and int8 measured on others (`_int8_images`: the
    run's train and val or test splits; of another --data folder, two disjoint parts). ExportError naming both
    numbers when the drop exceeds `max_accuracy_drop` points, unless `force`. Returns what config.json records
    under formats["onnx-int8"], with which images calibrated and which the guard scored."""
    (calibration, n_calibration, calibration_words), (evaluation, n_eval, eval_words), split, advice = \
        _int8_images(source, ckpt, batch_size, workers, data)
    if not n_calibration or not n_eval:
        raise ExportError(f"--quantize int8 needs images to calibrate on and others to check its accuracy on; found "
                          f"{n_calibration} ({calibration_words}) and {n_eval} ({eval_words})")
    try:
        info = quantize_and_check(stage / FORMAT_FILES["onnx"], stage / INT8_FILE, calibration, evaluation,
                                  max_accuracy_drop, force, guard_advice=advice)
    except QuantizationError as e:
        raise ExportError(f"{e}; {out or 'the bundle folder'} was left unchanged") from None
    return {"file": INT8_FILE, "method": f"onnxruntime static {info['format']}, {info['weights']} weights, "
                                         f"{info['activations']} activations, {info['calibrate_method']} calibration",
            "quantized_from": FORMAT_FILES["onnx"], "reduce_range": info["reduce_range"],
            "calibration_images": info["calibration_images"], "calibration_source": calibration_words,
            "eval_split": split, "eval_images": info["eval_images"], "eval_source": eval_words,
            "top1_fp32": info["top1_fp32"], "top1_int8": info["top1_int8"],
            "top1_drop_points": info["top1_drop_points"], "agreement": info["agreement"],
            "max_accuracy_drop": max_accuracy_drop, "forced": bool(force and info["top1_drop_points"] > max_accuracy_drop),
            "fp32_nodes": info.get("fallback", {}).get("fp32_nodes", []), "warnings": info["warnings"]}


# --- model card ----------------------------------------------------------------------------------

_METRICS = (("top1", "top-1"), ("top5", "top-5"), ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro F1"))
_FILE_ROLES = {
    WEIGHTS_FILE: "weights only (safetensors: loading runs no code); `spinal_transfer.load(DIR)`",
    CONFIG_FILE: "backbone, head and its options, classes in logit order, input preprocessing, package version",
    CARD_FILE: "this model card",
    FORMAT_FILES["export"]: "torch.export program, dynamic batch: `torch.export.load(path).module()`",
    FORMAT_FILES["torchscript"]: "TorchScript (deprecated upstream, still widely served): `torch.jit.load(path)`",
    FORMAT_FILES["onnx"]: "ONNX, dynamic batch axis, input `input` -> output `logits`: onnxruntime",
    INT8_FILE: "int8 ONNX (static, QDQ) for CPUs, same inputs and outputs: onnxruntime",
    STANDALONE.name: "predicts with the ONNX file(s) without spinal-transfer (numpy, OpenCV, Pillow, onnxruntime), "
                     "preprocessing as spinal-transfer does",
}


def format_check(f: dict) -> str:
    """How an exported file was checked, in words (config["formats"][...])."""
    if "top1_int8" in f:
        return (f"{f['method']}; top-1 on {f['eval_images']} {f['eval_split']} images: int8 "
                f"{100 * f['top1_int8']:.2f}% vs fp32 {100 * f['top1_fp32']:.2f}% (drop {f['top1_drop_points']:.2f} "
                f"points; bound {f['max_accuracy_drop']:g}{', forced' if f.get('forced') else ''}; agrees with fp32 on "
                f"{100 * f['agreement']:.1f}%)"
                + (f"; {len(f['fp32_nodes'])} node(s) kept in fp32: {', '.join(f['fp32_nodes'])}"
                   if f.get("fp32_nodes") else ""))
    return f"{f['method']}, max abs logit difference {f['max_abs_diff']:.2g}"


def _resize_words(inp: dict) -> str:
    """The evaluation resize and crop of a bundle's input config, in words (build_transforms' three cases)."""
    size, resize = inp["img_size"], inp["resize_size"]
    h, w = (resize, resize) if isinstance(resize, int) else resize
    if inp["eval_resize"] != "center_crop":
        return f"resize to {size}x{size}"
    if h != w:
        return f"resize to {h}x{w} (height x width), center-crop {size}"
    return f"resize the shorter side to {h}, center-crop {size}"


def _probabilities_words(config: dict, report: Optional[dict]) -> str:
    """The model card's account of its probabilities: the temperature with how well val pinned it down and what
    it did on test (report.json's calibration), or why there is none."""
    t = config.get("temperature")
    if not t:
        return ("the plain softmax of the logits, T = 1 ("
                + (config.get("calibration_note") or "not calibrated: the checkpoint carries no temperature") + ").")
    words = (f"softmax(logits / T) with T = {t:.4f} (`temperature` in config.json): temperature scaling fitted on "
             f"the run's val split; `predict --no-calibration` gives the plain softmax.")
    cal = (report or {}).get("calibration") or {}
    if cal.get("temperature_interval") and cal.get("val"):
        lo, hi = cal["temperature_interval"]
        words += (f" Fitted on {cal['val']['num_samples']} val images, 95% bootstrap interval of T {lo:.2f}-{hi:.2f}"
                  + (": the val split was too small to pin it down, so read the probabilities as rough"
                     if hi > 2 * lo else "") + (f"; {cal['warning']}" if cal.get("warning") else "") + ".")
    if cal.get("test"):
        test = cal["test"]
        words += (f" On the held-out test split the expected calibration error went from {test['ece_before']:.3f} "
                  f"to {test['ece_after']:.3f} ({test['num_samples']} images).")
    return words


# long: the model card's template, read top to bottom as the card reads; parts of it would scatter the card
def model_card(config: dict, model: nn.Module, train_cfg: dict, report: Optional[dict], source: Path) -> str:
    """README.md of a bundle: what the model is, how it was trained, how well it did, how to use it."""
    import yaml

    head, inp, classes = config["head"], config["input"], config["classes"]
    new_head = get_head(model)
    shape = new_head.extra_repr() if head["kind"] == "spinal" else repr(new_head).splitlines()[0]
    epoch = config["epoch"]
    crop = _resize_words(inp)
    lines = [
        f"# {config['backbone']} with a {head['kind']} head, {len(classes)} classes", "",
        f"Fine-tuned with spinal-transfer {config['spinal_transfer_version']}; exported from `{source}`"
        + (f" (epoch {epoch})." if epoch is not None else "."), "",
        "## Use", "", "```python", "import spinal_transfer", "",
        'model = spinal_transfer.load("THIS_FOLDER")   # offline: no download, weights from model.safetensors',
        "```", "", "```bash", "spinal-transfer predict THIS_FOLDER images/ --out preds.csv",
        *(["spinal-transfer predict THIS_FOLDER/model.onnx images/ --out preds.csv   # via onnxruntime"]
          if "onnx" in config["formats"] else []),
        *(["spinal-transfer predict THIS_FOLDER images/ --runner onnx-int8 --out preds.csv   # int8, CPUs"]
          if "onnx-int8" in config["formats"] else []), "```", "",
        *(["Without spinal-transfer (the probabilities of `predict --runner onnx`; with `--model "
           f"{INT8_FILE}`, of `--runner onnx-int8`):" if "onnx-int8" in config["formats"] else
           "Without spinal-transfer (the probabilities of `predict --runner onnx`):", "", "```bash",
           "pip install numpy opencv-python-headless pillow onnxruntime",
           f"python THIS_FOLDER/{STANDALONE.name} photo.jpg more/*.png --topk 3",
           *([f"python THIS_FOLDER/{STANDALONE.name} photo.jpg --model {INT8_FILE}"]
             if "onnx-int8" in config["formats"] else []), "```", ""] if "onnx" in config["formats"] else []),
        "## Input", "",
        f"RGB, {crop} ({inp['interpolation']} interpolation when upscaling, area when downscaling), "
        f"scale to [0, 1], normalize with mean {list(inp['mean'])} and std {list(inp['std'])}.", "",
        "## Probabilities", "", _probabilities_words(config, report), "",
    ]
    lines += ["## Metrics", ""]
    if report is None:
        lines += ["No report.json was found next to the checkpoint.", ""]
    else:
        lines += ["| split | " + " | ".join(n for _, n in _METRICS) + " | loss (plain softmax) | images |",
                  "|---" * (len(_METRICS) + 3) + "|"]
        for split in ("val", "test"):
            m = report.get(split)
            if not m:
                continue
            lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" for k, _ in _METRICS)
                         + f" | {m['loss']:.4f} | {m['num_samples']} |")
        lines += ["", f"From the run's report.json: best epoch {report['best_epoch']}, chosen on "
                      f"{report['selected_on']}; test evaluated once with those weights."]
        if epoch is not None and epoch != report["best_epoch"]:
            lines.append(f"**These metrics are of epoch {report['best_epoch']}; this bundle holds epoch {epoch}.**")
        lines.append("")
    lines += [
        "## Training", "",
        f"- backbone `{config['backbone']}`, starting weights `{train_cfg['weights']}`",
        f"- `{head['kind']}` head in place of the original classifier ({head['replace']}): {shape}, "
        f"{new_head.num_params():,} parameters",
        f"- {schedule_words(train_cfg)}; optimizer {train_cfg['optimizer']}, batch size {train_cfg['batch_size']}, "
        f"augmentation {train_cfg['augment']}",
        "", "<details><summary>full training configuration</summary>", "", "```yaml",
        yaml.safe_dump(train_cfg, sort_keys=False).rstrip(), "```", "", "</details>", "",
        "## Classes", "", "Logit i is class i:", "",
        ", ".join(f"{i}: `{c}`" for i, c in enumerate(classes)), "",
        "## Files", "", "| file | what | check against the eager model |", "|---|---|---|",
    ]
    checks = {f["file"]: format_check(f) for f in config["formats"].values()}
    for name, role in _FILE_ROLES.items():
        if name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE) or name in checks or (
                name == STANDALONE.name and "onnx" in config["formats"]):
            lines.append(f"| `{name}` | {role} | {checks.get(name, '')} |")
    return "\n".join(lines) + "\n"
