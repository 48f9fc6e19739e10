"""One stage's optimizer and schedule, and the freeze policy, on a real backbone with a new head."""
from __future__ import annotations

import math

import pytest
import torch

from spinal_transfer.models.surgery import build_model, head_param_names
from spinal_transfer.training.optim import FreezePolicy, make_optimizer, make_scheduler


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("timm/test_resnet", 3, head="spinal", weights=None, layer_width=16)


def test_head_and_backbone_groups_take_the_lr_multiplier(model):
    opt = make_optimizer(model, "sgd", 0.1, backbone_lr_mult=0.25, weight_decay=1e-4)
    head, backbone = opt.param_groups
    assert (head["name"], head["lr"], backbone["name"], backbone["lr"]) == ("head", 0.1, "backbone", 0.025)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in head["params"]} == set(head_param_names(model))
    assert len(head["params"]) + len(backbone["params"]) == len(list(model.parameters()))


def test_cosine_with_warmup_rises_linearly_then_follows_the_cosine(model):
    opt = make_optimizer(model, "adamw", 1.0)
    sched, unit = make_scheduler(opt, "cosine", epochs=3, steps_per_epoch=4, warmup_epochs=1.0)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert unit == "step" and lrs[0] == pytest.approx(1e-3)
    assert lrs[:4] == pytest.approx([1e-3 + (1 - 1e-3) * k / 4 for k in range(4)])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_step_schedule_steps_per_epoch(model):
    opt = make_optimizer(model, "sgd", 1.0)
    sched, unit = make_scheduler(opt, "step", epochs=10, steps_per_epoch=5, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert unit == "epoch" and lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])


def test_a_frozen_backbone_has_no_gradients_and_eval_mode_while_the_head_trains(model):
    policy = FreezePolicy(freeze_epochs=1)
    assert [policy.frozen(e) for e in (1, 2)] == [True, False] and FreezePolicy(always=True).frozen(99)
    FreezePolicy.apply(model, frozen=True)
    head = set(head_param_names(model))
    assert all(p.requires_grad == (n in head) for n, p in model.named_parameters())
    heads = [model.get_submodule(p) for p in model.spinal_info.head_paths]
    assert all(h.training for h in heads) and not model.training
    FreezePolicy.apply(model, frozen=False)
    assert all(p.requires_grad for p in model.parameters()) and model.training
