"""FewShotSegmenter's own logic: original-resolution scoring, optimiser groups and the poly schedule."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from fsseg.data import batch as B
from fsseg.data.transforms import EvalTransform
from fsseg.models.losses import CrossEntropy
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter


class TinyEncoder(nn.Module):
    tap_channels: ClassVar[dict[str, int]] = {"mid": 6, "high": 4}

    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.high = nn.Conv2d(6, 4, 1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        m = self.mid(x)
        return {"mid": m, "high": self.high(m)}


def tiny_model(**kw) -> FewShotSegmenter:
    return FewShotSegmenter(
        TinyEncoder(),
        lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
        FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5)),
        CrossEntropy(),
        **kw,
    )


def test_original_resolution_scoring_recovers_the_label():
    """A label pushed through the eval transform and back onto its original grid comes back (up to a thin edge)."""
    h, w, size = 90, 150, 64
    label = np.zeros((h, w), np.uint8)
    label[20:70, 30:100] = 1
    image = np.zeros((h, w, 3), np.uint8)
    tf = EvalTransform(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), size_divisor=1)
    _, masks, content = tf(image, [label])
    net_label = torch.as_tensor(masks[0]).long()
    logits = torch.stack([(net_label == 0).float(), (net_label == 1).float()])[None] * 10
    ori = torch.full((1, 100, 160), 255, dtype=torch.long)  # padded to a larger batch maximum with 255
    ori[0, :h, :w] = torch.as_tensor(label).long()
    batch = {B.QUERY_LABEL_ORI: ori, B.ORI_SIZE: torch.tensor([[h, w]]), B.CONTENT_SIZE: torch.tensor([list(content)])}
    mapped, target = tiny_model().score_logits(batch, logits)
    pred = mapped.argmax(1)[0, :h, :w]
    wrong = (pred != torch.as_tensor(label).long()).numpy()
    assert tuple(content) == (38, 64) and target is ori
    # one network pixel spans ~2.35 original pixels: errors may only sit within 3 pixels of the rectangle's edge
    near_edge = np.zeros((h, w), bool)
    near_edge[17:73, 27:103] = True
    near_edge[23:67, 33:97] = False
    assert wrong.any() == wrong[near_edge].any() and not wrong[~near_edge].any()
    assert wrong.mean() < 0.025


def test_param_groups_lr_and_poly_schedule():
    model = tiny_model(
        base_lr=0.0025, lr_multiplier=10.0, poly_power=0.9,
        param_groups=[{"match": r"^decoder\.cls\.", "base_lr": 1e-4, "lr_multiplier": 1.0, "schedule": "constant"}],
    )  # fmt: skip

    class T:  # the two trainer attributes configure_optimizers reads
        estimated_stepping_batches = 100

    model._trainer = T()
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 1e-4])
    cls_params = {id(p) for p in model.decoder.cls.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == cls_params
    for _ in range(50):
        opt.step()
        sched.step()
    # poly: lr = base * (1 - 50/100)^0.9 ; constant group unchanged
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025 * 0.5**0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-4)
    assert not any(id(p) in {id(q) for g in opt.param_groups for q in g["params"]} for p in model.encoder.parameters())


def test_kshot_forward_and_frozen_encoder_gets_no_gradient():
    torch.manual_seed(0)
    model = tiny_model()
    batch = {
        B.QUERY_IMG: torch.randn(2, 3, 32, 32),
        B.SUPPORT_IMGS: torch.randn(2, 5, 3, 32, 32),
        B.QUERY_MASK: torch.randint(0, 2, (2, 32, 32)),
        B.SUPPORT_MASKS: torch.randint(0, 2, (2, 5, 32, 32)),
    }
    out = model(batch)
    assert out["logits"].shape == (2, 2, 8, 8) and out["support_taps"]["mid"].shape == (2, 5, 6, 8, 8)
    model.main_loss(out["logits"], batch[B.QUERY_MASK]).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.down_query[0].weight.grad is not None


# ---- PFENet's reference behaviours: support_masking=deepest, encoder.bn=train -------------------------------
def _resnet_model(**kw) -> FewShotSegmenter:
    from fsseg.models.encoders import FrozenEncoder

    torch.manual_seed(0)
    enc = FrozenEncoder("resnet18", taps={"mid": [3, 2], "high": [4]}, weights="none", **kw.pop("enc", {}))
    return FewShotSegmenter(
        enc, lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
        FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5)), CrossEntropy(), **kw,
    )


def _episode(k: int = 2, size: int = 48) -> dict:
    g = torch.Generator().manual_seed(3)
    support_masks = torch.randint(0, 3, (2, k, size, size), generator=g)
    support_masks[support_masks == 2] = 255  # ignore pixels too
    return {
        B.QUERY_IMG: torch.randn(2, 3, size, size, generator=g),
        B.SUPPORT_IMGS: torch.randn(2, k, 3, size, size, generator=g),
        B.QUERY_MASK: torch.randint(0, 2, (2, size, size), generator=g),
        B.SUPPORT_MASKS: support_masks,
    }


def test_support_masking_deepest_is_the_reference_layer4_of_masked_layer3():
    import torch.nn.functional as F

    model = _resnet_model(support_masking="deepest").eval()
    batch = _episode()
    query, support = model.encode(batch)
    m = model.encoder.model
    with torch.no_grad():
        q3 = m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(batch[B.QUERY_IMG])))))))
        torch.testing.assert_close(query["high"], m.layer4(q3))
        for i in range(2):
            s = batch[B.SUPPORT_IMGS][:, i]
            s2 = m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(s))))))
            s3 = m.layer3(s2)
            fg = (batch[B.SUPPORT_MASKS][:, i] == 1).float()[:, None]  # 255 is not foreground
            small = F.interpolate(fg, size=s3.shape[-2:], mode="bilinear", align_corners=True)
            torch.testing.assert_close(support["high"][:, i], m.layer4(s3 * small))  # PFENet: layer4(layer3 * mask)
            torch.testing.assert_close(support["mid"][:, i], torch.cat([s3, s2], 1))  # mid stays unmasked
    plain = _resnet_model().eval()
    _, support_plain = plain.encode(batch)
    assert not torch.allclose(support_plain["high"], support["high"])  # the default one-pass path differs
    torch.testing.assert_close(support_plain["mid"], support["mid"])


def test_support_masking_deepest_refuses_taps_mixing_the_deepest_stage():
    from fsseg.errors import ConfigError
    from fsseg.models.encoders import FrozenEncoder

    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]}, weights="none")
    with pytest.raises(ConfigError, match=r"support_masking=deepest.*\['mid'\]"):
        FewShotSegmenter(enc, lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
                         FeatureEnrichmentModule(dim=8, bins=(1.0,)), CrossEntropy(), support_masking="deepest")
    with pytest.raises(ConfigError, match="support_masking"):
        tiny_model(support_masking="layer4")


def test_encoder_bn_train_normalises_query_and_each_shot_batch_apart():
    import copy

    model = _resnet_model(enc={"bn": "train"})
    model.train()
    bns = [m for m in model.encoder.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)  # train mode reaches the frozen backbone's BatchNorms
    reference = copy.deepcopy(model.encoder)  # the reference's calls: query batch, then one batch per shot
    batch = _episode(k=2)
    before = bns[0].running_mean.clone()
    query, support = model.encode(batch)
    assert not torch.equal(before, bns[0].running_mean)  # running statistics drift, as in PFENet's code
    torch.testing.assert_close(query["high"], reference(batch[B.QUERY_IMG])["high"])
    for i in range(2):
        torch.testing.assert_close(support["mid"][:, i], reference(batch[B.SUPPORT_IMGS][:, i])["mid"])
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())  # still not trained
    model.eval()
    assert not any(m.training for m in bns)
    frozen = bns[0].running_mean.clone()
    model.encode(batch)
    assert torch.equal(frozen, bns[0].running_mean)  # evaluation uses (and keeps) the running statistics


def test_encoder_bn_default_stays_frozen_in_training():
    model = _resnet_model()
    model.train()
    assert not any(m.training for m in model.encoder.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_test_time_scales_average_the_episode_at_each_scale():
    """model.tta_scales: logits of the episode resized by each scale (query, supports, support masks), back at the
    network size, averaged; (1.0,) is the plain forward and a repeated 1.0 changes nothing."""
    import torch.nn.functional as F

    from fsseg.metrics import FewShotIoU
    from fsseg.models.ops import upsample_logits

    torch.manual_seed(0)
    plain = tiny_model().eval()
    batch = _episode(k=1, size=48)
    batch[B.CLASS_IDX] = torch.tensor([0, 1])
    with torch.no_grad():
        base = upsample_logits(plain(batch)["logits"], (48, 48))
        half = dict(batch)
        half[B.QUERY_IMG] = F.interpolate(batch[B.QUERY_IMG], (24, 24), mode="bilinear", align_corners=True)
        half[B.SUPPORT_IMGS] = F.interpolate(batch[B.SUPPORT_IMGS][:, 0], (24, 24), mode="bilinear", align_corners=True)[:, None]
        half[B.SUPPORT_MASKS] = F.interpolate(batch[B.SUPPORT_MASKS].float(), (24, 24), mode="nearest").long()
        at_half = upsample_logits(plain(half)["logits"], (48, 48))
    seen = {}

    class Spy(FewShotIoU):
        def update(self, logits, target, class_idx):
            seen["logits"] = logits
            super().update(logits, target, class_idx)

    for scales, want in (((1.0, 1.0), base), ((1.0, 0.5), (base + at_half) / 2)):
        model = tiny_model(tta_scales=scales, eval_resolution="network").eval()
        model.load_state_dict(plain.state_dict())
        model._eval_step(batch, Spy(5))
        torch.testing.assert_close(seen["logits"], want)
    with pytest.raises(Exception, match="tta_scales"):
        tiny_model(tta_scales=(1.0, 0.0))


def test_init_from_loads_a_runs_weights_and_names_what_it_keeps(tmp_path, caplog):
    """init_from (I2R's 5-shot models start from the 1-shot weights): every checkpoint tensor must fit; the
    model's tensors the checkpoint lacks keep their initialisation and are named."""
    from fsseg.cli.train import init_from
    from fsseg.errors import ConfigError

    torch.manual_seed(0)
    src = tiny_model()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    dropped = "decoder.cls.3.bias"
    del state[dropped]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": state}, tmp_path / "run" / "checkpoints" / "best.ckpt")
    torch.manual_seed(1)
    dst = tiny_model()
    before = dst.state_dict()[dropped].clone()
    with caplog.at_level("INFO", logger="fsseg.train"):
        init_from(dst, tmp_path / "run")  # a run directory: its best.ckpt
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(dst.state_dict()[dropped], before) and dropped in caplog.text
    state["decoder.extra"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match="decoder.extra"):
        init_from(dst, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match="no checkpoint"):
        init_from(dst, tmp_path / "missing")


def test_dead_hidden_is_the_share_of_positions_where_the_classifier_sees_only_zeros():
    """test/dead_hidden: per episode, the share of decoder positions whose ReLU-fed classifier input is all zero
    (the prediction there is the classifier's bias alone). Checked against the hidden layer computed by hand from
    the classifier's own 3x3 conv on the decoder feature, with a half-dead classifier built on purpose; decoders
    whose classifier is not ReLU-fed (HDMNet's BN-fed one) get no hook."""
    from fsseg.metrics import FewShotIoU
    from fsseg.models.segmenter import _relu_fed_classifier

    torch.manual_seed(0)
    model = tiny_model(eval_resolution="network").eval()
    cls = model.decoder.cls
    feats = {}
    cls[0].register_forward_pre_hook(lambda m, a: feats.update(x=a[0].detach()))
    batch = _episode(k=1, size=48)
    batch[B.CLASS_IDX] = torch.tensor([0, 1])
    with torch.no_grad():
        model(batch)  # the classifier's input, to place the dead region
        x = feats["x"]
        ratios = (x[:, 0] / x[:, 1].clamp_min(1e-6)).flatten().sort().values
        mid = len(ratios) // 2
        r = (ratios[mid - 1] + ratios[mid]) / 2  # between two positions' ratios: no position sits on the edge
        cls[0].weight.zero_()  # every hidden unit = relu(x0 - r x1): dead wherever x0 <= r x1 (about half)
        cls[0].weight[:, 0, 1, 1], cls[0].weight[:, 1, 1, 1] = 1.0, -float(r)
    model._eval_step(batch, FewShotIoU(5))
    want = (x[:, 0] - float(r) * x[:, 1] <= 0).float().mean(dim=(1, 2))
    assert 0.05 < float(want.mean()) < 0.95  # a partly dead map, so the check means something
    got = model.diagnostic_means["val"]["dead_hidden"].compute()
    torch.testing.assert_close(got, want.mean())
    # a training forward records nothing
    model.train()
    model._dead_hidden = None
    model(batch)
    assert model._dead_hidden is None
    # HDMNet-style classifier (BN before the last conv): no hook
    bn_fed = nn.Module()
    bn_fed.cls = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    relu_fed = nn.Module()
    relu_fed.cls = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(4, 2, 1))
    assert _relu_fed_classifier(bn_fed) is None and _relu_fed_classifier(relu_fed) is relu_fed.cls[-1]
