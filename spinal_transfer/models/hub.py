"""Backbones from the Hugging Face Hub (`timm/hf-hub:org/name`) and failing fast without a network.

timm builds `hf-hub:org/name` models from the repo's `config.json` (architecture, model_args and the
pretrained config that preprocessing resolves from: mean, std, input size, crop_pct, interpolation)
and loads `model.safetensors`; both come from the HF cache when they are there.

Without a network and without a cached copy, huggingface_hub retries for about 50 s before giving
up (a 60 s metadata timeout with backoff), and torch.hub's urllib download has no timeout at all.
So before anything is downloaded, this module decides once per process whether the server can be
reached at all (a TCP connect with a 2 s bound, DNS included, through the proxy when one is
configured); when it cannot, or HF_HUB_OFFLINE is set, timm runs with huggingface_hub's offline
mode (cached files load at once, missing ones fail at once) and torchvision weights that are not
cached fail at once. Environment variables (HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE, HF_ENDPOINT)
are read when a model is built, not when huggingface_hub was imported, so setting them in a running
process works too.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from torch import nn

from ..errors import ConfigError, first_line

LIBRARIES = ("torchvision", "timm")              # the <library>/ of a backbone name
HUB_PREFIX = "hf-hub:"
PROBE_TIMEOUT_S = 2.0
DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_FILES = ("config.json", "model.safetensors")      # what a timm Hub repo needs (weights: or pytorch_model.bin)
_TRUE = {"1", "on", "yes", "true"}
_probes: dict[Tuple[str, int], Optional[str]] = {}
_probe_lock = threading.Lock()


class Unreachable(ConnectionError):
    """A file is needed from a server that cannot be reached (or offline mode is on) and is not cached.
    `reason` says why in a few words; `files` names what is missing; `repo` is the Hub repo, if any."""

    def __init__(self, reason: str, files: Tuple[str, ...] = (), repo: Optional[str] = None):
        super().__init__(reason)
        self.reason, self.files, self.repo = reason, tuple(files), repo


# --- names -----------------------------------------------------------------------------------------

def is_hub_name(name: str) -> bool:
    """True for timm's Hub model names, `hf-hub:org/name[@revision]` (timm also accepts `hf_hub:`)."""
    return name.lower().startswith(("hf-hub:", "hf_hub:"))


def parse_backbone(backbone: str) -> tuple[str, str]:
    """("torchvision" | "timm", name); timm names include Hub repos, `hf-hub:org/name[@revision]`."""
    lib, sep, name = backbone.partition("/")
    if not sep or lib not in LIBRARIES or not name:
        raise ConfigError(f"backbone must be 'torchvision/<name>', 'timm/<name>' or 'timm/hf-hub:<org>/<name>' "
                         f"(a timm model on the Hugging Face Hub), got {backbone!r}{_library_of(backbone)}; see "
                         f"`spinal-transfer models`")
    if is_hub_name(name):
        if lib != "timm":
            raise ConfigError(f"Hugging Face Hub backbones are timm models: use 'timm/{name}', not {backbone!r}")
        split_hub_name(name)
    return lib, name


def model_names(lib: str) -> list[str]:
    """The classification model names `lib` ("timm" or "torchvision") can build."""
    if lib == "timm":
        import timm  # lazy: only name checks need the registries, not every import of hub

        return timm.list_models()
    import torchvision.models as tvm  # lazy: as timm

    return tvm.list_models(module=tvm)


def has_model(lib: str, name: str) -> bool:
    """Whether `lib` can build `name` (timm: a pretrained tag or a Hub repo included)."""
    if lib == "timm":
        import timm  # lazy: as in model_names

        return is_hub_name(name) or timm.is_model(name)
    return name in model_names(lib)


def _library_of(name: str) -> str:
    """' (did you mean timm/resnet50 or torchvision/resnet50?)' for a bare name a library has, else ''."""
    have = [f"{lib}/{name}" for lib in ("timm", "torchvision") if has_model(lib, name)]
    return f" (did you mean {' or '.join(have)}?)" if have else ""


