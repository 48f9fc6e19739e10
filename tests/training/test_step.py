"""The one training step (training/step.py) that the epoch loop and lr-find both take."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spinal_transfer.training.step import StepSettings, train_step

CPU = torch.device("cpu")


def _model_and_batch(n: int = 8):
    torch.manual_seed(0)
    return nn.Linear(4, 3), torch.randn(n, 4), torch.randint(0, 3, (n,))


def _scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


def test_two_accumulated_halves_step_like_the_whole_batch():
    model, x, y = _model_and_batch()
    whole = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    s = StepSettings(CPU, accum_steps=2)
    assert train_step(model, x[:4], y[:4], opt, _scaler(), s, closes=False)[1] == 4
    assert train_step(model, x[4:], y[4:], opt, _scaler(), s, closes=True)[1] == 4
    ref_opt = torch.optim.SGD(whole.parameters(), lr=0.5)
    first = _with(whole.state_dict())
    loss, n = train_step(whole, x, y, ref_opt, _scaler(), StepSettings(CPU), closes=True)
    assert n == 8
    torch.testing.assert_close(loss, nn.functional.cross_entropy(first(x), y).detach())
    for a, b in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in model.parameters())          # zeroed once the window closed


def test_a_batch_that_cannot_train_steps_nothing():
    model, x, y = _model_and_batch()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    assert train_step(model, x[:1], y[:1], opt, _scaler(), StepSettings(CPU), closes=True) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    seen = []

    def pairing_mixup(a, b):             # timm's Mixup pairs images: an odd batch loses its last one first
        seen.append(len(a))
        return a, b
    loss, n = train_step(model, x[:5], y[:5], opt, _scaler(), StepSettings(CPU, mixup=pairing_mixup), closes=True)
    assert seen == [4] and n == 4
    torch.testing.assert_close(loss, nn.functional.cross_entropy(_with(before)(x[:4]), y[:4]).detach())


def test_clipping_bounds_the_update():
    model, x, y = _model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, x * 100, y, opt, _scaler(), StepSettings(CPU, clip_grad=1e-3), closes=True)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)     # the gradient was far longer: cut to 1e-3


def _with(state: dict) -> nn.Linear:
    m = nn.Linear(4, 3)
    m.load_state_dict(state)
    return m
