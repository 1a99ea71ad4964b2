"""FrozenEncoder(keep_head=True): the kept ImageNet classifier and `tail`, checked against timm's own full forward.

The reference is ``timm.create_model(name, output_stride=...)`` (a second implementation: the whole classifier
run in one call) holding the same state dict as the encoder; the encoder's `tail(i, feature_i)` must give its
logits from the raw feature of index i alone.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from fsseg.errors import ConfigError, WeightsError
from fsseg.models.encoders import FrozenEncoder, package_state_dict


def image(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def seeded_state(name: str, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A random full-classifier state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def reference_logits(name: str, state, x: torch.Tensor, **kw) -> torch.Tensor:
    full = timm.create_model(name, pretrained=False, **kw)
    full.load_state_dict(state, strict=True)
    with torch.no_grad():
        return full.eval()(x)


def check_tail(enc: FrozenEncoder, ref: torch.Tensor, x: torch.Tensor, indices) -> None:
    feats = enc._features(x)  # the raw timm features (before feature_pool)
    for i in indices:
        logits = enc.tail(i, feats[i])
        assert logits.shape == (x.shape[0], enc.num_classes) == ref.shape
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=f"index {i}")


@pytest.mark.parametrize("output_stride", [8, None])
def test_efficientnet_lite0_package_tail_equals_timm_classifier(output_stride):
    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [2], "high": [4]}, output_stride=output_stride,
                        weights="package", keep_head=True)
    assert enc.num_classes == 1000 and set(enc.head) == {"conv_head", "bn2", "global_pool", "classifier"}
    x = image(64)
    kw = {} if output_stride is None else {"output_stride": output_stride}
    check_tail(enc, reference_logits("tf_efficientnet_lite0", package_state_dict(), x, **kw), x, (2, 4))


@pytest.mark.parametrize("output_stride", [8, None])
def test_resnet_tail_equals_timm_classifier(tmp_path, output_stride):
    kw = {} if output_stride is None else {"output_stride": output_stride}
    state = seeded_state("resnet18", 11, **kw)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    # taps end at layer3: layer4 (not a tap) is kept for the classifier, with global_pool and fc
    enc = FrozenEncoder("resnet18", taps={"mid": [2], "high": [3]}, output_stride=output_stride,
                        weights=str(path), keep_head=True)
    assert set(enc.head) == {"layer4", "global_pool", "fc"}
    x = image(64)
    ref = reference_logits("resnet18", state, x, **kw)
    check_tail(enc, ref, x, (2, 3))
    torch.testing.assert_close(enc.tail(4, enc.head["layer4"](enc._features(x)[3])), ref)  # the last index


def test_resnet_weights_none_seeded_tail_equals_timm_classifier():
    torch.manual_seed(4)
    enc = FrozenEncoder("resnet18", taps={"mid": [2], "high": [4]}, output_stride=8, keep_head=True)
    state = {**enc.model.state_dict(), **enc.head.state_dict()}  # timm ResNet keys on both sides
    x = image(64)
    check_tail(enc, reference_logits("resnet18", state, x, output_stride=8), x, (2, 4))


def test_vgg_tail_equals_timm_classifier(tmp_path):
    kw = dict(mlp_ratio=1 / 64)  # timm's pre_logits 7x7 conv at 64 hidden channels instead of 4096: small
    state = seeded_state("vgg11_bn", 12, **kw)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    enc = FrozenEncoder("vgg11_bn", taps={"mid": [2], "high": [4]}, output_stride=None, weights=str(path),
                        model_kwargs=kw, keep_head=True)
    x = image(64, batch=1)
    check_tail(enc, reference_logits("vgg11_bn", state, x, **kw), x, (2, 4))


def test_tail_is_differentiable_in_x_and_no_parameter_gets_grad():
    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]}, weights="package",
                        keep_head=True, frozen=False)  # even an unfrozen encoder keeps its head frozen
    enc.model.requires_grad_(False)
    enc.train(True)
    assert not enc.head.training and all(not p.requires_grad for p in enc.head.parameters())
    feats = enc._features(image(64))
    x = feats[3].detach().requires_grad_()
    (grad,) = torch.autograd.grad(enc.tail(3, x)[:, 285].sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_chelsea_is_an_egyptian_cat_at_output_stride_8():
    skimage_data = pytest.importorskip("skimage.data", reason="skimage provides the chelsea test image")
    from skimage.transform import resize

    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"high": [3]}, output_stride=8, weights="package",
                        keep_head=True)
    img = resize(skimage_data.chelsea(), (224, 224), anti_aliasing=True)
    x = enc.normalize(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    assert enc.mean == (0.5, 0.5, 0.5)  # timm's pretrained_cfg for the TF weights: [-1, 1] input
    with torch.no_grad():
        prob = enc.tail(3, enc._features(x)[3]).softmax(-1)[0]
    assert prob.argmax().item() == 285  # ImageNet "Egyptian cat"


def test_keep_head_false_still_prunes_and_has_no_tail():
    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]})
    assert len(enc.model.blocks) == 5 and enc.head is None and enc.num_classes == 0
    with pytest.raises(ConfigError, match="keep_head"):
        enc.tail(3, torch.zeros(1, 112, 8, 8))
    kept = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]}, keep_head=True)
    # the stages after the taps are kept for the classifier, but in the head: the forward still stops at the taps
    assert len(kept.model.blocks) == 5 and {"blocks_5", "blocks_6"} <= set(kept.head)
    ran: list[str] = []
    for key, module in kept.head.items():
        module.register_forward_hook(lambda *_, key=key: ran.append(key))
    feats = kept(image(64))
    assert ran == []
    kept.tail(3, feats["high"])
    assert ran == ["blocks_5", "blocks_6", "conv_head", "bn2", "global_pool", "classifier"]


def test_head_weights_are_required(tmp_path):
    state = seeded_state("resnet18", 13)
    del state["fc.weight"]
    path = tmp_path / "no_fc.pth"
    torch.save(state, path)
    FrozenEncoder("resnet18", taps={"high": [4]}, weights=str(path))  # no head wanted: loads
    with pytest.raises(WeightsError, match="fc.weight"):
        FrozenEncoder("resnet18", taps={"high": [4]}, weights=str(path), keep_head=True)


@pytest.mark.parametrize(
    "name, kw, match",
    [("resnet18", dict(model_kwargs={"num_classes": 0}), "num_classes=0"),
     ("mobilenetv3_small_050", {}, "ResNet, EfficientNet and VGG")],
)
def test_keep_head_config_errors(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        FrozenEncoder(name, taps={"high": [2]}, output_stride=None, keep_head=True, **kw)
