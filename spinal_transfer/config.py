"""The one configuration dataclass: every option and its default lives here.

YAML recipes and CLI flags both fill `TrainConfig` (flags win over the recipe, the recipe over
these defaults). `add_config_args` derives the argparse flags from the fields, so a new option is
one new field, never a second default somewhere else.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Stage:
    """One learning-rate stage: a fresh optimizer and scheduler, started from the best weights so far."""

    epochs: int
    lr: float


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    data: str = _opt("", "image folder: ROOT/{train,val,test}/<class>/ or ROOT/<class>/")
    val_fraction: float = _opt(0.1, "fraction of train held out for val when ROOT has no val/")
    test_fraction: float = _opt(0.1, "fraction held out for test when ROOT has no test/")
    split_seed: int = _opt(0, "seed of the stratified val/test split")
    # --- model ------------------------------------------------------------------------------
    backbone: str = _opt("timm/resnet18", "torchvision/<name> or timm/<name>")
    weights: str = _opt("default", "none | default | torchvision enum / timm tag | path to a local file")
    head: str = _opt("spinal", "head kind", choices=["linear", "mlp", "spinal"])
    head_preset: str = _opt("resnet", "spinal preset: resnet (no dropout/BN) or vgg (dropout 0.5 + BN)",
                            choices=["resnet", "vgg"])
    layer_width: int = _opt(512, "spinal layer width")
    num_layers: int = _opt(4, "number of spinal layers")
    num_splits: int = _opt(2, "number of input parts the spinal layers cycle through")
    shared_weights: bool = _opt(False, "spinally shared layers: layers 1..L-1 share one Linear")
    head_dropout: Optional[float] = _opt(None, "override the preset's dropout (spinal, mlp)")
    mlp_hidden: list = _opt([4096, 4096], "hidden widths of the mlp head")
    replace: str = _opt("auto", "replace the whole classifier or only its last layer (VGG/AlexNet)",
                        choices=["auto", "last", "classifier"])
    # --- input and augmentation -------------------------------------------------------------
    augment: str = _opt("modern", "modern: random-resized crop + flip; paper: resize, rotate, random crop, flip; "
                                  "paper_rrc: paper with a random-resized crop (Fruits-360 script); none",
                        choices=["modern", "paper", "paper_rrc", "none"])
    img_size: Optional[int] = _opt(None, "crop size fed to the model (default: backbone's pretrained config)")
    resize_size: Optional[int] = _opt(None, "paper recipe: resize to this square before cropping; "
                                            "eval: resize shorter side (default img_size / crop_pct)")
    eval_resize: str = _opt("center_crop", "eval preprocessing: center_crop (resize then crop) or "
                                           "resize (straight to img_size, as the paper's scripts did)",
                            choices=["center_crop", "resize"])
    rrc_scale: list = _opt([0.08, 1.0], "random-resized-crop scale range")
    rotation: float = _opt(15.0, "paper recipe: max rotation in degrees")
    hflip: float = _opt(0.5, "horizontal flip probability")
    vflip: float = _opt(0.0, "vertical flip probability")
    mean: Optional[list] = _opt(None, "normalization mean (default: backbone's pretrained config)")
    std: Optional[list] = _opt(None, "normalization std (default: backbone's pretrained config)")
    interpolation: Optional[str] = _opt(None, "resize interpolation (default: backbone's pretrained config)",
                                        choices=["nearest", "bilinear", "bicubic", "area", "lanczos"])
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = _opt(10, "epochs (ignored when stages are given)")
    lr: float = _opt(1e-3, "learning rate of the head (ignored when stages are given)")
    stages: list = _opt([], "multi-stage schedule, e.g. [{epochs: 25, lr: 1e-3}, {epochs: 25, lr: 1e-4}]; "
                            "each stage restarts optimizer+scheduler from the previous stage's best weights")
    optimizer: str = _opt("sgd", "optimizer", choices=["sgd", "adamw"])
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    scheduler: str = _opt("step", "per-stage schedule", choices=["step", "cosine", "none"])
    step_size: int = _opt(7, "StepLR step (epochs)")
    gamma: float = _opt(0.1, "StepLR gamma")
    warmup_epochs: float = _opt(0.0, "linear warmup (epochs) for the cosine schedule")
    backbone_lr_mult: float = _opt(1.0, "backbone learning rate = lr * this")
    freeze_epochs: int = _opt(0, "train only the head for the first K epochs")
    freeze_backbone: bool = _opt(False, "keep the backbone frozen for the whole run")
    cache_features: bool = _opt(False, "with --freeze-backbone: compute backbone features once, train the head on them")
    label_smoothing: float = _opt(0.0, "label smoothing")
    mixup: float = _opt(0.0, "mixup alpha (timm Mixup); 0 disables")
    cutmix: float = _opt(0.0, "cutmix alpha (timm Mixup); 0 disables")
    accum_steps: int = _opt(1, "gradient accumulation steps")
    clip_grad: Optional[float] = _opt(None, "clip gradient norm to this value")
    class_balance: str = _opt("none", "imbalanced folders: weighted loss or balanced sampler",
                              choices=["none", "loss", "sampler"])
    ema_decay: Optional[float] = _opt(None, "keep an EMA of the weights (timm ModelEmaV3) with this decay")
    # --- speed and hardware -----------------------------------------------------------------
    batch_size: int = _opt(32, "batch size per device")
    workers: Optional[int] = _opt(None, "DataLoader workers (default: min(8, cpu count))")
    device: str = _opt("auto", "device", choices=["auto", "cpu", "cuda", "mps"])
    amp: str = _opt("auto", "mixed precision: auto = bf16 on CUDA, off on CPU", choices=["auto", "bf16", "fp16", "none"])
    channels_last: Optional[bool] = _opt(None, "channels_last memory format (default: on for CUDA and CPU)")
    compile: bool = _opt(False, "torch.compile the model")
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm in distributed runs")
    # --- bookkeeping ------------------------------------------------------------------------
    seed: int = _opt(0, "random seed")
    deterministic: bool = _opt(False, "deterministic algorithms (slower; exact resume on CPU)")
    select_on: str = _opt("val", "split that picks the best epoch (test reproduces the paper's protocol)",
                          choices=["val", "test"])
    limit_train_batches: Optional[int] = _opt(None, "stop each training epoch after this many batches (smoke tests)")
    log_interval: int = _opt(20, "steps between progress-bar metric updates")
    out: str = _opt("runs/run", "run directory")

    def resolved_stages(self) -> list[Stage]:
        """The schedule as stages: `stages` when given, else one stage of `epochs` at `lr`."""
        if self.stages:
            return [s if isinstance(s, Stage) else Stage(int(s["epochs"]), float(s["lr"])) for s in self.stages]
        return [Stage(self.epochs, self.lr)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) if isinstance(s, Stage) else dict(s) for s in self.stages]
        return d

    def save(self, path: Union[str, Path]) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "TrainConfig":
        d = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping of option: value")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name}={value!r}: choose one of {choices}")
        for s in self.resolved_stages():
            if s.epochs < 1 or s.lr <= 0:
                raise ValueError(f"every stage needs epochs >= 1 and lr > 0, got {s}")
        if self.accum_steps < 1:
            raise ValueError("accum_steps must be >= 1")
        if self.cache_features and not self.freeze_backbone:
            raise ValueError("cache_features needs freeze_backbone (a trained backbone changes its features)")
        if self.cache_features and (self.mixup or self.cutmix or self.ema_decay):
            raise ValueError("cache_features trains the head on stored feature vectors: mixup, cutmix and "
                             "ema_decay do not apply there")


# ------------------------------------------------------------------------------------------------
# CLI glue: flags are generated from the dataclass fields.

def _base_type(tp: Any) -> Any:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_yaml_value(s: str) -> Any:
    return yaml.safe_load(s)


def add_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per TrainConfig field. Defaults are None so that only flags given on the
    command line override a recipe; `config_from_args` merges them."""
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            parser.add_argument(flag, nargs="?", const=True, default=None, type=_parse_bool, help=help_)
        elif tp in (list, dict) or get_origin(tp) in (list, dict):
            parser.add_argument(flag, default=None, type=_parse_yaml_value, help=help_ + " [YAML]")
        else:
            parser.add_argument(flag, default=None, type=tp, choices=f.metadata.get("choices"), help=help_)


def config_from_args(args: argparse.Namespace, base: Optional[TrainConfig] = None) -> TrainConfig:
    """Start from `base` (a recipe or the defaults) and apply every flag that was given."""
    d = (base or TrainConfig()).to_dict()
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            d[f.name] = v
    if getattr(args, "weights", None) is not None and args.weights.lower() == "none":
        d["weights"] = "none"
    return TrainConfig.from_dict(d)