def split_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """`hf-hub:org/name@rev` -> ("org/name", "rev" or None); a clear error for anything else, because a
    repo id without its organisation would silently resolve to another repo."""
    repo, _, rev = name.split(":", 1)[1].partition("@")
    org, sep, repo_name = repo.partition("/")
    if not (org and sep and repo_name) or "/" in repo_name or " " in repo:
        raise ConfigError(f"a Hub backbone is 'timm/hf-hub:<org>/<name>' (optionally '@<revision>'), got "
                         f"'timm/{name}'")
    return repo, rev or None


# --- environment, read at call time ---------------------------------------------------------------

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hf_offline_flag() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or huggingface_hub's own switch."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hf_endpoint() -> str:
    """HF_ENDPOINT as set now (a mirror), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """The Hub cache folder by huggingface_hub's rules (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub), from the environment as it is now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


# --- reachability ---------------------------------------------------------------------------------

def _server_address(url: str) -> Tuple[str, int, str]:
    """(host, port, description) that a download of `url` connects to first: its proxy when one is
    configured for the scheme (and the host is not bypassed), else the server itself."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 80, f"the proxy {p.hostname}:{p.port or 80} for {host}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host, port, f"{host}:{port}"


def unreachable(url: str, timeout: Optional[float] = None) -> Optional[str]:
    """None when a TCP connection to the server of `url` (or its proxy) opens within `timeout` seconds
    (default PROBE_TIMEOUT_S), name resolution included; else a short reason. Probed once per process
    and address: a second model build does not wait again."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    host, port, what = _server_address(url)
    with _probe_lock:
        if (host, port) in _probes:
            return _probes[(host, port)]
    outcome: List[Optional[str]] = []

    def attempt() -> None:          # in a thread: getaddrinfo has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"cannot connect to {what}: {e.strerror or e}")

    t = threading.Thread(target=attempt, name="spinal-transfer-probe", daemon=True)
    t.start()
    t.join(timeout)
    result = outcome[0] if outcome else f"no answer from {what} within {timeout:g} s"
    with _probe_lock:
        _probes[(host, port)] = result
    return result


def hub_offline_reason() -> Optional[str]:
    """Why the Hub cannot be used now (offline flag, or the endpoint does not answer), or None."""
    if hf_offline_flag():
        return "offline mode: HF_HUB_OFFLINE is set"
    return unreachable(hf_endpoint())


