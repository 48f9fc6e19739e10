"""The paper recipes (recipes/*.yaml) and recipes/paper_results.csv against the reference.

The reference is the upstream code, dipuk0506/SpinalNet @ 2a2a92f: the `Transfer Learning/` scripts (summarised in
/work/shared/reference/paper-recipes.md, tables B1, A3, A4) and, for the notebook runs, the notebooks each recipe's
header cites. Their settings are restated below as constants (DATASETS per script, VARIANTS per notebook run), so a
recipe that drifts from its source fails here.

Two parts:
* fast checks of every YAML (loads with TrainConfig.from_yaml, settings, stages, closed-form head sizes), of its
  header (upstream commit, files and line numbers) and of paper_results.csv (every row sourced, linked recipes
  exist and match);
* one model build per DISTINCT (backbone, head, preset, width, layers/parts/sharing, classes, replace) with
  `spinal_transfer.build_model(..., weights=None)`: head type, in_features, width, preset (dropout/BN),
  classes, parameter count, and a forward pass whose output has `classes` logits (which would catch the
  upstream CIFAR-10/SVHN bug of a head that is attached but never called). The default run builds on the
  meta device (~1 s per model); `-m slow` repeats it on real CPU tensors (~20 s per model on 2 CPUs, as
  build_model probes at 224 px; weight init is skipped there, see `_skip_weight_init`).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import gc
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from spinal_transfer.config import Stage, TrainConfig
from spinal_transfer.data.splits import Splits

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
RESULTS_CSV = RECIPES_DIR / "paper_results.csv"

CIFAR100_STATS = ([0.507, 0.487, 0.441], [0.267, 0.256, 0.276])
CINIC_STATS = ([0.47889522, 0.47227842, 0.43047404], [0.24205776, 0.23828046, 0.25874835])

# Reference B1, one entry per dataset (the names `prepare` writes under --data-root).
# stages: (epochs, lr) per stage; eval: eval_resize; spinal: (layer_width, preset of the script's head)
DATASETS = {
    "stanford_cars": dict(classes=196, resize=456, crop=448, eval="resize", hflip=0.5, vflip=0.0, batch=9,
                          stages=[(25, 1e-3), (25, 1e-4)], stats=CIFAR100_STATS, spinal=(196, "resnet")),
    # Flowers: the authors' Kaggle flower_data layout (prepare flowers102_kaggle), not the official split.
    "flowers102": dict(classes=102, resize=464, crop=448, eval="resize", hflip=0.5, vflip=0.0, batch=8,
                       stages=[(50, 1e-3)], stats=CIFAR100_STATS, spinal=(102, "resnet"), data="flowers102_kaggle"),
    "fruits360": dict(classes=131, resize=140, crop=128, rrc=True, eval="resize", hflip=0.5, vflip=0.5, batch=224,
                      stages=[(20, 1e-2)], stats=CIFAR100_STATS, spinal=(131, "resnet")),
    # Caltech-101: width 101 as the authors' own ResNet-preset run (the notebook); the script's variable is 1024.
    "caltech101": dict(classes=101, resize=230, crop=224, eval="resize", hflip=0.5, vflip=0.0, batch=30,
                       stages=[(20, 1e-3)], stats=CIFAR100_STATS, spinal=(101, "resnet")),
    "bird225": dict(classes=225, resize=230, crop=224, eval="resize", hflip=0.5, vflip=0.0, batch=24,
                    stages=[(25, 1e-3)], stats=CIFAR100_STATS, spinal=(1024, "vgg")),
    "cifar10": dict(classes=10, resize=272, crop=256, eval="resize", hflip=0.5, vflip=0.0, batch=28,
                    stages=[(50, 1e-3)], stats=CIFAR100_STATS, spinal=(20, "vgg")),
    "cifar100": dict(classes=100, resize=272, crop=256, eval="resize", hflip=0.5, vflip=0.0, batch=24,
                     stages=[(50, 1e-3)], stats=CIFAR100_STATS, spinal=(512, "vgg")),
    # SVHN: Resize((272,320)) -> CenterCrop 272 -> RandomCrop 256, eval CenterCrop 256, no flip. The WRN number
    # is "Spinal ResNet FC", the script's class is SpinalNet_VGG (used for the VGG-19-bn recipe).
    "svhn": dict(classes=10, resize=[272, 320], crop=256, eval="center_crop", hflip=0.0, vflip=0.0, batch=28,
                 stages=[(50, 1e-3)], stats=CIFAR100_STATS, spinal=(20, {"wrn101": "resnet", "vgg19bn": "vgg"})),
    # CINIC-10: the code's 456/448 (its docstring says 272/256).
    "cinic10": dict(classes=10, resize=456, crop=448, eval="resize", hflip=0.5, vflip=0.0, batch=9,
                    stages=[(20, 1e-2), (20, 1e-3)], stats=CINIC_STATS, spinal=(20, "resnet")),
    "stl10": dict(classes=10, resize=272, crop=256, eval="resize", hflip=0.5, vflip=0.0, batch=24,
                  stages=[(20, 1e-3)], stats=CIFAR100_STATS, spinal=(512, "vgg")),
}

# Recipes whose settings differ from their dataset's script (notebook runs and the other preset), by stem.
# Keys as in DATASETS; spinal: (layer_width, preset); head: (num_layers, num_splits, shared_weights).
VARIANTS = {
    "caltech101_wrn101_spinal-vgg": dict(spinal=(1024, "vgg")),
    "flowers102_wrn101_spinal-vgg": dict(spinal=(102, "vgg")),
    # Jupyter Notebooks/spinalnet-caltech101.ipynb
    "caltech101_wrn101_spinal-nb": dict(batch=64, stages=[(5, 1e-2), (5, 1e-3)], spinal=(101, "resnet")),
    # Jupyter Notebooks/spinalnet-cifar10-97-5+.ipynb
    "cifar10_wrn101_spinal-nb": dict(batch=56, stages=[(5, 1e-2), (5, 1e-3), (5, 1e-4)], spinal=(20, "resnet")),
    # Jupyter Notebooks/spinalnet-cifar100.ipynb
    "cifar100_wrn101_spinal-nb": dict(batch=56, stages=[(5, 1e-2), (5, 1e-3), (5, 1e-4)], spinal=(200, "resnet")),
    # Jupyter Notebooks/stl-10-spinalnet.ipynb (lr 5e-4)
    "stl10_wrn101_spinal-nb": dict(stages=[(20, 5e-4)]),
    # Customizable Model/Customizable-SpinalNet-on-STL-10.ipynb: 10 layers on 2 parts, no dropout/BN
    "stl10_wrn101_spinal-custom": dict(stages=[(5, 1e-3), (10, 1e-4)], spinal=(512, "resnet"), head=(10, 2, False)),
    # Others/Other Papers/SpinalNet SW/WideResNet-101 on STL-10.ipynb: 8 layers on 8 parts, shared weights
    "stl10_wrn101_spinal-sw": dict(stages=[(5, 1e-3), (10, 1e-4)], spinal=(20, "resnet"), head=(8, 8, True)),
    # Jupyter Notebooks/SpinalNet_vs_2L_FC/spinalnet-oxford-102-flower.ipynb: default Linear head
    "flowers102_wrn101_default-nb": dict(resize=468, vflip=0.5, batch=16, stages=[(10, 1e-2), (30, 1e-3)]),
}
RUN_TAGS = {"nb", "custom", "sw"}   # head variants that are notebook runs rather than the other preset


def reference(path: Path) -> dict:
    """The dataset's script settings with the recipe's own variant applied."""
    dataset = parse_stem(path)[0]
    return {"head": (4, 2, False), "data": dataset, **DATASETS[dataset], **VARIANTS.get(path.stem, {})}


BACKBONES = {"wrn101": "torchvision/wide_resnet101_2", "vgg19bn": "torchvision/vgg19_bn"}
CSV_BACKBONES = {"torchvision/wide_resnet101_2": "wide_resnet101_2", "torchvision/vgg19_bn": "vgg19_bn"}

# What the issue asks for: every dataset with WRN-101-2 default + spinal; VGG-19-bn where the paper or the
# committed scripts have it (Bird-225; CIFAR-10 and SVHN, whose scripts build VGG-19-bn).
REQUIRED = {f"{ds}_wrn101_{h}" for ds in DATASETS for h in ("default", "spinal")} | {
    f"{ds}_vgg19bn_{h}" for ds in ("bird225", "cifar10", "svhn") for h in ("default", "spinal")}

# Reference A4: spinal head parameters, keyed (backbone, preset, width, classes).
A4_SPINAL_PARAMS = {
    ("wrn101", "resnet", 196, 196): 1_072_708,
    ("wrn101", "resnet", 102, 102): 491_130,
    ("wrn101", "resnet", 131, 131): 657_358,
    ("wrn101", "resnet", 1024, 101): 7_757_925,
    ("wrn101", "vgg", 1024, 101): 7_766_117,
    ("wrn101", "resnet", 101, 101): 485_608,       # the Caltech notebook's printed head
    ("wrn101", "vgg", 1024, 225): 8_274_145,
    ("vgg19bn", "vgg", 1024, 225): 55_460_065,
    ("wrn101", "resnet", 20, 10): 84_010,
    ("vgg19bn", "vgg", 20, 10): 1_005_770,
    ("wrn101", "vgg", 512, 100): 3_094_628,
    ("wrn101", "vgg", 512, 10): 2_910_218,
}
# Reference E: the customizable (10 x 512 on 2 parts) and shared-weight (8 x 20 on 8 parts) STL-10 heads.
E_PARAMS = {"stl10_wrn101_spinal-custom": 7_658_506, "stl10_wrn101_spinal-sw": 12_290}
# Reference A4: default heads, keyed (backbone, classes). VGG: the whole 4096-4096 classifier.
A4_DEFAULT_PARAMS = {
    ("wrn101", 196): 401_604, ("wrn101", 102): 208_998, ("wrn101", 131): 268_419, ("wrn101", 101): 206_949,
    ("wrn101", 225): 461_025, ("vgg19bn", 225): 120_467_681, ("wrn101", 10): 20_490,
    ("vgg19bn", 10): 119_586_826, ("wrn101", 100): 204_900,
}
FEATURES = {"wrn101": 2048, "vgg19bn": 512 * 7 * 7}   # WRN pooled features; VGG flattened 7x7 map


def parse_stem(path: Path) -> tuple[str, str, str, str]:
    """`<dataset>_<backbone>_<head>[-variant]` -> (dataset, backbone token, head kind, variant or '').

    The variant is the other preset (`resnet`, `vgg`) or a run tag (RUN_TAGS). reproduce pairs every recipe whose
    head is not exactly `default` with `<dataset>_<backbone>_default`."""
    dataset, bb, head = path.stem.rsplit("_", 2)
    kind, _, variant = head.partition("-")
    return dataset, bb, kind, variant


def expected_spinal(path: Path) -> tuple[int, str]:
    dataset, bb, _, _ = parse_stem(path)
    width, preset = reference(path)["spinal"]
    if isinstance(preset, dict):
        preset = preset[bb]
    return width, preset


def spinal_params(in_features: int, width: int, classes: int, preset: str, layers: int = 4, splits: int = 2,
                  shared: bool = False) -> int:
    """Reference A4 closed form (4 layers, 2 halves: 4hw + 3w^2 + 4w + 4wC + C, VGG preset + 8w BN parameters),
    generalised as in reference E: s = D/splits; layer 0 is Linear(s, w), the others Linear(s + w, w) (one shared
    Linear with `shared`); output Linear(L*w, C)."""
    s = in_features // splits
    hidden = (s + 1) * width + (1 if shared else layers - 1) * ((s + width + 1) * width)
    return hidden + layers * width * classes + classes + (2 * layers * width if preset == "vgg" else 0)


def default_params(bb: str, classes: int) -> int:
    if bb == "vgg19bn":
        return 119_545_856 + 4097 * classes
    return (FEATURES[bb] + 1) * classes


def head_in_features(bb: str, kind: str) -> int:
    """2048 for WRN's fc, 25088 for the whole VGG classifier, 4096 for VGG's last Linear."""
    if bb == "vgg19bn" and kind == "default":
        return 4096
    return FEATURES[bb]


def load(path: Path) -> TrainConfig:
    return TrainConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------------------
# Fast part: the YAMLs.

def test_required_recipes_exist():
    stems = {p.stem for p in RECIPES}
    assert REQUIRED <= stems, f"missing recipes: {sorted(REQUIRED - stems)}"
    for p in RECIPES:
        dataset, bb, kind, variant = parse_stem(p)
        assert dataset in DATASETS and bb in BACKBONES, p.name
        assert kind in ("default", "spinal") and variant in {"", "resnet", "vgg"} | RUN_TAGS, p.name
        assert not (kind == "default" and variant in ("resnet", "vgg")), p.name
        if variant in RUN_TAGS:
            assert p.stem in VARIANTS, f"{p.name}: a notebook-run recipe needs its settings in VARIANTS"
    assert set(VARIANTS) <= stems, sorted(set(VARIANTS) - stems)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_matches_reference(path: Path):
    cfg = load(path)
    raw = yaml.safe_load(path.read_text())
    dataset, bb, kind, _ = parse_stem(path)
    ref = reference(path)

    assert cfg.data == ref["data"]                   # resolved against --data-root by reproduce
    assert cfg.backbone == BACKBONES[bb]
    assert cfg.weights == "IMAGENET1K_V1"            # the paper's torchvision V1 weights, by name
    # input pipeline
    expected_augment = "paper_rrc" if ref.get("rrc") else "paper"
    assert (cfg.augment, cfg.resize_size, cfg.img_size) == (expected_augment, ref["resize"], ref["crop"])
    assert cfg.eval_resize == ref["eval"]
    assert (cfg.rotation, cfg.hflip, cfg.vflip) == (15.0, ref["hflip"], ref["vflip"])
    assert cfg.interpolation == "bilinear"
    assert (cfg.mean, cfg.std) == (ref["stats"][0], ref["stats"][1])
    # optimisation: SGD 0.9, no decay, StepLR(7, 0.1) per stage, nothing frozen, plain CE
    assert cfg.batch_size == ref["batch"]
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay) == ("sgd", 0.9, 0.0)
    assert (cfg.scheduler, cfg.step_size, cfg.gamma) == ("step", 7, 0.1)
    assert (cfg.backbone_lr_mult, cfg.freeze_epochs, cfg.freeze_backbone) == (1.0, 0, False)
    assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix) == (0.0, 0.0, 0.0)
    assert cfg.select_on == "val"
    # stages: against the reference and against the YAML as written (lrs must be floats, not strings)
    stages = cfg.resolved_stages()
    assert stages == [Stage(e, lr) for e, lr in ref["stages"]]
    assert [(s["epochs"], s["lr"]) for s in raw["stages"]] == ref["stages"]
    assert all(isinstance(s["lr"], float) for s in raw["stages"])
    # head
    if kind == "default":
        assert cfg.head == "linear"
        assert cfg.replace == ("last" if bb == "vgg19bn" else "auto")
        assert head_in_features(bb, kind) == (4096 if bb == "vgg19bn" else 2048)
        key = (bb, ref["classes"])
        if key in A4_DEFAULT_PARAMS:
            assert default_params(bb, ref["classes"]) == A4_DEFAULT_PARAMS[key]
    else:
        width, preset = expected_spinal(path)
        assert cfg.head == "spinal"
        assert (cfg.head_preset, cfg.layer_width) == (preset, width)
        assert (cfg.num_layers, cfg.num_splits, cfg.shared_weights) == ref["head"]
        assert cfg.head_dropout is None              # the preset decides: 0.5 + BN (vgg) or none (resnet)
        assert cfg.replace == ("classifier" if bb == "vgg19bn" else "auto")
        assert head_in_features(bb, kind) == (25088 if bb == "vgg19bn" else 2048)
        n = spinal_params(FEATURES[bb], width, ref["classes"], preset, *ref["head"])
        key = (bb, preset, width, ref["classes"])
        if ref["head"] == (4, 2, False) and key in A4_SPINAL_PARAMS:
            assert n == A4_SPINAL_PARAMS[key]
        if path.stem in E_PARAMS:
            assert n == E_PARAMS[path.stem]


def test_closed_form_reproduces_reference_table():
    for (bb, preset, width, classes), n in A4_SPINAL_PARAMS.items():
        assert spinal_params(FEATURES[bb], width, classes, preset) == n, (bb, preset, width, classes)
    for (bb, classes), n in A4_DEFAULT_PARAMS.items():
        assert default_params(bb, classes) == n, (bb, classes)
    for stem, n in E_PARAMS.items():
        ref = reference(RECIPES_DIR / f"{stem}.yaml")
        assert spinal_params(2048, ref["spinal"][0], ref["classes"], ref["spinal"][1], *ref["head"]) == n, stem


def test_closed_form_matches_heads_module():
    """The A4 formula and heads.SpinalHead.num_params agree (small widths only: cheap to build)."""
    from spinal_transfer.models.heads import create_head
    for width, classes, preset in [(20, 10, "resnet"), (20, 10, "vgg"), (196, 196, "resnet"), (512, 100, "vgg")]:
        head = create_head("spinal", 2048, classes, preset=preset, layer_width=width)
        assert sum(p.numel() for p in head.parameters()) == spinal_params(2048, width, classes, preset)
    for layers, splits, shared, width in [(10, 2, False, 512), (8, 8, True, 20), (8, 8, False, 20)]:
        head = create_head("spinal", 2048, 10, preset="resnet", layer_width=width, num_layers=layers,
                           num_splits=splits, shared_weights=shared)
        assert sum(p.numel() for p in head.parameters()) == spinal_params(2048, width, 10, "resnet", layers,
                                                                           splits, shared)


def test_weight_names_exist_in_torchvision():
    import torchvision
    for backbone in sorted({load(p).backbone for p in RECIPES}):
        name = backbone.split("/", 1)[1]
        enum = torchvision.models.get_model_weights(name)
        assert "IMAGENET1K_V1" in enum.__members__, name


# ---------------------------------------------------------------------------------------------------------
# Fast part: paper_results.csv and the recipes' provenance.

CSV_COLUMNS = ["recipe", "dataset", "backbone", "head", "preset", "layer_width", "top1", "split",
               "selected_on_same_split", "source", "commit", "location", "quote", "val_top1", "authors_split",
               "train_images", "settings", "doubt"]
# Read by spinal_transfer.experiments.reproduce (load_paper_results, cells, to_csv): they keep their names and meaning.
REPRODUCE_COLUMNS = ["recipe", "top1", "split", "selected_on_same_split"]

# Files of dipuk0506/SpinalNet that recipes and paper_results.csv may cite (HEAD 2a2a92f, plus the deleted
# notebook of 2467709). A citation of any other path is a typo.
UPSTREAM_HEAD = "2a2a92f65f9aa0934cc15a3ffe7756024a01ce1d"
UPSTREAM_FILES = {f"Transfer Learning/{f}" for f in (
    "Transfer_Learning_Stanford_Cars.py", "Transfer_Learning_Oxford102flower.py", "Transfer_Learning_Fruits360.py",
    "Transfer_Learning_Caltech101.py", "Transfer_Learning_Bird225.py", "Transfer_Learning_CIFAR10.py",
    "Transfer_Learning_CIFAR100.py", "Transfer_Learning_CINIC10.py", "Transfer_Learning_STL10.py",
    "Transfer_Learning_SVHN.py", "Transfer_Learning_MNIST.py", "Transfer_Learning_hymenoptera.py",
    "Pytorch_data_to_folders.py", "Readme.md")} | {f"Jupyter Notebooks/{f}" for f in (
    "spinalnet-caltech101.ipynb", "spinalnet-cifar10-97-5+.ipynb", "spinalnet-cifar100.ipynb",
    "stl-10-spinalnet.ipynb", "stl-10-spinalnet-98-66.ipynb", "alexnet-spinalnet-fc-tl-10-monkey.ipynb",
    "transfer-learning-on-mnist-with-vgg.ipynb", "transfer-learning-on-fashion-mnist-dataset.ipynb",
    "SpinalNet_vs_2L_FC/spinalnet-oxford-102-flower.ipynb",
    "SpinalNet_vs_2L_FC/pytorch-transfer-learning-oxford-102-2-layer-fc.ipynb")} | {
    "Customizable Model/Customizable-SpinalNet-on-STL-10.ipynb", "Customizable Model/spinalnettorch.py",
    "Others/Other Papers/SpinalNet SW/WideResNet-101 on STL-10.ipynb", "README.md", "MNIST/readme.md",
    "MNIST_VGG/readme.md", "CIFAR-10/readme.md"} | {
    f"Others/Other Papers/SpinalNet SW/Transformer on STL-10 (HL_width={w}).ipynb" for w in (10, 20, 50, 100)}
# `path` L12, L3-7 (scripts) or `path` ... cell 4 L6 (notebooks: cells 0-based, lines 1-based within a cell)
CITATION = re.compile(r"`([^`]+\.(?:py|ipynb|md))`((?:(?!`[^`]+\.(?:py|ipynb|md)`).)*)", re.S)
LINE_REF = re.compile(r"\bL\d+(?:-\d+)?\b")
CELL_REF = re.compile(r"\bcell \d+ (?:L\d+|output)")


def header(path: Path) -> str:
    """The comment block above the first YAML key."""
    lines = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_cites_upstream_files_and_lines(path: Path):
    """Each recipe names the upstream commit, the file(s) its values come from and the lines in them."""
    text = header(path)
    m = re.search(r"^# Upstream: dipuk0506/SpinalNet @ ([0-9a-f]{40})$", text, re.M)
    assert m, f"{path.name}: no '# Upstream: dipuk0506/SpinalNet @ <40-hex commit>' line"
    assert m.group(1) == UPSTREAM_HEAD
    cites = CITATION.findall(text.replace("\n#   ", " "))
    assert cites, f"{path.name}: no `file` citation"
    for file, refs in cites:
        assert file in UPSTREAM_FILES, f"{path.name}: {file} is not an upstream file"
        if file.endswith(".ipynb"):
            assert CELL_REF.search(refs), f"{path.name}: {file} without 'cell N LM' or 'cell N output' references"
        elif file.endswith(".py") and not file.endswith("spinalnettorch.py"):
            assert LINE_REF.search(refs), f"{path.name}: {file} without line references"
    for key in ("# Reported:", "# Authors' data and protocol:"):
        assert key in text, f"{path.name}: no {key!r}"
    assert "# needs:" not in text, f"{path.name}: every field the authors' run needs exists: make it a real key"
    assert load(path).paper_select_on in ("test", "val"), f"{path.name}: no paper_select_on"


def read_results() -> list[dict]:
    with RESULTS_CSV.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        return list(reader)


def test_paper_results_csv():
    rows = read_results()
    stems = {p.stem for p in RECIPES}
    # columns were only added: the original ten come first, unchanged
    assert CSV_COLUMNS[:10] == ["recipe", "dataset", "backbone", "head", "preset", "layer_width", "top1", "split",
                                "selected_on_same_split", "source"]
    assert set(REPRODUCE_COLUMNS) <= set(CSV_COLUMNS)
    keys = [(r["recipe"], r["source"], r["commit"], r["location"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per published number"
    for r in rows:
        assert 0.0 < float(r["top1"]) <= 100.0, r
        # every row has a source: an upstream file, the commit of the version read, and where in it
        assert r["source"] in UPSTREAM_FILES, r["source"]
        assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]), r
        assert re.fullmatch(r"L\d+(-\d+)?( \(.*\))?|cell \d+ (output|L\d+(-\d+)?)( \(epoch \d+\))?",
                            r["location"]), r["location"]
        assert (r["source"].endswith(".ipynb")) == r["location"].startswith("cell"), r
        assert r["quote"], r
        if r["val_top1"]:
            assert 0.0 < float(r["val_top1"]) <= 100.0, r
        if r["train_images"]:
            assert int(r["train_images"]) > 0, r
        if not r["recipe"]:
            # numbers without a recipe: other backbones/datasets, superseded runs, README titles
            assert r["split"] in ("test", "val", "unknown") and r["selected_on_same_split"] in ("true", "false",
                                                                                            "unknown"), r
            assert r["doubt"], f"a number without a recipe says why in `doubt`: {r}"
            continue
        assert r["split"] in ("test", "val"), r
        assert r["selected_on_same_split"] in ("true", "false"), r
        assert r["recipe"] in stems, f"{r['recipe']}: no such recipe"
        path = RECIPES_DIR / f"{r['recipe']}.yaml"
        cfg = load(path)
        assert r["dataset"] == parse_stem(path)[0]
        assert r["backbone"] == CSV_BACKBONES[cfg.backbone]
        assert r["head"] == ("default" if cfg.head == "linear" else "spinal")
        if r["head"] == "spinal":
            assert r["preset"] == cfg.head_preset
        if r["layer_width"]:
            assert int(r["layer_width"]) == cfg.layer_width
        # the recipe's header quotes every number linked to it
        assert any(f"{t}%" in header(path) for t in (f"{float(r['top1']):.2f}", r["top1"], f"{float(r['top1']):g}")), \
            (r["recipe"], r["top1"])
        # selected on the reported split <=> the paper protocol selects on test
        if r["selected_on_same_split"] == "true":
            assert cfg.paper_select_on == "test", r["recipe"]
    datasets = {r["dataset"] for r in rows}
    assert {"stanford_cars", "stl10", "bird225", "caltech101", "flowers102"} <= datasets


def test_paper_results_anchor_numbers():
    """The numbers the issues name, each on its recipe (several published numbers may share one)."""
    got: dict[str, set] = {}
    for r in read_results():
        got.setdefault(r["recipe"], set()).add(float(r["top1"]))
    for recipe, top1 in {
        "stanford_cars_wrn101_spinal": 93.35, "stl10_wrn101_spinal": 98.23,
        "bird225_vgg19bn_default": 98.67, "bird225_vgg19bn_spinal": 99.02,
        "caltech101_wrn101_default": 96.11, "caltech101_wrn101_spinal": 96.40,
        "caltech101_wrn101_spinal-vgg": 96.87,
        "flowers102_wrn101_default": 99.39, "flowers102_wrn101_spinal": 99.30,
        # issue 19: numbers published only in notebooks
        "caltech101_wrn101_spinal-nb": 96.76, "stl10_wrn101_spinal-nb": 98.56, "cifar10_wrn101_spinal-nb": 97.60,
        "cifar100_wrn101_spinal-nb": 86.21,
    }.items():
        assert top1 in got.get(recipe, set()), (recipe, top1)
    assert 98.6625 in got["stl10_wrn101_spinal"] and 100.0 in got["fruits360_wrn101_spinal"]
    unlinked = got[""]
    assert {92.2794, 86.31, 97.03, 84.04, 99.75, 94.76} <= unlinked      # AlexNet 10-Monkey, MNIST, ...


# ---------------------------------------------------------------------------------------------------------
# Model building: one build per distinct head configuration.

def _model_key(path: Path) -> tuple:
    cfg = load(path)
    dataset, bb, kind, _ = parse_stem(path)
    spinal = cfg.head == "spinal"
    return (cfg.backbone, cfg.head, cfg.head_preset if spinal else "", cfg.layer_width if spinal else 0,
            (cfg.num_layers, cfg.num_splits, cfg.shared_weights) if spinal else (), DATASETS[dataset]["classes"],
            cfg.replace)


def _groups() -> dict[tuple, list[Path]]:
    groups: dict[tuple, list[Path]] = {}
    for p in RECIPES:
        groups.setdefault(_model_key(p), []).append(p)
    return groups


GROUPS = _groups()


@contextlib.contextmanager
def _skip_weight_init():
    """Make torch.nn.init's in-place initialisers no-ops (parameters keep torch.empty contents).

    Only values change; module structure, shapes and parameter counts are those of a normal build.
    """
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _build(key, device: str):
    from spinal_transfer import build_model
    from spinal_transfer.models.heads import head_options

    paths = GROUPS[key]
    cfg = load(paths[0])
    classes = DATASETS[parse_stem(paths[0])[0]]["classes"]
    with torch.device(device), (_skip_weight_init() if device == "cpu" else contextlib.nullcontext()):
        return build_model(cfg.backbone, classes, head=cfg.head, weights=None, replace=cfg.replace,
                           **head_options(cfg))


def _check_model(model: nn.Module, key, device: str) -> None:
    from spinal_transfer.models.heads import LinearHead, MLPHead, SpinalHead
    from spinal_transfer.models.surgery import get_head

    paths = GROUPS[key]
    cfg = load(paths[0])
    dataset, bb, kind, _ = parse_stem(paths[0])
    classes = DATASETS[dataset]["classes"]
    head = get_head(model)
    assert head is not None
    head_ids = {id(m) for m in head.modules()}
    if kind == "spinal":
        assert isinstance(head, SpinalHead)
        assert head.in_features == head_in_features(bb, kind)
        assert (head.num_classes, head.layer_width) == (classes, cfg.layer_width)
        assert (head.num_layers, head.num_splits, head.shared_weights) == (cfg.num_layers, cfg.num_splits,
                                                                          cfg.shared_weights)
        vgg = cfg.head_preset == "vgg"
        assert (head.dropout, head.batch_norm) == ((0.5, True) if vgg else (0.0, False))
        assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (cfg.num_layers if vgg else 0)
        assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in head.modules()) == vgg
        n_head = sum(p.numel() for p in head.parameters())
        assert n_head == spinal_params(head.in_features, cfg.layer_width, classes, cfg.head_preset, cfg.num_layers,
                                       cfg.num_splits, cfg.shared_weights)
        if bb == "vgg19bn":   # the whole classifier replaced: no Linear of VGG's 4096-4096 stack is left
            assert all(id(m) in head_ids for m in _linears(model.classifier))
            assert not any(m.out_features == 4096 for m in _linears(model))
    else:
        assert isinstance(head, nn.Linear) and not isinstance(head, (SpinalHead, MLPHead))
        assert isinstance(head, LinearHead) or type(head) is nn.Linear
        assert (head.in_features, head.out_features) == (head_in_features(bb, kind), classes)
        if bb == "vgg19bn":   # torchvision's classifier kept, only its last Linear retargeted
            chain = [(m.in_features, m.out_features) for m in _linears(model.classifier)]
            assert chain == [(25088, 4096), (4096, 4096), (4096, classes)]
            assert _linears(model.classifier)[-1] is head
            assert sum(p.numel() for p in model.classifier.parameters()) == default_params(bb, classes)
        else:
            assert sum(p.numel() for p in head.parameters()) == default_params(bb, classes)
    if bb == "wrn101":
        assert model.fc is head
    # the head is in the forward path: `classes` logits come out (not the ImageNet 1000)
    model.eval()
    size = 64 if bb == "wrn101" else 32
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size, device=device))
    assert tuple(out.shape) == (2, classes)


KEY_IDS = lambda k: "-".join(str(x) for x in k).replace("torchvision/", "")  # noqa: E731


@pytest.mark.parametrize("key", list(GROUPS), ids=KEY_IDS)
def test_built_model_matches_recipes(key):
    """Built on the meta device: the real module tree, real parameter shapes and a shape-checked forward
    (meta kernels validate shapes and raise on data-dependent ops), without allocating ~130M weights or
    running build_model's 224-px probe forwards on the CPU (~20 s per model on 2 CPUs)."""
    model = _build(key, "meta")
    _check_model(model, key, "meta")


