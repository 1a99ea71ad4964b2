"""Encoder partial fine-tuning (SSP: layer2-3 trained, layer0/1 and BatchNorm fixed) and the step lr schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsseg.errors import ConfigError
from fsseg.models.encoders import FrozenEncoder


def _encoder(**kw):
    return FrozenEncoder("resnet18", taps={"feat": [3]}, output_stride=8, weights="none", channels_last=False, **kw)


def test_only_the_named_stages_train_and_batchnorm_stays_fixed_in_eval():
    torch.manual_seed(0)
    enc = _encoder(frozen=False, trainable=["layer2", "layer3"])
    enc.train()
    bns = [m for m in enc.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert enc.model.layer2[0].conv1.training  # the rest follows the train mode
    before = [m.running_mean.clone() for m in bns]
    enc(torch.randn(2, 3, 64, 64))["feat"].square().mean().backward()
    for name, p in enc.model.named_parameters():
        is_bn = ".bn" in name or name.startswith("bn1") or ".downsample.1." in name
        trained = name.startswith(("layer2.", "layer3.")) and not is_bn
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
    for stage in (enc.model.layer2, enc.model.layer3):  # a real gradient (timm zero-inits each block's last BN)
        assert sum(float(p.grad.abs().sum()) for p in stage.parameters() if p.grad is not None) > 0
    for m, b in zip(bns, before, strict=True):  # eval-mode BatchNorm: running statistics untouched
        torch.testing.assert_close(m.running_mean, b)


def test_partial_fine_tuning_is_refused_when_frozen_or_misnamed():
    with pytest.raises(ConfigError, match="frozen=false"):
        _encoder(frozen=True, trainable=["layer2"])
    with pytest.raises(ConfigError, match=r"layer9"):
        _encoder(frozen=False, trainable=["layer9"])


def test_step_schedule_divides_the_lr_at_the_milestones():
    from fsseg.models.losses import CrossEntropy
    from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
    from fsseg.models.segmenter import FewShotSegmenter

    class Enc(nn.Module):
        tap_channels = {"mid": 4, "high": 4}  # noqa: RUF012

        def forward(self, x):
            return {"mid": x[:, :1].repeat(1, 4, 1, 1), "high": x[:, :1].repeat(1, 4, 1, 1)}

    def model(**kw):
        return FewShotSegmenter(
            Enc(), lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=4),
            FeatureEnrichmentModule(dim=4, bins=(1.0,)), CrossEntropy(), base_lr=1e-3, lr_multiplier=1.0, **kw,
        )  # fmt: skip

    m = model(schedule="step", step_milestones=(0.25, 0.5), step_gamma=0.1)

    class T:
        estimated_stepping_batches = 100

    m._trainer = T()
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[24] == pytest.approx(1e-3)
    assert lrs[25] == lrs[49] == pytest.approx(1e-4)
    assert lrs[50] == lrs[59] == pytest.approx(1e-5)
    for bad in ({"step_milestones": (0.5, 0.25)}, {"step_milestones": (1.5,)}, {"step_gamma": 0.0}):
        with pytest.raises(ConfigError, match="milestones|gamma"):
            model(schedule="step", **bad)
    with pytest.raises(ConfigError, match="schedule"):
        model(schedule="cosine")
