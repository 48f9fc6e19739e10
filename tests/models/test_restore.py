"""Rebuilding a model from a checkpoint: offline (no weights fetched), in eval mode, with the same outputs."""
from __future__ import annotations

import torch

from spinal_transfer.config import TrainConfig
from spinal_transfer.models.heads import head_options
from spinal_transfer.models.preprocess import resolve_data_config
from spinal_transfer.models.restore import model_from_checkpoint
from spinal_transfer.models.surgery import build_model
from spinal_transfer.runs.checkpoint import atomic_save, checkpoint_meta, load_checkpoint, state_dict_cpu


def test_a_model_rebuilt_from_its_checkpoint_gives_the_same_outputs(tmp_path):
    cfg = TrainConfig(backbone="timm/test_resnet", weights="none", head="spinal", layer_width=16, img_size=32)
    torch.manual_seed(0)
    model = build_model(cfg.backbone, 3, head=cfg.head, weights=None, replace=cfg.replace, **head_options(cfg))
    model.eval()
    dc = resolve_data_config(cfg.backbone, cfg.weights, model, img_size=cfg.img_size)
    atomic_save({"model": state_dict_cpu(model), **checkpoint_meta(cfg.to_dict(), ["a", "b", "c"], dc,
                                                                    model.spinal_info)}, tmp_path / "best.pt")
    rebuilt, cfg2, dc2, classes = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    assert not rebuilt.training and classes == ["a", "b", "c"] and cfg2 == cfg and dc2 == dc
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