@contextlib.contextmanager
def hub_offline_mode(enabled: bool = True) -> Iterator[None]:
    """huggingface_hub's offline mode for the duration (its requests then fail at once instead of
    retrying, and cached files are used without a metadata request)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def url_unreachable(url: str, cached: Path) -> Optional[str]:
    """For a torch.hub-style download (torchvision weights, timm's URL weights): None when the file is
    already at `cached` (no network needed) or its server answers; else why it cannot be had."""
    if cached.is_file():
        return None
    return unreachable(url)


# --- the Hub cache --------------------------------------------------------------------------------

def cached_file(repo: str, filename: str, revision: Optional[str] = None) -> Optional[Path]:
    """Path of `filename` of Hub repo `repo` in the cache, or None; huggingface_hub's own lookup."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(hf_cache_dir()), revision=revision)
    return Path(found) if isinstance(found, str) else None


def _hub_errors() -> tuple:
    """The exceptions that mean "could not get the file", not "the file is wrong"."""
    from huggingface_hub import errors

    return (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.RepositoryNotFoundError,
            errors.RevisionNotFoundError, errors.EntryNotFoundError, errors.HfHubHTTPError, OSError)


def hub_model_config(name: str) -> Tuple[dict, str, dict]:
    """(pretrained_cfg, architecture, model_args) of a `hf-hub:` name from its config.json, parsed by
    timm's own code (so the pretrained config is what `create_model` would use); offline-aware."""
    from timm.models._hub import load_model_config_from_hf

    repo, rev = split_hub_name(name)
    reason = hub_offline_reason()
    try:
        with hub_offline_mode(reason is not None or hf_offline_flag()):
            return load_model_config_from_hf(name.split(":", 1)[1], cache_dir=str(hf_cache_dir()))
    except _hub_errors() as e:
        raise Unreachable(reason or _short(e), ("config.json",), repo) from e


def _timm_needs(name: str, pretrained: bool) -> Tuple[str, Optional[str], Optional[str], Tuple[str, ...]]:
    """(timm's name for create_model, Hub repo or None, revision, files needed from it) for a registry name
    (possibly `arch.tag`) or `hf-hub:org/name[@rev]`; a registry model whose weights come by URL has no repo
    and needs (url,)."""
    import timm

    if is_hub_name(name):
        repo, rev = split_hub_name(name)
        needed = ("config.json", "model.safetensors") if pretrained else ("config.json",)
        return HUB_PREFIX + name.split(":", 1)[1], repo, rev, needed
    if not pretrained:
        return name, None, None, ()
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo:                                        # older timm weights: a torch.hub download by URL
        url = getattr(cfg, "url", None) if cfg else None
        return name, None, None, (url,) if url else ()
    return name, repo, None, (getattr(cfg, "hf_hub_filename", None) or "model.safetensors",)


def _url_target(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)


def timm_unavailable(name: str, pretrained: bool) -> Optional[Unreachable]:
    """What `create_timm(name, pretrained)` would fail for, without building anything: Unreachable (why, the
    missing files, the repo) when a needed file is not cached and its server cannot be reached; else None.
    Lets a run refuse before it reads its data or takes its folder's lock."""
    return _unavailable(*_timm_needs(name, pretrained)[1:])


def _unavailable(repo: Optional[str], rev: Optional[str], needed: Tuple[str, ...]) -> Optional[Unreachable]:
    if repo is None:
        reason = url_unreachable(needed[0], _url_target(needed[0])) if needed else None
        return Unreachable(reason, (_url_target(needed[0]).name,)) if reason else None
    missing = tuple(f for f in needed if not _cached_or_alternative(repo, f, rev))
    reason = hub_offline_reason() if missing else None
    return Unreachable(reason, missing, repo) if reason else None


def create_timm(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=..., **kwargs)` that fails within seconds, raising Unreachable with the
    missing files, when they are not cached and the server cannot be reached. `name` is a registry
    name (possibly `arch.tag`) or `hf-hub:org/name[@rev]`, whose config.json is needed even without
    weights. The Hub is probed once per process; when it does not answer, timm runs in offline mode."""
    import timm

    name, repo, rev, needed = _timm_needs(name, pretrained)
    gap = _unavailable(repo, rev, needed)
    if gap is not None:
        raise gap
    if repo is None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    reason = hub_offline_reason()
    try:
        with hub_offline_mode(reason is not None or hf_offline_flag()):
            return timm.create_model(name, pretrained=pretrained, cache_dir=str(hf_cache_dir()), **kwargs)
    except _hub_errors() as e:
        missing = tuple(f for f in needed if not _cached_or_alternative(repo, f, rev)) or needed
        raise Unreachable(reason or _short(e), missing, repo) from e


def _cached_or_alternative(repo: str, filename: str, rev: Optional[str]) -> bool:
    """Whether `filename` (or, for weights, the pytorch_model.bin that timm falls back to) is cached."""
    alternatives = (filename, "pytorch_model.bin") if filename == "model.safetensors" else (filename,)
    return any(cached_file(repo, f, rev) for f in alternatives)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, None)}"


def cached_hub_backbones() -> List[str]:
    """`timm/hf-hub:org/name` of every model repo in the local Hub cache whose config.json (main
    branch) is a timm config (has an `architecture`); reads only those small files."""
    root = hf_cache_dir()
    names = []
    for repo_dir in sorted(root.glob("models--*--*")) if root.is_dir() else []:
        repo = repo_dir.name[len("models--"):].replace("--", "/", 1)
        path = cached_file(repo, "config.json")
        try:
            cfg: Any = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and "architecture" in cfg:
            names.append(f"timm/{HUB_PREFIX}{repo}")
    return names