@pytest.mark.slow
@pytest.mark.parametrize("key", list(GROUPS), ids=KEY_IDS)
def test_built_model_matches_recipes_cpu(key):
    """The same checks on real CPU tensors (weight init skipped). ~8 min for all keys on 2 CPUs."""
    model = _build(key, "cpu")
    try:
        _check_model(model, key, "cpu")
    finally:
        del model
        gc.collect()


def test_recipe_data_names_match_prepare():
    """`data:` is resolved against --data-root, where `prepare <name>` writes ROOT/<name>/{train,val,test}."""
    from spinal_transfer.data.prepare import DATASETS as PREPARED

    for ds, ref in DATASETS.items():
        data = ref.get("data", ds)
        assert data in PREPARED, f"`prepare` has no dataset {data!r}"
        assert PREPARED[data].num_classes == ref["classes"], ds
    for path in RECIPES:
        assert load(path).data in PREPARED, path.name


# --- the two protocols: what each recipe trains and selects on -----------------------------------

@functools.lru_cache(maxsize=None)
def _prepared(dataset: str) -> Splits:
    """The train/val/test file lists `prepare` writes for `dataset`, built by prepare's own split code from a
    stand-in source of the official sizes (names as prepare gives array datasets; labels round-robin)."""
    from spinal_transfer.data import prepare as prep

    spec = prep.DATASETS[dataset]
    classes = [f"c{i:03d}" for i in range(spec.num_classes)]
    source = {split: [prep.Item(classes[i % len(classes)], f"{i:05d}.png", Path("x")) for i in range(n)]
              for split, n in spec.sizes.items()}
    out = prep._assign(dataset, source, prep.split_settings(dataset, 0.1, 0))
    lists = {s: [(f"{s}/{it.label}/{it.name}", classes.index(it.label)) for it in out[s]] for s in ("train", "val",
                                                                                                      "test")}
    return Splits(classes, lists["train"], lists["val"], lists["test"], root="/data")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_paper_protocol_trains_on_the_official_training_set_and_selects_on_the_reported_split(path):
    from spinal_transfer.data import prepare as prep
    from spinal_transfer.data.splits import apply_protocol
    from spinal_transfer.training.train import selection_split

    cfg = load(path)
    spec = prep.DATASETS[cfg.data]
    settings = prep.split_settings(cfg.data, 0.1, 0)
    honest = _prepared(cfg.data)
    carved_test = len(honest.test) if settings["test"]["from"] == "train" else 0       # Caltech-101: no official test
    official_train = sum(n for src, n in spec.sizes.items() if spec.split_map.get(src) == "train") - carved_test
    paper = apply_protocol(honest, "paper", cfg.paper_select_on, cfg.paper_val_index_mod)
    paper_cfg = TrainConfig.from_dict({**cfg.to_dict(), "protocol": "paper"})
    if cfg.paper_select_on == "test":          # the authors trained on all of it and chose on what they reported
        assert len(paper.train) == official_train and paper.val == [] and paper.test == honest.test
        assert selection_split(paper_cfg) == "test"
    elif cfg.paper_val_index_mod:              # their val: official-train images with index % m == k
        m, k = cfg.paper_val_index_mod
        assert len(paper.val) == sum(1 for i in range(official_train) if i % m == k)
        assert len(paper.train) + len(paper.val) == official_train and selection_split(paper_cfg) == "val"
    else:                                      # an official val: the authors' and ours are the same
        assert (paper.train, paper.val, paper.test) == (honest.train, honest.val, honest.test)
        assert selection_split(paper_cfg) == "val"
    # the honest protocol: a val carved out of train where there is no official one, stratified and recorded
    assert selection_split(cfg) == cfg.select_on == "val"
    if settings["val"]["from"] == "train":
        assert settings["val"]["stratified"] and settings["val"]["fraction"] == 0.1
        assert len(honest.train) + len(honest.val) == official_train
        share = np.bincount([y for _, y in honest.val], minlength=len(honest.classes)) / len(honest.val)
        whole = np.bincount([y for _, y in honest.train + honest.val], minlength=len(honest.classes)) / official_train
        assert np.abs(share - whole).max() < 0.02
    else:
        assert len(honest.train) == official_train


