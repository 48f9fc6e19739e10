"""The spinal width rule: twice the class count, floored and capped, instead of a constant 512."""
from __future__ import annotations

import pytest

from spinal_transfer.errors import ConfigError
from spinal_transfer.models.heads import MIN_LAYER_WIDTH, SpinalHead, create_head, default_layer_width


@pytest.mark.parametrize("in_features, num_classes, width", [
    (2048, 4, 32), (2048, 10, 32), (2048, 16, 32), (2048, 17, 40), (2048, 100, 200), (2048, 196, 392),
    (2048, 1000, 512), (512, 1000, 128), (96, 5, 32), (25088, 225, 456), (64, 50, 32)])
def test_width_values(in_features, num_classes, width):
    assert default_layer_width(in_features, num_classes) == width


def test_width_is_a_multiple_of_8_grows_with_classes_and_stays_within_bounds():
    for d in (64, 512, 768, 1280, 2048, 4096):
        widths = [default_layer_width(d, c) for c in range(1, 3000, 7)]
        assert all(w % 8 == 0 and MIN_LAYER_WIDTH <= w <= max(MIN_LAYER_WIDTH, d // 4) + 7 for w in widths)
        assert widths == sorted(widths)
    with pytest.raises(ConfigError):
        default_layer_width(0, 10)


def test_small_folder_head_is_far_smaller_than_with_512():
    """The issue's example: 4 classes on 2048 features was a 1.3M-parameter head at width 512."""
    big = SpinalHead(2048, 4, 512)
    ruled = create_head("spinal", 2048, 4, layer_width=default_layer_width(2048, 4))
    assert big.num_params() > 1_300_000 and ruled.num_params() < big.num_params() / 9
    assert ruled.num_params() == sum(p.numel() for p in ruled.parameters())


def test_a_head_without_width_follows_the_rule_on_the_measured_feature_width():
    from spinal_transfer.models.surgery import build_model, get_head

    assert create_head("spinal", 2048, 100).layer_width == 200
    model = build_model("timm/test_resnet", 5, head="spinal", weights=None, layer_width=None)
    head = get_head(model)
    assert head.layer_width == default_layer_width(model.spinal_info.feature_width, 5) == 32
