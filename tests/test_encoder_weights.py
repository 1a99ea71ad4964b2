"""Weights through timm (issue 15 item 4): every shipped encoder config loads offline weights exactly.

Expectations are independent of the loader under test: a reference encoder built with weights=none gets the
same tensors by a plain strict ``load_state_dict`` with keys the test computes itself; the loaded encoder must
hold exactly those tensors and give bit-identical taps (plain and masked forward). Files are written in timm's
full-classifier layout (fc included), a Lightning-style nested/prefixed layout, and, for the ResNets, PFENet's
deep-stem ``resnet50_v2.pth`` layout (conv1 bn1 conv2 bn2 conv3 bn3, no num_batches_tracked, fc).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from fsseg.errors import WeightsError
from fsseg.models import encoders
from fsseg.models.encoders import FrozenEncoder, package_state_dict, package_weights_file

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoder"
PFENET_STEM = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv1.3.": "conv2.", "conv1.4.": "bn2.", "conv1.6.": "conv3.",
               "bn1.": "bn3."}


def image(size: int = 41, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encoder(config: str, **over) -> FrozenEncoder:
    cfg = OmegaConf.load(CONF / f"{config}.yaml")
    for key, value in over.items():
        cfg[key] = value
    return hydra.utils.instantiate(cfg)


def timm_key(features_key: str) -> str:
    return re.sub(r"^features_(\d+)", r"features.\1", features_key)  # FeatureListNet flattens VGG's features


def pfenet_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix = next((p for p in PFENET_STEM if key.startswith(p)), None)
        out[PFENET_STEM[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def assert_same_encoder(ref: FrozenEncoder, enc: FrozenEncoder) -> None:
    a, b = ref.model.state_dict(), enc.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x, mask = image(), (torch.rand(2, 1, 41, 41, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    for kw in ({}, {"mask": mask}):
        oa, ob = ref(x, **kw), enc(x, **kw)
        assert oa.keys() == ob.keys() and all(torch.equal(oa[t], ob[t]) for t in oa)


@pytest.mark.parametrize("config", ["resnet50", "resnet101", "vgg16_bn"])
def test_config_loads_seeded_weight_files_exactly(tmp_path, config):
    torch.manual_seed(21)
    ref = encoder(config, weights="none")
    with torch.no_grad():  # non-trivial statistics, so a default-initialised model cannot pass
        for m in ref.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    full = {timm_key(k): v.clone() for k, v in ref.model.state_dict().items()}
    full["fc.weight" if config.startswith("resnet") else "head.fc.weight"] = torch.randn(1000, 7)  # unused extras
    layouts = {"timm": full}
    if config == "vgg16_bn":  # the prefix search is the same for every model: one config exercises it
        layouts["lightning"] = {"epoch": 3, "state_dict": {f"module.backbone.{k}": v for k, v in full.items()}}
    else:
        layouts["pfenet"] = pfenet_layout(full)
        assert "conv3.weight" in layouts["pfenet"] and "bn3.running_var" in layouts["pfenet"]
    for layout, blob in layouts.items():
        path = tmp_path / f"{layout}.pth"
        torch.save(blob, path)
        assert_same_encoder(ref, encoder(config, weights=str(path)))


def test_efficientnet_lite0_package_loads_exactly():
    enc = encoder("efficientnet_lite0")  # weights: package
    ref = encoder("efficientnet_lite0", weights="none")
    source = package_state_dict()  # the positional rename, checked against the raw file in test_encoders.py
    ref.model.load_state_dict({k: source[k] for k in ref.model.state_dict() if not k.endswith("num_batches_tracked")},
                              strict=False)
    assert_same_encoder(ref, enc)


def test_package_is_converted_once_into_a_cache_keyed_by_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FSSEG_WEIGHTS_CACHE", str(tmp_path))
    digest = hashlib.sha256(package_weights_file("tf_efficientnet_lite0").read_bytes()).hexdigest()[:16]
    first = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2]}, weights="package")
    (cached,) = tmp_path.iterdir()
    assert digest in cached.name and cached.suffix == ".safetensors"
    stored, source = load_file(str(cached)), package_state_dict()
    assert stored.keys() == source.keys() and all(torch.equal(stored[k], source[k]) for k in source)

    def no_conversion(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(encoders, "package_state_dict", no_conversion)
    again = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2]}, weights="package")
    assert_same_encoder(first, again)
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left behind


def test_unwritable_weights_cache_is_weights_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FSSEG_WEIGHTS_CACHE", str(blocker / "cache"))
    with pytest.raises(WeightsError, match="FSSEG_WEIGHTS_CACHE") as err:
        FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [2]}, weights="package")
    assert str(blocker) in str(err.value)


def test_timm_train_checkpoint_with_args_loads(tmp_path):
    # timm's train.py saves {"state_dict", "args": argparse.Namespace, ...}: timm's reader allows the Namespace
    torch.manual_seed(22)
    ref = FrozenEncoder("resnet18", taps={"high": [4]}, output_stride=8)
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": ref.model.state_dict(),
                "args": argparse.Namespace(lr=0.1)}, path)
    assert_same_encoder(ref, FrozenEncoder("resnet18", taps={"high": [4]}, output_stride=8, weights=str(path)))


def test_pfenet_file_gives_the_kept_classifier_its_fc(tmp_path):
    kw = dict(taps={"high": [4]}, model_kwargs=dict(stem_type="deep", stem_width=64), keep_head=True)
    torch.manual_seed(23)
    ref = FrozenEncoder("resnet18", **kw)
    full = {**ref.model.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    path = tmp_path / "resnet18_v2.pth"
    torch.save(pfenet_layout(full), path)
    enc = FrozenEncoder("resnet18", **{**kw, "weights": str(path)})
    assert torch.equal(enc.head["fc"].weight, full["fc.weight"]) and torch.equal(enc.head["fc"].bias, full["fc.bias"])
    assert_same_encoder(ref.train(False), enc)