def test_a_relative_recipe_glob_from_elsewhere_names_the_checkouts_recipes(tmp_path, monkeypatch):
    """The help's examples glob recipes/... relative to the checkout; run from another folder they matched nothing
    and the message did not say where the recipes are (they are not installed with the package; QA 26)."""
    from spinal_transfer.experiments.reproduce import ReproduceError, find_recipes

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ReproduceError, match=re.escape(f"{str(root / 'recipes/smoke/*.yaml')!r} matches, so run "
                                                       f"from {root} or give that path")):
        find_recipes("recipes/smoke/*.yaml")
    with pytest.raises(ReproduceError) as e:
        find_recipes("nowhere/*.yaml")
    assert "source checkout" not in str(e.value)                      # no hint where the checkout has none either
    monkeypatch.chdir(root)
    assert find_recipes("recipes/smoke/*.yaml")


def test_a_recipe_name_with_a_typo_is_one_line_naming_the_close_one(cli_run, tmp_path):
    """`train --recipe recipes/stl10_wrn101_spinl.yaml` said only that the file cannot be read; the recipe of the
    close name beside it is named. A name close to nothing gets no guess."""
    typo = RECIPES_DIR / "stl10_wrn101_spinl.yaml"
    r = cli_run("train", "--recipe", typo, "--data", tmp_path, "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"did you mean {RECIPES_DIR / 'stl10_wrn101_spinal.yaml'}?" in r.stderr
    far = cli_run("train", "--recipe", RECIPES_DIR / "zzzz.yaml", "--data", tmp_path, "--out", tmp_path / "run")
    assert far.returncode == 2 and "cannot read the recipe" in far.stderr and "did you mean" not in far.stderr
