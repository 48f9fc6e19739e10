"""ONNX export of TF-'SAME' models (timm's tf_* family) with fixed padding: the same outputs, and a graph
without the run-time padding arithmetic that int8 would leave in fp32."""
from __future__ import annotations

import pytest
import torch

from spinal_transfer.deploy.export import _write_onnx_legacy, static_same_padding
from spinal_transfer.models.surgery import build_model

onnx = pytest.importorskip("onnx")


def _count_same(model: torch.nn.Module) -> int:
    from timm.layers import Conv2dSame

    return sum(isinstance(m, Conv2dSame) for m in model.modules())


def test_fixed_padding_gives_the_same_logits_and_a_plain_graph(tmp_path):
    torch.manual_seed(0)
    model = build_model("timm/tf_efficientnet_lite0", 3, head="linear", weights=None).eval()
    fixed = static_same_padding(model, 64)
    assert _count_same(model) == 5 and _count_same(fixed) == 0         # the 5 stride-2 convs of Lite0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fixed(x), model(x), atol=1e-5)
    assert fixed.spinal_info.backbone == model.spinal_info.backbone   # metadata travels with the copy
    ops = {}
    for m, name in ((model, "dynamic.onnx"), (fixed, "fixed.onnx")):
        _write_onnx_legacy(m, x, tmp_path / name)
        ops[name] = {n.op_type for n in onnx.load(str(tmp_path / name)).graph.node}
    assert "Ceil" in ops["dynamic.onnx"] and not {"Ceil", "Shape"} & ops["fixed.onnx"]


def test_models_without_same_padding_are_copied_unchanged():
    model = build_model("timm/test_resnet", 3, head="linear", weights=None).eval()
    fixed = static_same_padding(model, 32)
    assert fixed is not model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fixed.state_dict().values()))
