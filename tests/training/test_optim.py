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
    FreezePolicy().apply(model, frozen=True)
    head = set(head_param_names(model))
    assert all(p.requires_grad == (n in head) for n, p in model.named_parameters())
    heads = [model.get_submodule(p) for p in model.spinal_info.head_paths]
    assert all(h.training for h in heads) and not model.training
    FreezePolicy().apply(model, frozen=False)
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_frozen_bn_stats_keep_the_backbones_running_statistics_while_its_scale_and_shift_train():
    """--bn-stats frozen: a training step moves the backbone's BatchNorm weights but not its running mean/var
    (PyTorch's train mode re-estimates them from every batch); the VGG preset head's own BatchNorm still learns
    its statistics; a backbone without weights to keep (--weights none) updates them as before."""
    from spinal_transfer.config import TrainConfig

    torch.manual_seed(0)
    model = build_model("timm/test_resnet", 3, head="spinal", preset="vgg", weights=None, layer_width=16)
    head_prefixes = tuple(p + "." for p in model.spinal_info.head_paths)
    bn = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    head_bn = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and n.startswith(head_prefixes)}
    assert bn and head_bn                               # the case under test: BatchNorm on both sides
    before = {n: (m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for n, m in bn.items()}
    head_before = {n: m.running_mean.clone() for n, m in head_bn.items()}
    FreezePolicy(frozen_bn_stats=True).apply(model, frozen=False)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32) * 3 + 1), torch.arange(8) % 3)
    loss.backward()
    opt.step()
    for n, m in bn.items():
        mean, var, _ = before[n]
        assert not m.training and torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var), n
        assert m.weight.grad is not None, n                                  # its scale still trains ...
    assert any(not torch.equal(m.weight, before[n][2]) for n, m in bn.items())   # (timm zero-inits some blocks')
    assert all(m.training and not torch.equal(m.running_mean, head_before[n]) for n, m in head_bn.items())
    FreezePolicy().apply(model, frozen=False)                                # the default: all in train mode
    assert all(m.training for m in bn.values())
    assert TrainConfig(bn_stats="frozen", weights="bundled").frozen_bn_stats()
    assert not TrainConfig(bn_stats="frozen", weights="none").frozen_bn_stats()
    assert not TrainConfig(weights="bundled").frozen_bn_stats()
